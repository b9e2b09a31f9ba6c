"""test_docs.py - the man pages (docs/man/*.scd): each renders with scdoc and
`man -l` without a warning, every subcommand `devio --help` lists has its
page, and every long option a command's help prints is in that command's
page, so the pages stay true as options are added.  A missing tool (scdoc,
man) is a failure: scripts/deps.sh installs them."""
import functools
import os
import re
import shutil
import subprocess

import pytest

from conftest import DEVIO, ROOT

MAN_DIR = os.path.join(ROOT, "docs", "man")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w])")


def pages():
    return sorted(f[:-len(".1.scd")] for f in os.listdir(MAN_DIR) if f.endswith(".1.scd"))


def help_text(*args):
    """What devio says for args, on stdout and stderr, whatever its exit
    status (a usage printed on error counts: it is what a user reads)."""
    r = subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert "usage" in out, f"devio {' '.join(args)} printed no usage:\n{out}"
    return out


@functools.lru_cache(maxsize=None)
def subcommands():
    """The commands `devio --help` lists ("  devio NAME ...")."""
    return tuple(re.findall(r"^  devio ([a-z][a-z-]*)\b", help_text("--help"), re.M))


def help_sources(page):
    """The invocations whose usage text page must cover."""
    if page == "devio":
        # the command list, and ImDisk's command line (its usage comes with
        # a line it cannot take: a port without an image)
        return [("--help",), ("9000",)]
    cmd = page[len("devio-"):]
    # the kernel nbd form has its own usage (`devio attach --help` points at it;
    # its usage errors say "try 'devio attach --nbd-device --help'")
    extra = {"attach": [("attach", "--nbd-device", "--help")]}
    return [(cmd, "--help")] + extra.get(cmd, [])


def page_options(page):
    """The long options a page names (scdoc's * and _ marks removed)."""
    text = open(os.path.join(MAN_DIR, page + ".1.scd")).read().replace("*", "").replace("_", "")
    return set(OPTION.findall(text))


def test_tools_present():
    for tool in ("scdoc", "man"):
        assert shutil.which(tool), f"{tool} is missing (scripts/deps.sh installs it)"


@pytest.mark.parametrize("page", pages())
def test_page_renders_without_warnings(page, tmp_path):
    with open(os.path.join(MAN_DIR, page + ".1.scd"), "rb") as src:
        r = subprocess.run(["scdoc"], stdin=src, capture_output=True, timeout=30)
    assert r.returncode == 0, f"scdoc {page}.1.scd: {r.stderr.decode()}"
    out = tmp_path / (page + ".1")
    out.write_bytes(r.stdout)
    env = dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    w = subprocess.run(["man", "--warnings", "-l", str(out)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert w.returncode == 0 and w.stderr == "", f"man --warnings -l {page}.1:\n{w.stderr}"
    text = subprocess.run(["man", "-l", str(out)], capture_output=True, text=True, env=env,
                          timeout=30, check=True).stdout
    # the page is what it says: its name line, a synopsis naming the command
    assert re.search(rf"^NAME\n\s+{re.escape(page)} - \S", text, re.M), text[:400]
    assert re.search(r"^SYNOPSIS\n\s+devio", text, re.M), text[:800]
    assert max(len(line) for line in text.splitlines()) <= 80


def test_every_subcommand_has_a_page():
    missing = [f"devio-{c}(1) (docs/man/devio-{c}.1.scd)" for c in subcommands()
               if f"devio-{c}" not in pages()]
    assert not missing, "subcommands without a man page: " + ", ".join(missing)


def test_every_page_is_a_command():
    commands = set(subcommands())
    stale = [p for p in pages() if p != "devio" and p[len("devio-"):] not in commands]
    assert not stale, f"pages of commands `devio --help` does not list: {stale}"


def test_every_option_is_documented():
    """Each long option in a command's usage appears in its page; the
    failure lists every missing option of every page at once."""
    missing = {}
    for page in pages():
        if page != "devio" and page[len("devio-"):] not in subcommands():
            continue
        said = set()
        for args in help_sources(page):
            said |= set(OPTION.findall(help_text(*args)))
        gap = sorted(said - page_options(page))
        if gap:
            missing[page] = gap
    assert not missing, "options missing from the man pages:\n" + "\n".join(
        f"  {p}(1) (docs/man/{p}.1.scd): {' '.join(opts)}" for p, opts in sorted(missing.items()))


def test_meson_builds_every_page():
    """docs/man/meson.build lists every page, so `meson install` ships them all."""
    listed = set(re.findall(r"'(devio[a-z-]*)'", open(os.path.join(MAN_DIR, "meson.build")).read()))
    assert listed == set(pages()), f"meson.build lists {sorted(listed)}, docs/man has {pages()}"
