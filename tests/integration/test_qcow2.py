"""test_qcow2.py - the qcow2 layer against QEMU's own tools: images made and
filled by qemu-img/qemu-io (compat 0.10 and 1.1, compressed, with backing
files) served by devio and read back byte-exact against `qemu-img convert`;
images written through devio (NBD from several connections, FUSE+loop with
mkfs/fsck) pass `qemu-img check` and `qemu-img compare`; kill -9 and
stopped-process copies mid-run leave images `qemu-img check` accepts (leaks
only) with every flushed write present; backing files only with --format
qcow2; damaged and unsupported images refused with a message naming the
field."""
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time

import pytest

from conftest import DEVIO, run_ok, wait_for

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
SYS_PY = "/usr/bin/python3"  # has libnbd's module


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-qcow2-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def serve_img(serve, tmp, img, *args, name="s"):
    sock = os.path.join(tmp, name + ".sock")
    s = serve(img, "--nbd", "unix:" + sock, *args)
    s.wait_unix(sock)
    return s, uri(sock)


def qemu_raw(tmp, img, name="ref.raw"):
    out = os.path.join(tmp, name)
    run_ok("qemu-img", "convert", "-O", "raw", img, out)
    return out


def nbd_raw(tmp, u, name="out.raw"):
    out = os.path.join(tmp, name)
    run_ok("qemu-img", "convert", "-f", "raw", "-O", "raw", u, out)
    return out


def same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def create(tmp, name, size="64M", compat="1.1", cluster=65536, backing=None, backing_fmt=None, extra=()):
    img = os.path.join(tmp, name)
    opts = f"compat={compat},cluster_size={cluster}"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    run_ok(*args, *extra, img, size)
    return img


def qemu_io(img, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run_ok(*args, img)


FILL = ["write -P 0x11 0 1M", "write -P 0x22 5M 100k", "write -P 0x33 63M 1M",
        "write -P 0x44 20M 4k", "write -P 0x55 33M 3M"]


def check_clean(img):
    """qemu-img check: no corruption (exit 0, or 3 for leaks only)."""
    r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 3), f"qemu-img check {img} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "ERROR" not in r.stdout, r.stdout
    return r


def client(*args, timeout=300):
    return run_ok(SYS_PY, os.path.join(HERE, "qcow2_client.py"), *[str(a) for a in args], timeout=timeout)


# ---- reading what QEMU wrote ----

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 65536, 2 * MiB])
def test_read_qemu_image(serve, tmp, compat, cluster):
    img = create(tmp, "a.qcow2", compat=compat, cluster=cluster)
    cmds = list(FILL)
    if compat == "1.1":
        cmds += ["write -z 0 64k", "discard 5M 2M", "write -z 33M 2M"]
    else:
        cmds += ["discard 5M 2M"]
    qemu_io(img, *cmds)
    s, u = serve_img(serve, tmp, img)
    assert same_file(nbd_raw(tmp, u), qemu_raw(tmp, img))
    assert int(run_ok("nbdinfo", "--size", u)) == 64 * MiB


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_read_compressed(serve, tmp, compat):
    src = create(tmp, "src.qcow2", compat=compat)
    qemu_io(src, *FILL)
    img = os.path.join(tmp, "c.qcow2")
    run_ok("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compat={compat}", src, img)
    assert "compressed" in run_ok("qemu-img", "check", img)
    s, u = serve_img(serve, tmp, img)
    assert same_file(nbd_raw(tmp, u), qemu_raw(tmp, src))


