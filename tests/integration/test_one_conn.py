"""test_one_conn.py - the devio:// client against a server that accepts one
connection and then stops listening, as ImDisk's devio does
(one_conn_server.py, written from the protocol's definition): parallel
requests from a re-export (qemu-img convert -m 8 over NBD) and from the
kernel (mkfs.ext4 and fsck through attach --fuse --loop) wait for the one
connection instead of failing with "Connection refused"."""
import os
import subprocess
import sys

import pytest

from conftest import DEVIO, run_ok, wait_for
from test_attach import attach, scratch  # noqa: F401 (fixture)
from test_fuse import MiB, is_mounted, loop_exists

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def one_conn(tmp_path):
    """one_conn(image, *opts) starts the server; returns (uri, process)."""
    procs = []

    def start(image, *opts):
        portfile = str(tmp_path / f"port{len(procs)}")
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "one_conn_server.py"), portfile, image, *opts],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        wait_for(lambda: os.path.exists(portfile) or p.poll() is not None, 10, "server port")
        assert p.poll() is None, p.stderr.read()
        with open(portfile) as f:
            return f"devio://127.0.0.1:{f.read()}", p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()


def test_reexport_with_parallel_requests(serve, one_conn, tmp_path):
    img, src, out = tmp_path / "img", tmp_path / "src", tmp_path / "out"
    img.write_bytes(bytes(32 * MiB))
    src.write_bytes(os.urandom(32 * MiB))
    uri, p = one_conn(str(img))
    sock = str(tmp_path / "nbd.sock")
    s = serve(uri, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    nbd = f"nbd+unix:///?socket={sock}"
    run_ok("qemu-img", "convert", "-m", "8", "-W", "-n", "-f", "raw", "-O", "raw", str(src), nbd, timeout=300)
    run_ok("qemu-img", "convert", "-m", "8", "-f", "raw", "-O", "raw", nbd, str(out), timeout=300)
    assert out.read_bytes() == src.read_bytes()
    assert "using the 1 it accepted" in s.stderr(), s.stderr()
    assert s.stop() == 0
    p.wait(timeout=30)  # our CLOSE ended its one session
    assert img.read_bytes() == src.read_bytes()


def test_attach_mkfs_fsck(scratch, one_conn):  # noqa: F811
    img = scratch.path("img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    uri, p = one_conn(img)
    mnt, dev = attach(scratch, uri)
    # many requests at once from the kernel, checked
    run_ok("fio", "--name=par", f"--filename={dev}", "--rw=randwrite", "--bs=64k", "--iodepth=16",
           "--ioengine=libaio", "--direct=1", "--size=16M", "--verify=crc32c", "--verify_state_save=0",
           "--output=/dev/null", timeout=300)
    run_ok("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev, timeout=300)
    run_ok("fsck.ext4", "-n", "-f", dev, timeout=300)
    run_ok(DEVIO, "detach", mnt, timeout=60)
    assert not is_mounted(mnt)
    wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")
    p.wait(timeout=30)
    # the image outside holds the file system the kernel wrote
    run_ok("fsck.ext4", "-n", "-f", img, timeout=300)
    with open(scratch.path("attach.log")) as f:
        log = f.read()
    assert "cannot connect" not in log and "Input/output error" not in log, log


def test_size_zero_needs_size_option(one_conn, tmp_path):
    """ImDisk's devio on a Linux block device says size 0: every client
    command takes --size, as serve does."""
    img = tmp_path / "img"
    data = os.urandom(2 * MiB)
    img.write_bytes(data)
    uri, _ = one_conn(str(img), "--size-zero")
    r = subprocess.run([DEVIO, "info", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "give it with --size" in r.stderr, r.stderr
    uri, _ = one_conn(str(img), "--size-zero")
    assert "size: 2097152" in run_ok(DEVIO, "info", "--size", "2M", uri)
    uri, _ = one_conn(str(img), "--size-zero")
    r = subprocess.run([DEVIO, "cat", "--size", "2M", "--offset", "1M", "--length", "4096", uri],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout == data[MiB:MiB + 4096], r.stderr
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 * MiB))
    uri, p = one_conn(str(img), "--size-zero")
    run_ok(DEVIO, "copy", "--size", "2M", str(src), uri)
    p.wait(timeout=30)
    assert img.read_bytes() == src.read_bytes()


def test_chunk_for_a_small_buffer(one_conn, tmp_path):
    """A server with buffersize 64K exits on a larger WRITE (as ImDisk's
    devio does): ?chunk=64K keeps every request within it."""
    img, src = tmp_path / "img", tmp_path / "src"
    img.write_bytes(bytes(2 * MiB))
    src.write_bytes(os.urandom(2 * MiB))
    uri, p = one_conn(str(img), "--buffersize", "65536")
    r = subprocess.run([DEVIO, "copy", str(src), uri], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # 1 MiB writes: the server gave up
    p.wait(timeout=30)
    assert b"over the 65536-byte buffer" in p.stderr.read()
    uri, p = one_conn(str(img), "--buffersize", "65536")
    run_ok(DEVIO, "copy", str(src), uri + "?chunk=64K")
    p.wait(timeout=30)
    assert p.returncode == 0 and img.read_bytes() == src.read_bytes()
    for bad in ("?chunk=100", "?chunk=128M", "?chunk=x", "?size=1"):
        r = subprocess.run([DEVIO, "info", "devio://127.0.0.1:1" + bad], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "want chunk=N" in r.stderr, r.stderr


def test_attach_size_zero_server(scratch, one_conn):  # noqa: F811
    img = scratch.path("img")
    data = os.urandom(8 * MiB)
    with open(img, "wb") as f:
        f.write(data)
    uri, p = one_conn(img, "--size-zero")
    mnt, dev = attach(scratch, uri, "--size", "8M")
    with open(dev, "rb") as f:
        assert f.read() == data
    run_ok(DEVIO, "detach", mnt, timeout=60)
    wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")
