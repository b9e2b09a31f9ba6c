"""test_cli.py - the devio command line: usage errors are clear and exit 2."""
import subprocess

from conftest import DEVIO


def run(*args):
    return subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=30)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("serve", "info", "copy", "attach", "status"):
        assert f"devio {cmd}" in r.stdout


def test_serve_without_frontend_is_an_error():
    r = run("serve", "ram:1M")
    assert r.returncode == 2
    assert "no front end" in r.stderr


def test_serve_bad_size_is_an_error():
    r = run("serve", "ram:1M", "--size", "12Q", "--devio", "tcp:0")
    assert r.returncode == 2
    assert "--size: bad size '12Q'" in r.stderr


# ---- a failure is told once, by the part that knows its cause ----

import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def scratch():
    d = tempfile.mkdtemp(prefix="devio-cli-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once closed


def errors_of(r):
    return [l for l in r.stderr.splitlines() if l.startswith("devio: error:")]


def one_error(r, *want):
    """r failed with exactly one error line, which contains every want."""
    assert r.returncode != 0, r.stderr
    errs = errors_of(r)
    assert len(errs) == 1, f"want one error line, got:\n{r.stderr}"
    for w in want:
        assert w in errs[0], errs[0]
    return errs[0]


def one_partition_image(d):
    img = os.path.join(d, "p.img")
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "-q", img], input=b"size=2048, type=83\n", check=True, timeout=30)
    return img


def test_missing_partition_is_named(scratch):
    if not shutil.which("sfdisk"):
        pytest.skip("sfdisk not installed")
    img = one_partition_image(scratch)
    sock = os.path.join(scratch, "s")
    one_error(run("serve", img, "--partition", "3", "--nbd", f"unix:{sock}"), "no partition 3",
              "the tables list 1")
    assert "No such file" not in run("serve", img, "--partition", "3", "--nbd", f"unix:{sock}").stderr
    one_error(run(str(closed_port()), img, "3"), "no partition 3")  # ImDisk's command line


def test_each_failure_is_told_once(scratch):
    port = closed_port()
    missing = os.path.join(scratch, "missing.img")
    cases = [
        (("serve", missing, "--nbd", f"unix:{scratch}/s"), "No such file or directory"),
        (("info", missing), "No such file or directory"),
        (("copy", missing, os.path.join(scratch, "out")), "No such file or directory"),
        (("info", f"devio://127.0.0.1:{port}"), "cannot connect"),
        (("info", f"nbd://127.0.0.1:{port}"), "cannot connect"),
        (("cat", f"devio://127.0.0.1:{port}"), "cannot connect"),
        (("serve", "ram:1M", "--nbd", f"unix:{scratch}/no/such/dir/s"), "cannot listen"),
        (("serve", "ram:1M", "--fuse", os.path.join(scratch, "no-such-dir")), "No such file or directory"),
    ]
    for args, want in cases:
        one_error(run(*args), want)


def test_port_out_of_range_is_refused():
    r = run("serve", "ram:1M", "--devio", "tcp:127.0.0.1:99999")
    assert r.returncode != 0
    one_error(r, "99999")