def test_size_not_a_cluster_multiple(serve, tmp):
    """The last cluster is partial: read, compressed, and written over."""
    size = 8 * MiB + 1536
    src = create(tmp, "p.qcow2", size=str(size))
    qemu_io(src, f"write -P 0x5a {size - 4096} 4096", "write -P 0x11 0 64k")
    img = os.path.join(tmp, "pc.qcow2")
    run_ok("qemu-img", "convert", "-c", "-O", "qcow2", src, img)
    s, u = serve_img(serve, tmp, img)
    assert int(run_ok("nbdinfo", "--size", u)) == size
    assert same_file(nbd_raw(tmp, u), qemu_raw(tmp, src))
    ref = qemu_raw(tmp, src, "want.raw")
    qemu_io(u, f"write -P 0x6b {size - 1024} 1024", fmt="raw")
    qemu_io(ref, f"write -P 0x6b {size - 1024} 1024", fmt="raw")
    assert s.stop() == 0, s.stderr()
    check_clean(img)
    run_ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref)


def test_extents_show_holes(serve, tmp):
    img = create(tmp, "a.qcow2")
    qemu_io(img, "write -P 0x11 1M 1M", "write -z 4M 1M")
    s, u = serve_img(serve, tmp, img)
    out = run_ok("nbdinfo", "--map", u)
    rows = [l.split() for l in out.splitlines() if l.strip()]
    data = [(int(r[0]), int(r[1])) for r in rows if r[2] == "0"]
    assert data == [(1 * MiB, 1 * MiB)], out


# ---- backing files ----

