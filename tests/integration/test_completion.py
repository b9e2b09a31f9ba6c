"""test_completion.py - bash completion (completions/devio) as bash runs it:
COMP_WORDS/COMP_CWORD set, _devio called, COMPREPLY printed.  Subcommands
and options come from the devio under test's own --help, so every option
it prints must be offered; argument choices, file names and the URIs of a
running server are completed too."""
import os
import re
import subprocess

import pytest

from conftest import DEVIO, ROOT

COMPLETION = os.path.join(ROOT, "completions", "devio")
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w])")


def complete(*words, cwd=None, library=False):
    """What _devio offers for `devio WORDS...`, the last word being the one
    completed; library: with bash-completion's own functions loaded."""
    script = ('[ -n "$LIB" ] && source "$LIB"; source "$COMPLETION"; '
              'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _devio; printf "%s\\n" "${COMPREPLY[@]}"')
    env = dict(os.environ, COMPLETION=COMPLETION, LIB=BASH_COMPLETION if library else "")
    r = subprocess.run(["bash", "-c", script, "bash", DEVIO, *words], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def usage(*args):
    r = subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr


def test_bash_completion_installed():
    assert os.path.exists(BASH_COMPLETION), "bash-completion is missing (scripts/deps.sh installs it)"


def test_subcommands():
    listed = re.findall(r"^  devio ([a-z]+)", usage("--help"), re.M)
    assert listed and sorted(complete("")) == sorted(listed)
    assert complete("co") == ["copy", "convert"]


@pytest.mark.parametrize("cmd", ["serve", "attach", "detach", "info", "cat", "write", "copy", "convert"])
def test_every_option_of_the_help_is_offered(cmd):
    offered = set(complete(cmd, "--"))
    said = set(OPTION.findall(usage(cmd, "--help")))
    assert said <= offered, f"devio {cmd}: not offered {sorted(said - offered)}"
    assert offered <= said, f"devio {cmd}: offered but not in --help {sorted(offered - said)}"


def test_option_prefix_and_choices():
    assert sorted(complete("serve", "--fuse-t")) == ["--fuse-timeout", "--fuse-transport"]
    assert complete("serve", "x", "--fuse-transport", "") == ["auto", "uring", "dev"]
    assert complete("serve", "x", "--format=q") == ["qcow2"]
    assert complete("convert", "-O", "") == ["raw", "vhd", "qcow2"]
    assert complete("serve", "x", "--nbd", "") == ["tcp:", "unix:", "systemd"]
    # an option that takes a number offers nothing; one without an argument
    # does not swallow the next word
    assert complete("serve", "x", "--depth", "") == []
    assert "--nbd" in complete("serve", "x", "--loop", "--")


def test_file_arguments(tmp_path):
    (tmp_path / "disk.img").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    assert complete("serve", "dis", cwd=tmp_path) == ["disk.img"]
    assert "disk.img" in complete("serve", "x", "--log", "", cwd=tmp_path)
    assert "journal" in complete("serve", "x", "--log", "", cwd=tmp_path)
    assert sorted(complete("serve", "x", "--nbd", "unix:di", cwd=tmp_path)) == ["unix:dir", "unix:disk.img"]
    assert complete("serve", "x", "--export", "b=dis", cwd=tmp_path) == ["b=disk.img"]
    assert complete("serve", "x", "--fuse", "", cwd=tmp_path) == ["dir"]
    # with bash-completion's _filedir as a user's shell has it
    assert complete("serve", "x", "--fuse", "", cwd=tmp_path, library=True) == ["dir"]
    # a SRC or DST: files and the URI schemes
    got = complete("copy", "disk.img", "d", cwd=tmp_path, library=True)
    assert {"dir", "disk.img", "devio://", "devio+unix://", "devio+shm://"} == set(got), got


def test_running_servers_uris(serve, tmp_path):
    sock = str(tmp_path / "s.sock")
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    s = serve(str(img), "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    assert f"nbd+unix:///?socket={sock}" in complete("attach", "")
    assert f"nbd+unix:///?socket={sock}" in complete("info", "nbd+")
