"""test_rbd.py - the rbd: backend against a real one-node Ceph cluster
(tests/ceph/cluster.sh: a monitor and a memstore OSD on loopback, started
once for this file and stopped on every path), checked with Ceph's own
`rbd` tool, qemu's rbd driver, libnbd's tools and the kernel (FUSE + loop,
mkfs, fsck)."""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import DEVIO, run_ok, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "tests", "ceph", "cluster.sh")
MiB = 1 << 20


@pytest.fixture(scope="module")
def ceph():
    """The cluster (started once for this file): yields the path of its
    ceph.conf; stopped and reaped on every path."""
    d = tempfile.mkdtemp(prefix="devio-ceph-")
    log = open(os.path.join(d, "cluster.out"), "w+")
    p = subprocess.Popen(["bash", CLUSTER, "run", d], stdout=subprocess.PIPE, stderr=log, text=True,
                         env=dict(os.environ, CEPH_OSD_BYTES=str(1536 * MiB)), start_new_session=True)
    try:
        ready = []
        t = threading.Thread(target=lambda: ready.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(180)
        if not ready or not ready[0].startswith("READY "):
            log.seek(0)
            pytest.fail(f"the Ceph cluster did not come up within 180 s:\n{log.read()[-3000:]}")
        yield ready[0].split(None, 1)[1].strip()
    finally:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-rbd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


_n = [0]


def rbd(conf, *args, timeout=120):
    return run_ok("rbd", "-c", conf, *args, timeout=timeout)


def new_image(conf, size="64M", **kw):
    _n[0] += 1
    name = f"rbd/img{_n[0]}-{os.getpid()}"
    rbd(conf, "create", "--size", size, name)
    return name


def nbd_uri(sock):
    return f"nbd+unix:///?socket={sock}"


def serve_nbd(serve, conf, tmp, image, *extra, name="s.sock"):
    sock = os.path.join(tmp, name)
    s = serve(f"rbd:{image}", "--ceph-conf", conf, *extra, "--nbd", f"unix:{sock}")
    s.wait_unix(sock, timeout=60)
    return s, nbd_uri(sock)


def export(conf, image, tmp):
    out = os.path.join(tmp, "export.raw")
    if os.path.exists(out):
        os.unlink(out)
    rbd(conf, "export", "--no-progress", image, out)
    with open(out, "rb") as f:
        return f.read()


def sha(b):
    return hashlib.sha256(b).hexdigest()


def test_nbd_writes_equal_rbd_export(serve, ceph, tmp):
    """nbdcopy writes through devio; `rbd export` gives the same bytes."""
    img = new_image(ceph)
    data = os.urandom(64 * MiB)
    src = os.path.join(tmp, "src.raw")
    with open(src, "wb") as f:
        f.write(data)
    s, uri = serve_nbd(serve, ceph, tmp, img)
    run_ok("nbdcopy", "--flush", src, uri)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000000 70000", uri)
    assert s.stop() == 0, s.stderr()
    want = bytearray(data)
    want[1000000:1070000] = b"\x5a" * 70000
    assert sha(export(ceph, img, tmp)) == sha(bytes(want))


def test_rbd_import_and_bench_read_back_exact(serve, ceph, tmp):
    """Images filled by Ceph's tools read back byte-exact through devio."""
    src = os.path.join(tmp, "src.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(20 * MiB + 4096))
    img = f"rbd/imported-{os.getpid()}"
    rbd(ceph, "import", "--no-progress", src, img)
    s, uri = serve_nbd(serve, ceph, tmp, img, "-r")
    out = os.path.join(tmp, "out.raw")
    run_ok("nbdcopy", uri, out)
    assert sha(open(out, "rb").read()) == sha(open(src, "rb").read())
    s.stop()

    img2 = new_image(ceph, "32M")
    rbd(ceph, "bench", "--io-type", "write", "--io-size", "64K", "--io-total", "16M",
        "--io-pattern", "rand", img2)
    s2, uri2 = serve_nbd(serve, ceph, tmp, img2, "-r", name="s2.sock")
    run_ok("nbdcopy", uri2, out)
    assert sha(open(out, "rb").read()) == sha(export(ceph, img2, tmp))


def test_devio_protocol_roundtrip(serve, ceph, tmp):
    """The devio stream front end over RBD: devio write/cat, then rbd export."""
    img = new_image(ceph, "16M")
    sock = os.path.join(tmp, "d.sock")
    s = serve(f"rbd:{img}", "--ceph-conf", ceph, "--devio", f"unix:{sock}")
    s.wait_unix(sock, timeout=60)
    payload = os.urandom(3 * MiB + 123)
    p = subprocess.run([DEVIO, "write", f"devio+unix://{sock}", "--offset", "12345"], input=payload,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([DEVIO, "cat", f"devio+unix://{sock}", "--offset", "12345", "--length",
                        str(len(payload))], capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout == payload, p.stderr
    assert s.stop() == 0, s.stderr()
    assert export(ceph, img, tmp)[12345:12345 + len(payload)] == payload


def loop_of(s):
    m = re.search(r"^(/dev/loop\d+)$", s.stderr(), re.M)
    return m.group(1) if m else None


def test_fuse_loop_ext4(serve, ceph, tmp):
    """mkfs.ext4 and fsck through FUSE + loop on an RBD image; the files
    survive a restart of the server."""
    img = new_image(ceph, "96M")
    mnt, fs = os.path.join(tmp, "mnt"), os.path.join(tmp, "fs")
    os.mkdir(mnt)
    os.mkdir(fs)
    s = serve(f"rbd:{img}", "--ceph-conf", ceph, "--fuse", mnt, "--fuse-transport", "dev", "--loop")
    wait_for(lambda: loop_of(s) or s.proc.poll() is not None, 60, "loop device")
    dev = loop_of(s)
    assert dev, s.stderr()
    mounted = False
    try:
        run_ok("mkfs.ext4", "-q", "-F", dev)
        run_ok("mount", dev, fs)
        mounted = True
        blob = os.urandom(5 * MiB)
        with open(os.path.join(fs, "blob"), "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        run_ok("umount", fs)
        mounted = False
        run_ok("fsck.ext4", "-f", "-n", dev)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", fs], capture_output=True)
        assert s.stop() == 0, s.stderr()
    # The same bytes, read by Ceph, hold the file system.
    raw = os.path.join(tmp, "fs.raw")
    rbd(ceph, "export", "--no-progress", img, raw)
    run_ok("fsck.ext4", "-f", "-n", raw)
    out = run_ok("debugfs", "-R", "stat /blob", raw)
    assert "Size: 5242880" in out, out


def du_used(conf, img):
    out = rbd(conf, "du", "--format", "json", img)
    import json
    return json.loads(out)["images"][0]["used_size"]


def test_trim_shows_in_rbd_du(serve, ceph, tmp):
    img = new_image(ceph, "64M")
    s, uri = serve_nbd(serve, ceph, tmp, img)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 1 0 32M", "-c", "flush", uri)
    before = du_used(ceph, img)
    run_ok("qemu-io", "-f", "raw", "-c", "discard 0 32M", "-c", "flush", uri)
    after = du_used(ceph, img)
    assert before >= 32 * MiB and after < before, (before, after)
    # Trimmed ranges read back as zeroes, and block status says hole.
    run_ok("qemu-io", "-f", "raw", "-c", "read -P 0 0 32M", uri)
    m = run_ok("nbdinfo", "--map", uri)
    assert re.search(r"^\s*0\s+67108864\s+3\s+hole,zero", m, re.M), m


def test_qemu_rbd_driver_agrees(serve, ceph, tmp):
    """qemu's own rbd driver (qemu-block-extra) sees what devio serves."""
    img = new_image(ceph, "32M")
    s, uri = serve_nbd(serve, ceph, tmp, img)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x33 4M 5M", "-c", "write -z 20M 1M", "-c", "flush", uri)
    run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, f"rbd:{img}:conf={ceph}")


def test_snapshot_is_read_only(serve, ceph, tmp):
    img = new_image(ceph, "16M")
    s, uri = serve_nbd(serve, ceph, tmp, img)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "flush", uri)
    s.stop()
    rbd(ceph, "snap", "create", f"{img}@snap1")
    s2, uri2 = serve_nbd(serve, ceph, tmp, f"{img}@snap1", name="snap.sock")
    assert "is_read_only: true" in run_ok("nbdinfo", uri2)
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4096", uri2], capture_output=True, text=True)
    assert p.returncode != 0 or "failed" in (p.stdout + p.stderr), p.stdout + p.stderr
    run_ok("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 1M", uri2)


def test_second_writer_refused(serve, ceph, tmp):
    img = new_image(ceph, "16M")
    s, uri = serve_nbd(serve, ceph, tmp, img)
    p = subprocess.run([DEVIO, "serve", f"rbd:{img}", "--ceph-conf", ceph, "--nbd",
                        f"unix:{os.path.join(tmp, 'second.sock')}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "locked by another client" in p.stderr and p.stderr.count("error") == 1, p.stderr
    # A reader is welcome.
    s2, uri2 = serve_nbd(serve, ceph, tmp, img, "-r", name="reader.sock")
    run_ok("qemu-io", "-f", "raw", "-r", "-c", "read 0 64K", uri2)


def test_bad_sources_are_clear(ceph):
    for src, msg in [("rbd:rbd/no-such-image", "no such image"), ("rbd:nopool/x", "no such pool"),
                     ("rbd:justaname", "want rbd:POOL/IMAGE"), ("rbd:a//b", "want rbd:POOL/IMAGE")]:
        p = subprocess.run([DEVIO, "info", src], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, CEPH_CONF=ceph))
        assert p.returncode != 0 and msg in p.stderr, (src, p.stderr)
        assert p.stderr.count("error:") == 1, p.stderr


def test_unreachable_cluster_fails_then_recovers(serve, ceph, tmp):
    """With the OSD stopped, requests fail with EIO after --ceph-timeout,
    the server stays up, and serves again once the OSD is back.  (A write
    with FUA: a read could be answered from librbd's cache or object map.)"""
    img = new_image(ceph, "16M")
    s, uri = serve_nbd(serve, ceph, tmp, img, "--ceph-timeout", "3")
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 1M", "-c", "flush", uri)
    osd = int(open(os.path.join(os.path.dirname(ceph), "run", "osd.0.pid")).read())
    os.kill(osd, signal.SIGSTOP)
    try:
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -f -P 0x45 8M 64K", uri], capture_output=True,
                           text=True, timeout=60)
        assert "Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
    finally:
        os.kill(osd, signal.SIGCONT)
    assert s.proc.poll() is None
    assert "Connection timed out" in s.stderr()
    wait_for(lambda: subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x44 0 1M", uri],
                                     capture_output=True).returncode == 0, 60, "reads after the OSD is back")


def test_flushed_writes_survive_kill9(serve, ceph, tmp):
    """kill -9 of devio during writes: everything written before an
    acknowledged flush is in the image, as Ceph reads it."""
    import nbd
    img = new_image(ceph, "32M")
    s, uri = serve_nbd(serve, ceph, tmp, img)
    h = nbd.NBD()
    h.connect_uri(uri)
    flushed = {}
    block = 64 * 1024
    pending = {}
    for i in range(200):
        off = (i * 7919 % 512) * block
        buf = bytes([i % 251 + 1]) * block
        h.pwrite(buf, off)
        pending[off] = buf
        if i % 10 == 9:
            h.flush()
            flushed.update(pending)
            pending.clear()
        if i == 150:
            s.proc.send_signal(signal.SIGKILL)
            break
    s.proc.wait()
    data = export(ceph, img, tmp)
    for off, buf in flushed.items():
        if off in pending:
            continue  # rewritten after the last acknowledged flush: either value may be there
        assert data[off:off + block] == buf, off
    # A new server takes the image over once the dead client's lock is given
    # up (its watch expires: osd_client_watch_timeout, 10 s in this cluster).
    s2, uri2 = None, None
    end = time.monotonic() + 90
    while time.monotonic() < end:
        try:
            s2, uri2 = serve_nbd(serve, ceph, tmp, img, name=f"again{int(time.monotonic())}.sock")
            break
        except RuntimeError:
            time.sleep(2)
    assert s2, "no server could take the image's lock after kill -9"
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4096", "-c", "flush", uri2)
