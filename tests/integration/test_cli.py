"""test_cli.py - the devio command line as a user meets it: every
subcommand's -h/--help and -V/--version, usage errors in one line with exit
status 2, each failure told once with its cause, decimal sizes (fractions,
"too large"), ports in range, unknown URI schemes, and warnings for options
that would change nothing."""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

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


# ---- every subcommand: -h/--help, -V/--version, one-line usage errors ----

COMMANDS = ["serve", "info", "cat", "write", "copy", "convert", "attach", "detach", "status", "list"]
VERSION_LINE = re.compile(r"^devio \d+\.\d+\.\d+\S*\n$")


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("opt", ["-h", "--help"])
def test_every_command_has_its_own_help(cmd, opt):
    r = run(cmd, opt)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"usage: devio {cmd}"), r.stdout


@pytest.mark.parametrize("args", [(), *[(c,) for c in COMMANDS], ("attach", "--nbd-device")])
@pytest.mark.parametrize("opt", ["-V", "--version"])
def test_version_everywhere(args, opt):
    r = run(*args, opt)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert VERSION_LINE.match(r.stdout), r.stdout


def usage_error(r, cmd, problem):
    """Exit 2, one line naming the problem, one pointing at the help."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    # the command's own checks name it; an option's value is named by the option
    assert lines[0].startswith("devio: error: ") and problem in lines[0], lines[0]
    assert lines[1] == f"try 'devio{' ' + cmd if cmd else ''} --help'", lines[1]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_option_is_one_line(cmd):
    usage_error(run(cmd, "--no-such-option", "x"), cmd, "unknown option --no-such-option")
    if cmd != "attach":  # attach's -Q: the nbd-device parser, same words
        usage_error(run(cmd, "-Q"), cmd, "unknown option -Q")


@pytest.mark.parametrize("args,problem", [
    (("serve",), "no SOURCE given"),
    (("serve", "ram:1M"), "no front end given"),
    (("serve", "ram:1M", "ram:2M", "--nbd", "tcp:0"), "more than one SOURCE"),
    (("serve", "ram:1M", "--nbd"), "option --nbd needs an argument"),
    (("serve", "ram:1M", "--size", "12Q", "--nbd", "tcp:0"), "--size: bad size '12Q'"),
    (("serve", "ram:1M", "--size", "20E", "--nbd", "tcp:0"), "'20E' is too large"),
    (("serve", "ram:1M", "--partition", "0", "--nbd", "tcp:0"), "--partition: want 1..128"),
    (("info",), "want one URI or IMAGE"),
    (("info", "a", "b"), "want one URI or IMAGE"),
    (("cat", "x", "--offset", "99999999999999999999"), "too large"),
    (("write",), "want one URI or IMAGE"),
    (("copy", "a"), "want SRC and DST"),
    (("copy", "a", "b", "--block-size", "1"), "--block-size: want 512..64M"),
    (("convert", "-O", "vmdk", "a", "b"), "want raw, vhd or qcow2"),
    (("convert", "a"), "want SRC and DST"),
    (("attach", "devio://127.0.0.1:1"), "want --fuse MOUNTPOINT"),
    (("detach",), "want one MOUNTPOINT or device"),
    (("status", "extra"), "unexpected argument 'extra'"),
    (("list",), "want one URI"),
    (("list", "ram:1M"), "is no server URI"),
])
def test_usage_errors_name_the_problem(args, problem):
    usage_error(run(*args), args[0], problem)


def test_top_level_usage_errors():
    usage_error(run(), None, "no command given")
    usage_error(run("frobnicate"), None, "unknown command 'frobnicate'")
    r = run("--help")
    assert "Exit status: 0 done, 1 failed" in r.stdout and "2 usage error" in r.stdout


def test_imdisk_command_line_keeps_its_usage():
    """ImDisk's devio prints its usage for a bad command line (cli/imdisk.c)."""
    r = run("9000")
    assert r.returncode == 2 and "tcp-port|commdev diskdev" in r.stderr


# ---- numbers: decimal, fractions, too large; ports ----



