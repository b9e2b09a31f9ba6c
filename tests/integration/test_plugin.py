"""test_plugin.py - plugin backends (include/devio/plugin.h, backends/plugin.c):
the example plugin built out of the tree against the INSTALLED headers
(meson install --destdir, pkg-config devio) and served over NBD (nbdcopy,
qemu-img compare) and FUSE with a loop device (mkfs.ext4, fsck); a plugin
that breaks the rules gets clear errors, never a crash; ImDisk's --dll
line with an ImDisk-style dllopen procedure."""
import glob
import struct
import os
import subprocess

import pytest

from conftest import DEVIO, ROOT, run_ok, wait_for
from test_fuse import scratch, start_fuse, stop_and_check_gone  # noqa: F401 (fixture)

MiB = 1 << 20
BUILD = os.path.dirname(DEVIO)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """devio installed into a temp dir; its pkg-config environment."""
    dest = str(tmp_path_factory.mktemp("destdir"))
    run_ok("meson", "install", "-C", BUILD, "--destdir", dest, "--quiet", timeout=600)
    pcs = glob.glob(os.path.join(dest, "**", "pkgconfig", "devio.pc"), recursive=True)
    assert pcs, "meson install put no devio.pc into the destdir"
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pcs[0]), PKG_CONFIG_SYSROOT_DIR=dest)
    return dest, env


