"""test_package.py - the Debian package as a user gets it: debian/ builds
out of tree (a copy of the worktree without build directories) with
`dpkg-buildpackage -b -us -uc`, lintian finds no error, `dpkg -i` installs
devio and libdevio-dev, the installed /usr/bin/devio serves an image that
nbdinfo and qemu-img read and write, a program builds against the installed
headers and libdevio.a, no unit is enabled, and `dpkg --purge` removes it
all again (always, in the fixture's finally).  Needs root; a missing tool
is a failure (scripts/deps.sh installs debhelper, dpkg-dev, lintian,
scdoc).  About 90 s, most of it the build."""
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import ROOT, free_port, run_ok, wait_for

PACKAGES = ("devio", "libdevio-dev")
TOOLS = ("dpkg-buildpackage", "dh", "lintian", "scdoc", "dpkg", "nbdinfo", "qemu-img", "cc", "pkg-config")


def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def dpkg(*args):
    """dpkg, waiting while another dpkg or apt holds its lock."""
    end = time.monotonic() + 120
    while True:
        r = subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode == 0 or "lock" not in r.stderr or time.monotonic() > end:
            return r
        time.sleep(2)


def copy_tree(dst):
    """The worktree as it is (uncommitted changes too), without build
    output: what `git archive` would give plus the edits under test."""
    def skip(d, names):
        top = os.path.abspath(d) == ROOT
        return [n for n in names if n in (".git", "__pycache__", ".pytest_cache")
                or (top and n.startswith("build"))]
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    """Build the packages out of tree: {package: path of its .deb}, and lintian's output."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    assert not missing, f"missing tools {missing} (scripts/deps.sh installs them)"
    assert os.geteuid() == 0, "needs root (dpkg -i)"
    work = tmp_path_factory.mktemp("deb")
    src = work / "devio"
    copy_tree(src)
    env = dict(os.environ, DEB_BUILD_OPTIONS=f"parallel={os.cpu_count() or 2} noddebs nocheck")
    r = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, f"dpkg-buildpackage failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    out = {}
    for f in os.listdir(work):
        m = re.match(r"^([a-z0-9.+-]+)_[^_]+_[a-z0-9]+\.deb$", f)
        if m:
            out[m.group(1)] = str(work / f)
    changes = [str(work / f) for f in os.listdir(work) if f.endswith(".changes")]
    lint = subprocess.run(["lintian", "--info", *changes], capture_output=True, text=True, timeout=300)
    return out, lint.stdout + lint.stderr


@pytest.fixture(scope="module")
def installed_debs(debs):
    """dpkg -i both packages; purged again whatever happens."""
    found, _ = debs
    already = [p for p in PACKAGES if installed(p)]
    assert not already, f"{already} already installed on this machine: not touching it"
    assert not os.path.exists("/usr/bin/devio"), "/usr/bin/devio exists outside the package: not touching it"
    try:
        r = dpkg("-i", *(found[p] for p in PACKAGES))
        assert r.returncode == 0, f"dpkg -i: {r.stdout}\n{r.stderr}"
        yield found
    finally:
        r = dpkg("--purge", *PACKAGES)
        assert r.returncode == 0, f"dpkg --purge: {r.stdout}\n{r.stderr}"
        assert not any(installed(p) for p in PACKAGES)
        assert not os.path.exists("/usr/bin/devio"), "purge left /usr/bin/devio"


def test_builds_both_packages(debs):
    found, _ = debs
    assert set(PACKAGES) <= set(found), f"built {sorted(found)}"


def test_lintian_finds_no_error(debs):
    _, lint = debs
    print("lintian:\n" + lint)  # warnings are allowed; pytest -s shows them
    errors = [l for l in lint.splitlines() if l.startswith("E:")]
    assert not errors, "lintian errors:\n" + "\n".join(errors)


def test_version_is_the_project_version():
    meson = open(os.path.join(ROOT, "meson.build")).read()
    version = re.search(r"version: '([^']+)'", meson).group(1)
    top = open(os.path.join(ROOT, "debian", "changelog")).readline()
    assert re.match(rf"^devio \({re.escape(version)}(-\d+)?\) ", top), \
        f"debian/changelog's '{top.strip()}' is not meson's version {version}"


def test_installed_files(installed_debs):
    files = set(run_ok("dpkg", "-L", "devio").split())
    pages = [f[:-len(".scd")] for f in os.listdir(os.path.join(ROOT, "docs", "man")) if f.endswith(".scd")]
    want = {"/usr/bin/devio", "/usr/lib/systemd/system/devio@.service",
            "/usr/lib/systemd/system/devio@.socket", "/usr/lib/systemd/system/devio-ublk-recover@.service",
            "/usr/share/bash-completion/completions/devio"}
    want |= {f"/usr/share/man/man1/{p}.gz" for p in pages}
    assert want <= files, f"not in the devio package: {sorted(want - files)}"
    assert run_ok("/usr/bin/devio", "--version").strip() == "devio " + \
        re.search(r"version: '([^']+)'", open(os.path.join(ROOT, "meson.build")).read()).group(1)
    # the installed page is what man finds, and it renders
    assert run_ok("man", "-w", "devio-serve").strip() == "/usr/share/man/man1/devio-serve.1.gz"
    # the unit's ExecStart is the installed binary
    unit = open("/usr/lib/systemd/system/devio@.service").read()
    assert "ExecStart=/usr/bin/devio serve " in unit
    dev = set(run_ok("dpkg", "-L", "libdevio-dev").split())
    assert {"/usr/include/devio/plugin.h", "/usr/include/devio/backend.h"} <= dev
    assert any(f.endswith("/libdevio.a") for f in dev) and any(f.endswith("/devio.pc") for f in dev)


def test_units_are_not_enabled(installed_debs):
    """devio@.service is a template and devio@.socket an example: the
    package enables and starts nothing."""
    enabled = []
    for d in ("/etc/systemd/system", "/usr/lib/systemd/system"):
        for dirpath, _, names in os.walk(d):
            if dirpath.endswith((".wants", ".requires")):
                enabled += [os.path.join(dirpath, n) for n in names if n.startswith("devio")]
    assert not enabled, f"enabled on install: {enabled}"


def test_installed_devio_serves(installed_debs, tmp_path):
    """The demo from the installed files: serve an image over NBD with
    /usr/bin/devio, write it with qemu-img, read it back with nbdinfo and
    qemu-img compare."""
    img, data = tmp_path / "disk.img", tmp_path / "data.img"
    img.write_bytes(b"\0" * (4 << 20))
    data.write_bytes(os.urandom(1 << 20) + b"\0" * (3 << 20))
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["/usr/bin/devio", "serve", str(img), "--nbd", f"tcp:127.0.0.1:{port}"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        uri = f"nbd://127.0.0.1:{port}"
        wait_for(lambda: subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0
                 or proc.poll() is not None, 20, "the installed devio serving")
        assert proc.poll() is None, open(tmp_path / "serve.log").read()
        assert run_ok("nbdinfo", "--size", uri).strip() == str(4 << 20)
        run_ok("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(data), uri)
        run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", str(data), uri)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, open(tmp_path / "serve.log").read()
    assert img.read_bytes() == data.read_bytes()


def test_program_builds_against_libdevio_dev(installed_debs, tmp_path):
    """libdevio-dev is enough to build and run a program with libdevio."""
    src = tmp_path / "ramsize.c"
    src.write_text(r'''/* ramsize.c - opens ram:1M through the installed libdevio */
#include <stdio.h>
#include <string.h>
#include <devio/backend.h>
#include <devio/layer.h>
int main(void)
{
	struct devio_open_opts o;
	struct devio_backend *b;
	char buf[512];

	memset(&o, 0, sizeof(o));
	if (devio_backend_open("ram:1M", &o, &b))
		return 1;
	if (devio_layer_write(b, "devio", 5, 4096, 0) || devio_layer_read(b, buf, sizeof(buf), 4096))
		return 1;
	printf("%llu %.5s\n", (unsigned long long)b->size, buf);
	devio_backend_close(b);
	return 0;
}
''')
    flags = run_ok("pkg-config", "--static", "--cflags", "--libs", "devio").split()
    exe = tmp_path / "ramsize"
    run_ok("cc", "-o", str(exe), str(src), *flags)
    assert run_ok(str(exe)).strip() == f"{1 << 20} devio"