@pytest.mark.parametrize("spec,size", [
    ("ram:010M", 10 << 20),      # decimal, never octal
    ("ram:1.5G", 3 << 29),       # a fraction, as qemu-img takes it
    ("ram:0.5K", 512),
    ("ram:64KiB", 64 << 10),
    ("ram:0x100000", 1 << 20),   # hex only with 0x
])
def test_sizes_are_decimal(spec, size):
    r = run("info", "--json", spec)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["size"] == size
    if shutil.which("qemu-img") and not spec.endswith("0x100000") and "KiB" not in spec:
        # the same numbers as qemu-img's
        q = subprocess.run(["qemu-img", "create", "-f", "raw", "/dev/null", spec[4:]], capture_output=True,
                           text=True, timeout=30)
        assert f"size={size}" in q.stdout, q.stdout + q.stderr


@pytest.mark.parametrize("spec,problem", [
    ("ram:99999999999999999999", "too large"),
    ("ram:16E", "too large"),
    ("ram:1.5", "bad"),           # a fraction of a byte
    ("ram:010Q", "bad"),
])
def test_bad_sizes_are_named(spec, problem):
    one_error(run("info", spec), spec, problem)


@pytest.mark.parametrize("fe", ["--nbd", "--devio"])
def test_port_out_of_range_is_named(fe):
    usage_error(run("serve", "ram:1M", fe, "tcp:localhost:99999"), "serve", "port out of range")
    usage_error(run("serve", "ram:1M", fe, "tcp:localhost:65536"), "serve", "port out of range")


@pytest.mark.parametrize("args,problem", [
    (("--nbd", "stdio"), "--nbd stdio: want tcp:[HOST:]PORT, unix:PATH or systemd[:NAME]"),
    (("--devio", "tcp:9000,max-transfer=1"), "bad option 'max-transfer=1'"),
])
def test_bad_front_end_argument_is_a_usage_error(args, problem):
    usage_error(run("serve", "ram:1M", *args), "serve", problem)


@pytest.mark.parametrize("cmd", [("info",), ("cat",), ("serve", "--nbd", "tcp:0")])
def test_unknown_uri_scheme_is_unsupported(cmd, scratch):
    r = subprocess.run([DEVIO, cmd[0], "foo://host/x", *cmd[1:]], capture_output=True, text=True, timeout=30,
                       cwd=scratch)
    one_error(r, "unsupported URI scheme 'foo'")
    assert "No such file" not in r.stderr


# ---- options with no effect are warnings ----

def warnings_of(r):
    return [l for l in r.stderr.splitlines() if l.startswith("devio: warning:")]


@pytest.mark.parametrize("extra,source,want", [
    (["--loop"], "ram:1M", "--loop has no effect without --fuse"),
    (["--ram-max", "1M"], "FILE", "--ram-max has no effect: no source is a RAM disk"),
    (["--export", "b=ram:1M"], "ram:1M", "--export b has no effect without --nbd"),
    (["--direct"], "ram:1M", "--direct has no effect: no source is an image file"),
    (["--ceph-id", "admin"], "ram:1M", "--ceph-* options have no effect"),
])
def test_options_without_effect_warn(scratch, extra, source, want):
    if source == "FILE":
        source = os.path.join(scratch, "f.img")
        with open(source, "wb") as f:
            f.truncate(1 << 20)
    # --run true: started, every front end ready, and gone again
    r = run("serve", source, "--devio", f"unix:{scratch}/s.sock", *extra, "--run", "true")
    assert r.returncode == 0, r.stderr
    assert [w for w in warnings_of(r) if want in w], r.stderr
    assert len(warnings_of(r)) == 1, r.stderr


def test_duplicate_export_names_warn(scratch):
    r = run("serve", "ram:1M", "--nbd", f"unix:{scratch}/s.sock", "--export", "a=ram:1M", "--export",
            "a=ram:2M", "--run", "true")
    assert r.returncode == 0, r.stderr
    assert warnings_of(r) == ["devio: warning: --export a: the name is given twice; clients reach only the "
                              "first (ram:1M)"], r.stderr


def test_no_warning_when_everything_counts(scratch):
    r = run("serve", "ram:1M", "--nbd", f"unix:{scratch}/s.sock", "--export", "b=ram:1M", "--ram-max", "1M",
            "--run", "true")
    assert r.returncode == 0 and warnings_of(r) == [], r.stderr