def build_plugin(installed, src, out):
    dest, env = installed
    cflags = run_ok_env(env, "pkg-config", "--cflags", "devio").split()
    incs = [f[2:] for f in cflags if f.startswith("-I")]
    assert incs and all(i.startswith(dest) for i in incs), cflags
    assert os.path.exists(os.path.join(incs[0], "devio", "plugin.h"))
    run_ok("cc", "-shared", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror", "-o", out, src, *cflags)
    return out


def run_ok_env(env, *args):
    r = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def memdisk(installed, tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    return build_plugin(installed, os.path.join(ROOT, "plugins", "example", "memdisk.c"),
                        str(d / "libdevio-memdisk.so"))


@pytest.fixture(scope="module")
def bad(installed, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return build_plugin(installed, os.path.join(ROOT, "tests", "integration", "plugins", "bad_plugin.c"),
                        str(d / "libbad.so"))


def nbd_uri(sock):
    return f"nbd+unix:///?socket={sock}"


def nbd_try(sock, fn):
    """Run fn(handle) on a libnbd connection; the nbd.Error it raised, or None."""
    import nbd
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(nbd_uri(sock))
    try:
        fn(h)
        return None
    except nbd.Error as e:
        return e
    finally:
        h.shutdown()


def test_out_of_tree_plugin_over_nbd(serve, memdisk, tmp_path):
    sock = str(tmp_path / "m.sock")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3 * MiB) + bytes(5 * MiB) + os.urandom(MiB))
    s = serve(f"plugin:{memdisk}:9M", "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    info = run_ok("nbdinfo", nbd_uri(sock))
    assert "export-size: 9437184" in info and "can_trim: true" in info, info
    run_ok("nbdcopy", str(data), nbd_uri(sock))
    run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", str(data), nbd_uri(sock))
    # the plugin's extents reach the client: the zero megabytes written
    # were stored (data), the never-written tail past them is not
    assert nbd_try(sock, lambda h: h.trim(4 * MiB, 4 * MiB)) is None
    m = run_ok("nbdinfo", "--map", nbd_uri(sock))
    assert "hole,zero" in m, m
    run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", str(data), nbd_uri(sock))
    assert s.stop() == 0, s.stderr()


def test_out_of_tree_plugin_over_fuse_loop(serve, scratch, memdisk):  # noqa: F811
    s, _, dev = start_fuse(serve, scratch, f"plugin:{memdisk}:64M", "dev")
    run_ok("mkfs.ext4", "-q", "-F", dev)
    run_ok("fsck.ext4", "-n", "-f", dev)
    stop_and_check_gone(s, scratch, dev)


@pytest.mark.parametrize("mode,what", [
    ("short", "moved 2048 of 4096 bytes"),
    ("long", "moved 8192 of 4096 bytes"),
    ("errno", "returned -99999, not a negative errno"),
])
def test_bad_reads_are_io_errors(serve, bad, tmp_path, mode, what):
    sock = str(tmp_path / "b.sock")
    s = serve(f"plugin:{bad}:{mode}", "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    e = nbd_try(sock, lambda h: h.pread(4096, 0))
    assert e is not None and "Input/output error" in str(e), e
    # the server lives on and says what the plugin did
    assert s.proc.poll() is None
    assert f"read at offset 0 {what}" in s.stderr(), s.stderr()
    assert s.stop() == 0


def test_bad_write_flush_extents(serve, bad, tmp_path):
    sock = str(tmp_path / "b.sock")
    s = serve(f"plugin:{bad}:errno", "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    e = nbd_try(sock, lambda h: h.pwrite(b"x" * 512, 0))
    assert e is not None and "Input/output error" in str(e), e
    assert "write at offset 0 returned -5000" in s.stderr()
    s.stop()
    for mode, cmd, what in [("flushret", lambda h: h.flush(), "flush at offset 0 returned 7"),
                            ("extents", lambda h: h.block_status(65536, 0, lambda *a: 0),
                             "extents: extent 4096+4096")]:
        sock = str(tmp_path / f"{mode}.sock")
        s = serve(f"plugin:{bad}:{mode}", "--nbd", f"unix:{sock}")
        s.wait_unix(sock)
        e = nbd_try(sock, cmd)
        # a failed flush fails the command; failed extents are an error
        # or, where the front end falls back, plain data
        assert e is not None or mode == "extents", mode
        assert what in s.stderr(), s.stderr()
        assert s.proc.poll() is None
        s.stop()


@pytest.mark.parametrize("args,env,what", [
    ("huge", None, "more than 2^63 - 1"),
    ("zero", None, "reports size 0; give the size with --size"),
    ("openpos", None, "open at offset 0 returned 5"),
    ("openfail", None, "open('openfail') failed: No such file or directory"),
    ("good", "null", "devio_plugin_entry returned NULL"),
    ("good", "abi", "built for plugin ABI 99"),
    ("good", "short", "plugin table of 8 bytes is too short"),
    ("good", "noread", "lacks a required callback"),
])
def test_bad_plugins_refused_at_open(bad, args, env, what):
    e = dict(os.environ)
    if env:
        e["BAD_PLUGIN_ENTRY"] = env
    r = subprocess.run([DEVIO, "info", f"plugin:{bad}:{args}"], capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode != 0 and what in r.stderr, r.stderr
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr


def test_missing_library_and_symbol(tmp_path, bad):
    r = subprocess.run([DEVIO, "info", f"plugin:{tmp_path}/nope.so"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot load" in r.stderr, r.stderr
    r = subprocess.run([DEVIO, "info", f"plugin:{bad};no_such_proc:x"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no procedure no_such_proc" in r.stderr, r.stderr


def test_imdisk_dll_line(bad, tmp_path):
    """devio --dll=LIB;PROC commdev diskdev: PROC is ImDisk's dllopen; the
    ImDisk line serves what it opens (here on stdin, an INFO and a READ)."""
    img = tmp_path / "img"
    payload = os.urandom(64 * 1024)
    img.write_bytes(payload)
    import devio_wire
    import socket
    a, b = socket.socketpair()
    with a, b:
        p = subprocess.Popen([DEVIO, f"--dll={bad};imd_open", "-", str(img), "0"], stdin=b,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        b.close()
        try:
            c = devio_wire.Client(sock=a)
            size, _, _ = c.info()
            assert size == len(payload)
            assert c.read(4096, 8192) == (0, payload[4096:12288])
            c.bye()
            _, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, err
    # an MBR with one partition: partition 1 by default, read through the library
    mbr = bytearray(512)
    mbr[446 + 4] = 0x83
    mbr[446 + 8:446 + 16] = struct.pack("<II", 16, 64)
    mbr[510:512] = b"\x55\xaa"
    img.write_bytes(bytes(mbr) + payload[512:])
    r = subprocess.run([DEVIO, f"--dll={bad};imd_open", "-", str(img)], capture_output=True, timeout=60,
                       input=devio_wire.q(devio_wire.INFO) + devio_wire.q(devio_wire.READ, 0, 512) +
                       devio_wire.q(devio_wire.CLOSE))
    assert r.returncode == 0, r.stderr
    assert r.stdout[:8] == devio_wire.q(64 * 512) and r.stdout[40:552] == payload[16 * 512:17 * 512]
    assert b"using partition 1" in r.stderr
    r = subprocess.run([DEVIO, f"--dll={bad};imd_null", "9", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "imd_null" in r.stderr and "failed" in r.stderr, r.stderr