def test_backing_refused_on_detection_served_explicitly(serve, tmp):
    base = create(tmp, "base.qcow2")
    qemu_io(base, *FILL)
    top = create(tmp, "top.qcow2", backing="base.qcow2")
    qemu_io(top, "write -P 0x77 2M 64k", "write -z 63M 64k", "write -P 0x78 5M 512")
    sock = os.path.join(tmp, "r.sock")
    r = subprocess.run([DEVIO, "serve", top, "--nbd", "unix:" + sock],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "backing file" in r.stderr and "--format qcow2" in r.stderr, r.stderr
    s, u = serve_img(serve, tmp, top, "--format", "qcow2")
    assert same_file(nbd_raw(tmp, u), qemu_raw(tmp, top))


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_write_over_backing(serve, tmp, compat):
    """Writes over a backing chain (qcow2 -> raw, relative names): partial
    clusters copied from the backing file, zeroes and trims; qemu reads the
    same and the base never changes."""
    raw = os.path.join(tmp, "base.raw")
    with open(raw, "wb") as f:
        f.write(random.Random(7).randbytes(16 * MiB))
    mid = create(tmp, "mid.qcow2", size="16M", compat=compat, backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 0x21 1M 1M")
    top = create(tmp, "top.qcow2", size="16M", compat=compat, backing="mid.qcow2")
    before = open(raw, "rb").read()
    ref = qemu_raw(tmp, top, "want.raw")
    s, u = serve_img(serve, tmp, top, "--format", "qcow2")
    client("random", u, ref, 3, 60, 3, 65536, 1 if compat == "1.1" else 0)
    assert same_file(nbd_raw(tmp, u), ref)
    assert s.stop() == 0, s.stderr()
    check_clean(top)
    run_ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", top, ref)
    assert open(raw, "rb").read() == before


def test_backing_loop_and_depth_refused(serve, tmp):
    a = create(tmp, "a.qcow2", backing="b.qcow2", extra=["-u"])
    create(tmp, "b.qcow2", backing="a.qcow2", extra=["-u"])
    r = subprocess.run([DEVIO, "serve", a, "--format", "qcow2", "--nbd",
                        "unix:" + os.path.join(tmp, "x.sock")], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "loops" in r.stderr, r.stderr
    prev = create(tmp, "c0.qcow2", size="1M")
    for i in range(1, 18):
        prev = create(tmp, f"c{i}.qcow2", size="1M", backing=os.path.basename(prev))
    r = subprocess.run([DEVIO, "serve", prev, "--format", "qcow2", "--nbd",
                        "unix:" + os.path.join(tmp, "y.sock")], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "deeper than 16" in r.stderr, r.stderr


# ---- writing through devio ----

@pytest.mark.parametrize("compat,cluster", [("0.10", 65536), ("1.1", 65536), ("1.1", 512), ("0.10", 2 * MiB),
                                            ("1.1", 4096)])
def test_random_writes_pass_qemu_check(serve, tmp, compat, cluster):
    """Random writes, zeroes and trims from four connections at once;
    qemu-img check finds nothing, compare finds the reference data."""
    img = create(tmp, "w.qcow2", size="32M", compat=compat, cluster=cluster)
    qemu_io(img, "write -P 0x11 0 3M", "write -P 0x22 20M 1M")
    ref = qemu_raw(tmp, img, "want.raw")
    s, u = serve_img(serve, tmp, img)
    client("random", u, ref, 11, 150, 4, cluster, 1)
    assert same_file(nbd_raw(tmp, u), ref)
    assert s.stop() == 0, s.stderr()
    r = check_clean(img)
    assert "leaked" not in r.stdout, r.stdout  # a clean stop gives everything back
    run_ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref)
    assert "virtual size: 32 MiB" in run_ok("qemu-img", "info", img)


def test_refcount_table_grows(serve, tmp):
    """512-byte clusters: one refcount table cluster covers 8 MiB, so 24 MiB
    of writes move the table (twice)."""
    img = create(tmp, "g.qcow2", size="32M", cluster=512)
    s, u = serve_img(serve, tmp, img)
    ref = os.path.join(tmp, "want.raw")
    data = random.Random(5).randbytes(24 * MiB)
    with open(ref, "wb") as f:
        f.write(data + bytes(8 * MiB))
    src = os.path.join(tmp, "src.raw")
    shutil.copy(ref, src)
    run_ok("nbdcopy", src, u)
    assert s.stop() == 0, s.stderr()
    check_clean(img)
    run_ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_write_into_compressed(serve, tmp, compat):
    src = create(tmp, "src.qcow2", compat=compat)
    qemu_io(src, *FILL)
    img = os.path.join(tmp, "c.qcow2")
    run_ok("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compat={compat}", src, img)
    ref = qemu_raw(tmp, img, "want.raw")
    s, u = serve_img(serve, tmp, img)
    client("random", u, ref, 5, 80, 2, 65536, 1)
    assert s.stop() == 0, s.stderr()
    check_clean(img)
    run_ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref)


def test_qemu_io_over_nbd(serve, tmp):
    img = create(tmp, "q.qcow2")
    ref = os.path.join(tmp, "want.raw")
    with open(ref, "wb") as f:
        f.truncate(64 * MiB)
    cmds = ["write -P 0x44 100k 8k", "write -P 0x55 10M 3M", "write -z 11M 128k", "discard 10M 1M",
            "write -P 0x66 33M 4k", "write -z 40M 1000", "flush"]
    s, u = serve_img(serve, tmp, img)
    qemu_io(u, *cmds, fmt="raw")
    qemu_io(ref, *cmds, fmt="raw")
    assert s.stop() == 0, s.stderr()
    check_clean(img)
    run_ok("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref)


def test_fuse_loop_mkfs_fsck(serve, tmp):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    img = create(tmp, "fs.qcow2", size="200M")
    mnt, fsmnt = os.path.join(tmp, "mnt"), os.path.join(tmp, "fs")
    os.makedirs(mnt)
    os.makedirs(fsmnt)
    s = serve(img, "--fuse", mnt, "--loop")
    dev = None
    try:
        wait_for(lambda: re.search(r"^(/dev/loop\d+)$", s.stderr(), re.M) or s.proc.poll() is not None, 30, "loop")
        assert s.proc.poll() is None, s.stderr()
        dev = re.search(r"^(/dev/loop\d+)$", s.stderr(), re.M).group(1)
        run_ok("mkfs.ext4", "-q", dev)
        run_ok("mount", dev, fsmnt)
        data = random.Random(3).randbytes(20 * MiB)
        with open(os.path.join(fsmnt, "f"), "wb") as f:
            f.write(data)
        with open(os.path.join(fsmnt, "g"), "wb") as f:
            f.write(random.Random(4).randbytes(30 * MiB))
        os.sync()
        os.remove(os.path.join(fsmnt, "g"))
        run_ok("fstrim", fsmnt)  # discards through the loop device reach the layer as TRIM
        run_ok("umount", fsmnt)
        run_ok("e2fsck", "-fn", dev)
    finally:
        subprocess.run(["umount", fsmnt], capture_output=True)
        assert s.stop() == 0, s.stderr()
    check_clean(img)
    raw = qemu_raw(tmp, img)
    run_ok("e2fsck", "-fn", raw)
    run_ok("mount", "-o", "ro,loop", raw, fsmnt)
    try:
        with open(os.path.join(fsmnt, "f"), "rb") as f:
            assert f.read() == data
    finally:
        run_ok("umount", fsmnt)


# ---- crashes ----

def crash_log(path):
    ops, flushed = [], 0
    with open(path) as f:
        for line in f:
            w = line.split()
            if w and w[0] == "op":
                ops.append((int(w[1]), w[2]))
            elif w and w[0] == "flushed":
                flushed = int(w[1])
    return ops, flushed


def all_stopped(pid):
    """Every thread of pid is stopped (state T)."""
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "T":
                return False
    return True


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_kill9_mid_writes(serve, tmp, compat):
    """kill -9 during a stream of writes, zeroes and flushes; meanwhile
    copies of the file taken with the server stopped (what a power cut
    would leave from the page cache); every copy and the final image pass
    qemu-img check (leaks allowed) and hold every write acknowledged
    before an acknowledged flush."""
    slot = 24 * 1024
    img = create(tmp, "k.qcow2", size="48M", compat=compat)
    s, u = serve_img(serve, tmp, img)
    log = os.path.join(tmp, "log")
    with open(log, "w") as lf:
        c = subprocess.Popen([SYS_PY, os.path.join(HERE, "qcow2_client.py"), "crash", u, str(slot), "9"],
                             stdout=lf, stderr=subprocess.STDOUT, text=True)
    copies = []
    try:
        for i in range(3):
            wait_for(lambda: crash_log(log)[1] >= 60 * (i + 1) or c.poll() is not None, 60, "flushes")
            os.kill(s.proc.pid, signal.SIGSTOP)
            wait_for(lambda: all_stopped(s.proc.pid), 10, "server stopped")  # SIGSTOP lands later
            copies.append((os.path.join(tmp, f"copy{i}.qcow2"), crash_log(log)))
            shutil.copy(img, copies[-1][0])
            os.kill(s.proc.pid, signal.SIGCONT)
        time.sleep(random.Random().uniform(0.1, 0.5))
        s.stop(signal.SIGKILL)
    finally:
        os.kill(s.proc.pid, signal.SIGCONT) if s.proc.poll() is None else None
        c.wait(timeout=60)
    copies.append((img, crash_log(log)))
    for path, (ops, flushed) in copies:
        check_clean(path)
        assert flushed > 0
        raw = qemu_raw(tmp, path, "crash.raw")
        last = {}
        for slot_no, kind in ops[:flushed]:
            last[slot_no] = kind
        for slot_no, _ in ops[flushed:]:  # sent later: either state is right
            last.pop(slot_no, None)
        with open(raw, "rb") as f:
            for slot_no, kind in last.items():
                f.seek(slot_no * slot)
                got = f.read(slot)
                want = bytes(slot) if kind == "zero" else random.Random(slot_no).randbytes(slot)
                assert got == want, f"{path}: slot {slot_no} ({kind}) lost after an acknowledged flush"


# ---- what is refused or served read-only ----

def serve_fails(img, *args):
    r = subprocess.run([DEVIO, "serve", img, *args, "--nbd",
                        "unix:" + img + ".sock"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stderr
    return r.stderr


def patch(img, off, fmt, value):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("off,fmt,value,field", [
    (20, ">I", 30, "cluster_bits"),
    (4, ">I", 4, "version"),
    (72, ">Q", 2, "corrupt"),
    (72, ">Q", 1 << 20, "unknown feature"),
    (96, ">I", 5, "refcount_order"),
    (36, ">I", 0, "l1_size"),
    (40, ">Q", 1 << 40, "l1_table_offset"),
    (48, ">Q", 12345, "refcount_table_offset"),
    (56, ">I", 1 << 30, "refcount_table_clusters"),
    (32, ">I", 1, "crypt_method"),
    (24, ">Q", 1 << 63, "size"),
])
def test_damaged_header_refused(tmp, off, fmt, value, field):
    img = create(tmp, "d.qcow2")
    qemu_io(img, "write -P 0x11 0 64k")
    patch(img, off, fmt, value)
    err = serve_fails(img)
    assert field in err and "d.qcow2" in err, err


def test_bad_l2_entry_is_eio_not_crash(serve, tmp):
    img = create(tmp, "e.qcow2")
    qemu_io(img, "write -P 0x11 0 64k")
    with open(img, "rb") as f:
        f.seek(40)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    patch(img, l2, ">Q", (1 << 63) | (1 << 50))  # data cluster far past the end
    s, u = serve_img(serve, tmp, img)
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", u, os.path.join(tmp, "x.raw")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "bad L2 entry" in s.stderr() and "past the end" in s.stderr()


def test_extended_l2_served_readonly(serve, tmp):
    """Subclusters (2 KiB of a 64 KiB cluster): allocated, zero and
    unallocated ones over a backing file, and compressed clusters."""
    base = create(tmp, "base.qcow2")
    qemu_io(base, "write -P 0x99 0 8M")
    img = create(tmp, "x.qcow2", backing="base.qcow2", extra=["-o", "extended_l2=on"])
    qemu_io(img, "write -P 0x11 4k 2k", "write -P 0x22 100k 10k", "write -z 200k 6k", "write -P 0x33 1M 64k",
            "write -z 2M 64k", "write -P 0x44 3M 1k", "discard 1M 4k")
    s, u = serve_img(serve, tmp, img, "--format", "qcow2")
    assert "subclusters" in s.stderr() and "read-only" in s.stderr(), s.stderr()
    assert same_file(nbd_raw(tmp, u), qemu_raw(tmp, img))
    comp = os.path.join(tmp, "xc.qcow2")
    run_ok("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", img, comp)
    s2, u2 = serve_img(serve, tmp, comp, name="c")
    assert same_file(nbd_raw(tmp, u2, "c.raw"), qemu_raw(tmp, img, "c-want.raw"))


def test_extended_l2_small_clusters_refused(tmp):
    img = create(tmp, "x.qcow2", cluster=16384, extra=["-o", "extended_l2=on"])
    patch(img, 20, ">I", 12)  # 4 KiB clusters cannot have subclusters
    assert "extended L2" in serve_fails(img)


def test_snapshots_served_readonly(serve, tmp):
    img = create(tmp, "s.qcow2")
    qemu_io(img, "write -P 0x11 0 1M")
    run_ok("qemu-img", "snapshot", "-c", "snap1", img)
    run_ok("qemu-img", "snapshot", "-c", "before-upgrade", img)
    qemu_io(img, "write -P 0x22 0 64k")
    s, u = serve_img(serve, tmp, img)
    assert "read-only" in s.stderr() and "'snap1', 'before-upgrade'" in s.stderr(), s.stderr()
    assert same_file(nbd_raw(tmp, u), qemu_raw(tmp, img))
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", u], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 or "failed" in r.stdout + r.stderr


def test_dirty_lazy_refcounts_served_readonly(serve, tmp):
    img = create(tmp, "l.qcow2", extra=["-o", "lazy_refcounts=on"])
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", "-c", "sigraise 9", img],
                   capture_output=True, timeout=60)
    with open(img, "rb") as f:
        f.seek(72)
        assert struct.unpack(">Q", f.read(8))[0] & 1, "qemu-io did not leave the image dirty"
    s, u = serve_img(serve, tmp, img)
    assert "dirty" in s.stderr() and "read-only" in s.stderr()
    with open(nbd_raw(tmp, u), "rb") as f:
        assert f.read(65536) == b"\x33" * 65536
