"""test_completion.py - bash completion (completions/devio) as bash runs it:
COMP_WORDS/COMP_CWORD set, _devio called, COMPREPLY printed.  Subcommands
and options come from the devio under test's own --help, so every option
it prints must be offered; argument choices, file names and the URIs of a
running server are completed too."""
import os
import re
import shlex
import subprocess

import pytest

from conftest import DEVIO, ROOT

COMPLETION = os.path.join(ROOT, "completions", "devio")
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w])")


def complete_all(queries, cwd=None, library=False, prog=DEVIO):
    """What _devio offers for each `devio WORDS...` in queries (the last word
    being the one completed), in one bash as a user's shell runs them one
    after the other; library: with bash-completion's own functions loaded."""
    lines = ['[ -n "$LIB" ] && source "$LIB"', 'source "$COMPLETION"']
    for words in queries:
        lines.append("COMP_WORDS=(" + " ".join(shlex.quote(w) for w in (prog, *words)) + ")")
        lines.append(f"COMP_CWORD={len(words)}; COMPREPLY=(); _devio; "
                     "printf '%s\\n' \"${COMPREPLY[@]}\"; printf '\\036\\n'")
    env = dict(os.environ, COMPLETION=COMPLETION, LIB=BASH_COMPLETION if library else "")
    r = subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\036\n")[:-1]
    assert len(answers) == len(queries), r.stdout
    return [[w for w in a.splitlines() if w] for a in answers]


def complete(*words, cwd=None, library=False):
    return complete_all([words], cwd=cwd, library=library)[0]


def usage(*args):
    r = subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr


def test_bash_completion_installed():
    assert os.path.exists(BASH_COMPLETION), "bash-completion is missing (scripts/deps.sh installs it)"


def test_subcommands():
    listed = re.findall(r"^  devio ([a-z]+)", usage("--help"), re.M)
    assert listed and sorted(complete("")) == sorted(listed)
    assert complete("co") == ["copy", "convert"]


def rejected(form, options, cwd):
    """The options the command form (("serve",), ("attach", "--nbd-device"))
    refuses as unknown: a help may name another command's options in its
    prose ("serve ... --ublk=N --recover" in detach's).  Each is tried before
    --help, so one it takes ends in the help (or takes "--help" as its
    argument and fails on the missing operands), never in doing anything."""
    out = set()
    for opt in options:
        r = subprocess.run([DEVIO, *form, opt, "--help"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL, cwd=cwd)
        if re.search(r"unknown option '?" + re.escape(opt) + r"\b", r.stderr):
            out.add(opt)
    return out


@pytest.mark.parametrize("form", [("serve",), ("attach",), ("detach",), ("info",), ("cat",), ("write",),
                                  ("copy",), ("convert",), ("list",), ("status",), ("attach", "--nbd-device")],
                         ids=" ".join)
def test_every_option_of_the_help_is_offered(form, tmp_path):
    """What is offered is exactly what the help names as this command's own
    options: every one of them, and none the command would refuse."""
    words = (form[0], "nbd://h", *form[1:]) if len(form) > 1 else form
    offered = set(complete(*words, "--"))
    said = set(OPTION.findall(usage(*form, "--help"))) | {"--help", "--version"}  # every command's
    foreign = rejected(form, said | offered, tmp_path)
    assert foreign <= said, f"devio {' '.join(form)}: offered but refused {sorted(foreign - said)}"
    assert said - foreign <= offered, f"devio {' '.join(form)}: not offered {sorted(said - foreign - offered)}"
    assert offered <= said - foreign, f"devio {' '.join(form)}: offered but not its own {sorted(offered - said + foreign)}"


def test_option_prefix_and_choices():
    q = [("serve", "--fuse-t"), ("serve", "x", "--fuse-transport", ""), ("serve", "x", "--format=q"),
         ("convert", "-O", ""), ("serve", "x", "--nbd", ""), ("serve", "x", "--depth", ""),
         ("serve", "x", "--loop", "--")]
    fuse_t, transport, fmt, out_fmt, nbd, depth, after_flag = complete_all(q)
    assert sorted(fuse_t) == ["--fuse-timeout", "--fuse-transport"]
    assert transport == ["auto", "uring", "dev"]
    assert fmt == ["qcow2"]
    assert out_fmt == ["raw", "vhd", "qcow2"]
    assert nbd == ["tcp:", "unix:", "systemd"]
    # an option that takes a number offers nothing; one without an argument
    # does not swallow the next word
    assert depth == []
    assert "--nbd" in after_flag


def test_file_arguments(tmp_path):
    (tmp_path / "disk.img").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    q = [("serve", "dis"), ("serve", "x", "--log", ""), ("serve", "x", "--nbd", "unix:di"),
         ("serve", "x", "--export", "b=dis"), ("serve", "x", "--fuse", "")]
    source, log, unix, export, fuse = complete_all(q, cwd=tmp_path)
    assert source == ["disk.img"]
    assert {"disk.img", "dir", "stderr", "syslog", "journal"} <= set(log)
    assert sorted(unix) == ["unix:dir", "unix:disk.img"]
    assert export == ["b=disk.img"]
    assert fuse == ["dir"]
    # with bash-completion's _filedir as a user's shell has it
    fuse, dst = complete_all([("serve", "x", "--fuse", ""), ("copy", "disk.img", "d")], cwd=tmp_path, library=True)
    assert fuse == ["dir"]
    # a SRC or DST: files and the URI schemes (and the URIs of servers that
    # happen to run on this machine, `devio status`'s, which are not ours)
    ours = {w for w in dst if not re.match(r"devio(\+\w+)?://.", w)}
    assert {"dir", "disk.img", "devio://", "devio+tls://", "devio+unix://", "devio+shm://"} == ours, dst


def test_running_servers_uris(serve, tmp_path):
    sock = str(tmp_path / "s.sock")
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 65536)
    s = serve(str(img), "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    attach, info = complete_all([("attach", ""), ("info", "nbd+")])
    assert f"nbd+unix:///?socket={sock}" in attach
    assert f"nbd+unix:///?socket={sock}" in info


def test_help_is_read_once_per_shell(tmp_path):
    """A shell asks devio for its usage once, not at every TAB."""
    log = tmp_path / "calls"
    wrapper = tmp_path / "devio"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >>{log}\nexec {DEVIO} "$@"\n')
    wrapper.chmod(0o755)
    answers = complete_all([("se",), ("serve", "--d"), ("serve", "--n"), ("serve", "x", "--fuse-transport", "")],
                           prog=str(wrapper))
    assert answers[0] == ["serve"] and "--depth" in answers[1] and "--nbd" in answers[2]
    assert log.read_text().splitlines() == ["--help", "serve --help"]
