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
