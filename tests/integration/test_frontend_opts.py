"""test_frontend_opts.py - each front end's options on the command line:
`devio serve --help` lists them under their front end, an option no named
front end takes is a warning, an unknown option is still a usage error."""
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import DEVIO


def run(*args, stdin=subprocess.DEVNULL):
    return subprocess.run([DEVIO, *args], stdin=stdin, capture_output=True, text=True, timeout=30)


@pytest.fixture
def scratch():
    d = tempfile.mkdtemp(prefix="devio-feopts-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def help_groups(text):
    """{front end: [its option lines]} from the front-end part of --help."""
    groups, current = {}, None
    for line in text.splitlines():
        if line.startswith("export options"):
            break
        if line.startswith("  --"):
            current = line.split()[0].split("[")[0]
            groups[current] = []
        elif line.startswith("    --") and current:
            groups[current].append(line.split()[0].split("[")[0])
    return groups


def test_serve_help_lists_each_front_ends_options():
    r = run("serve", "--help")
    assert r.returncode == 0, r.stderr
    groups = help_groups(r.stdout)
    listen = ["--allow", "--socket-mode", "--socket-group", "--max-connections", "--handshake-timeout",
              "--idle-timeout", "--stall-timeout"]  # lib/listener.c's, declared by both socket front ends
    assert groups == {
        "--devio": listen + ["--tls-certificates", "--tls-psk", "--tls-verify-peer", "--tls-priority"],
        "--nbd": ["--depth", "--tls", "--tls-certificates", "--tls-psk", "--tls-verify-peer", "--tls-priority"] + listen,
        "--fuse": ["--loop", "--fuse-transport", "--depth", "--block-size", "--fuse-enable-uring", "--fuse-timeout",
                   "--fuse-mode", "--allow-other"],
        "--ublk": ["--queues", "--depth", "--block-size", "--recovery", "--recover", "--max-io", "--ublk-copy", "--ublk-batch"],
    }, r.stdout
    # every option the help listed before front ends owned them
    for opt in ("--readonly", "--offset", "--size", "--partition", "--ram-max", "--direct", "--format",
                "--export", "--threads", "--verbose", "--quiet",
                "--fork", "--foreground", "--pidfile", "--exit-with-parent", "--run", "--log", "--user"):
        assert opt in r.stdout, opt


def test_attach_help_lists_the_fuse_options():
    r = run("attach", "--help")
    assert r.returncode == 0, r.stderr
    assert help_groups(r.stdout)["--fuse"] == ["--loop", "--fuse-transport", "--depth", "--block-size",
                                               "--fuse-enable-uring", "--fuse-timeout", "--fuse-mode",
                                               "--allow-other"]
    assert "--threads" in r.stdout and "--fork" in r.stdout and "--log" in r.stdout
    assert "--queues" in help_groups(r.stdout)["--ublk"]  # attach --ublk: the ublk front end's options
    assert "--timeout SECONDS" in r.stdout


def warnings_of(stderr):
    return [l for l in stderr.splitlines() if l.startswith("devio: warning:")]


def test_option_without_its_front_end_is_a_warning():
    # a stdio session ends when stdin does: the server exits 0 by itself
    r = run("serve", "ram:1M", "--devio", "stdio", "--loop", "--depth", "8", "--queues", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(warnings_of(r.stderr)) == [
        "devio: warning: --depth has no effect without --nbd, --fuse or --ublk",
        "devio: warning: --loop has no effect without --fuse",
        "devio: warning: --queues has no effect without --ublk",
    ], r.stderr


def test_option_of_a_named_front_end_is_not_a_warning(serve, scratch):
    sock = os.path.join(scratch, "nbd.sock")
    s = serve("ram:1M", "--nbd", f"unix:{sock}", "--depth", "8", "--threads", "2")
    s.wait_unix(sock)
    assert s.stop() == 0
    assert warnings_of(s.stderr()) == [], s.stderr()


def test_serving_option_is_never_a_warning():
    r = run("serve", "ram:1M", "--devio", "stdio", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert warnings_of(r.stderr) == [], r.stderr


def test_bad_value_of_an_unused_option_is_still_an_error():
    r = run("serve", "ram:1M", "--devio", "stdio", "--depth", "lots")
    assert r.returncode == 2
    assert "--depth: bad number 'lots'" in r.stderr


@pytest.mark.parametrize("args,problem", [
    (("serve", "ram:1M", "--devio", "stdio", "--no-such-option"), "unknown option --no-such-option"),
    (("serve", "ram:1M", "--nbd", "tcp:0", "--loop=yes"), "option --loop takes no argument"),
    (("serve", "ram:1M", "--fuse"), "option --fuse needs an argument"),
    (("attach", "devio://127.0.0.1:1", "--fuse", "/tmp", "--devio", "tcp:0"), "unknown option --devio"),
    (("attach", "devio://127.0.0.1:1", "--no-such-option"), "unknown option --no-such-option"),
])
def test_unknown_option_is_a_usage_error(args, problem):
    """One line naming the problem, one pointing at the command's help."""
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"devio: error: {args[0]}: {problem}", f"try 'devio {args[0]} --help'"]


def test_attach_option_of_its_front_end_is_parsed(scratch):
    """attach parses --fuse-transport through the FUSE front end's table."""
    r = run("attach", "devio://127.0.0.1:1", "--fuse", scratch, "--fuse-transport", "carrier-pigeon")
    assert r.returncode == 2
    assert "--fuse-transport: want auto, uring or dev, got 'carrier-pigeon'" in r.stderr
