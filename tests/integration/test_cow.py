"""test_cow.py - `devio serve SOURCE --cow FILE|ram`, the copy-on-write
overlay: writes through NBD (qemu-io, nbdsh) land in the overlay and read
back, the source's bytes never change, the overlay reopens where it left
off, a flushed write survives kill -9, TRIM/ZERO read back as zeroes, block
status (nbdinfo --map) is the overlay's where it holds a block and the
source's elsewhere, a file system made through FUSE+loop over an overlay
checks clean, and the refusals (another source size, a corrupt header, an
overlay in use) are clear."""
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading

import pytest

from conftest import DEVIO, run_ok
from test_fuse import scratch, start_fuse, stop_and_check_gone  # noqa: F401 (fixture)

MiB = 1 << 20
BLOCK = 64 * 1024


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-cow-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_source(path, size):
    """Random data, with a hole in the second MiB (for block status)."""
    data = bytearray(os.urandom(size))
    data[MiB:2 * MiB] = bytes(MiB)
    with open(path, "wb") as f:
        f.write(data[:MiB])
        f.seek(2 * MiB)
        f.write(data[2 * MiB:])
        f.truncate(size)
    return data


def serve_cow(serve, tmp, source, cow, *extra, name="s.sock"):
    sock = os.path.join(tmp, name)
    if os.path.exists(sock):
        os.unlink(sock)
    s = serve(source, "--cow", cow, *extra, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    return s, f"nbd+unix:///?socket={sock}"


def nbdsh(uri, script):
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    return subprocess.run(["nbdsh", "--base-allocation", "--connect", uri, "-c", script], check=True,
                          capture_output=True, text=True, timeout=60, env=env).stdout


def read_all(uri, tmp):
    out = os.path.join(tmp, "readback.raw")
    run_ok("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def qemu_write(uri, model, off, length, pattern):
    run_ok("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {off} {length}", uri)
    model[off:off + length] = bytes([pattern]) * length


# writes that cross block edges, fill whole blocks, and touch the last
# (partial) block of a source whose size is not a multiple of the block
WRITES = [(5000, 1000, 0x11), (BLOCK - 10, 20, 0x22), (3 * BLOCK, 2 * BLOCK, 0x33),
          (MiB + 4096, 8192, 0x44), ("end", 300, 0x55)]


def apply_writes(uri, model):
    for off, length, pattern in WRITES:
        if off == "end":
            off = len(model) - length
        qemu_write(uri, model, off, length, pattern)


def test_cow_file_over_raw_reopens_and_never_writes_source(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    size = 4 * MiB + 25 * 512  # the last block is partial (qemu rounds sizes to 512)
    model = make_source(src, size)
    before = sha(src)
    os.chmod(src, 0o444)
    cow = os.path.join(tmp, "over.cow")
    s, uri = serve_cow(serve, tmp, src, cow)
    apply_writes(uri, model)
    assert read_all(uri, tmp) == model
    assert s.stop() == 0, s.stderr()
    assert sha(src) == before
    with open(cow, "rb") as f:
        assert f.read(8) == b"DEVIOCOW"
    # reopened: the writes are there, and more can be added
    s, uri = serve_cow(serve, tmp, src, cow, name="t.sock")
    assert read_all(uri, tmp) == model
    qemu_write(uri, model, 2 * MiB + 100, 70000, 0x66)
    assert read_all(uri, tmp) == model
    assert s.stop() == 0, s.stderr()
    assert sha(src) == before
    # the whole stack described by info
    info = subprocess.run([DEVIO, "info", "--json", src, "--cow", cow], capture_output=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert b'"cow over raw"' in info.stdout


def test_cow_kill9_after_flush_loses_nothing(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    model = make_source(src, 3 * MiB)
    before = sha(src)
    cow = os.path.join(tmp, "over.cow")
    s, uri = serve_cow(serve, tmp, src, cow)
    for i in range(8):  # fresh blocks, partial blocks, blocks written twice
        off = (i * 7 * 4096 + 123) % (3 * MiB - 9000)
        data = bytes([i + 1]) * (4096 + i * 512)
        model[off:off + len(data)] = data
    nbdsh(uri, "\n".join(
        f"h.pwrite(bytes([{i + 1}]) * {4096 + i * 512}, {(i * 7 * 4096 + 123) % (3 * MiB - 9000)})"
        for i in range(8)) + "\nh.flush()\n")
    s.stop(sig=signal.SIGKILL)
    assert sha(src) == before
    s, uri = serve_cow(serve, tmp, src, cow, name="t.sock")
    assert read_all(uri, tmp) == model


def test_cow_ram_keeps_writes_in_memory(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    model = make_source(src, 4 * MiB)
    before = sha(src)
    s, uri = serve_cow(serve, tmp, src, "ram")
    apply_writes(uri, model)
    assert read_all(uri, tmp) == model
    assert sorted(os.listdir(tmp)) == ["s.sock", "src.raw"]  # no overlay file anywhere
    assert s.stop() == 0, s.stderr()
    assert sha(src) == before
    s, uri = serve_cow(serve, tmp, src, "ram", name="t.sock")
    assert read_all(uri, tmp) == make_source_copy(src)  # gone with the server


def make_source_copy(src):
    with open(src, "rb") as f:
        return f.read()


@pytest.mark.parametrize("cow", ["file", "ram"])
def test_cow_trim_and_zero_read_back_zero(serve, tmp, cow):
    src = os.path.join(tmp, "src.raw")
    model = make_source(src, 4 * MiB)
    before = sha(src)
    s, uri = serve_cow(serve, tmp, src, os.path.join(tmp, "o.cow") if cow == "file" else "ram")
    cases = [("zero", 100, 5000), ("trim", 2 * BLOCK, 3 * BLOCK), ("zero", 3 * MiB - 7, 2 * BLOCK + 11),
             ("trim", 5 * BLOCK + 1, 10)]
    nbdsh(uri, "\n".join(f"h.{op}({n}, {off})" for op, off, n in cases))
    for _, off, n in cases:
        model[off:off + n] = bytes(n)
    assert read_all(uri, tmp) == model
    assert s.stop() == 0, s.stderr()
    assert sha(src) == before


def nbd_map(uri):
    """[(offset, length, type)] from nbdinfo --map."""
    out = run_ok("nbdinfo", "--map", uri)
    rows = []
    for line in out.splitlines():
        f = line.split()
        rows.append((int(f[0]), int(f[1]), int(f[2])))
    return rows


def type_at(rows, off):
    for start, length, t in rows:
        if start <= off < start + length:
            return t
    raise AssertionError(f"offset {off} not mapped: {rows}")


def test_cow_block_status_through_the_stack(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    make_source(src, 4 * MiB)  # [1M, 2M) is a hole in the source
    s, uri = serve_cow(serve, tmp, src, os.path.join(tmp, "o.cow"))
    assert type_at(nbd_map(uri), MiB + BLOCK) == 3  # the source's hole shows through
    nbdsh(uri, f"h.pwrite(b'x' * 10, {MiB + BLOCK + 5})\nh.zero({BLOCK}, {3 * MiB})\nh.flush()")
    rows = nbd_map(uri)
    assert sum(r[1] for r in rows) == 4 * MiB and rows[0][0] == 0
    assert type_at(rows, MiB + BLOCK) == 0       # copied up into the overlay: data
    assert type_at(rows, MiB + 2 * BLOCK) == 3   # still the source's hole
    assert type_at(rows, 3 * MiB) & 2             # zeroed in the overlay: reads as zero
    assert type_at(rows, 3 * MiB + BLOCK) == 0   # the source's data
    assert type_at(rows, 0) == 0


def test_cow_refusals(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    make_source(src, 2 * MiB)
    cow = os.path.join(tmp, "o.cow")
    s, uri = serve_cow(serve, tmp, src, cow)
    # in use by another server
    p = subprocess.run([DEVIO, "serve", src, "--cow", cow, "--nbd", f"unix:{tmp}/x.sock"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "in use by another process" in p.stderr, p.stderr
    assert s.stop() == 0
    # a source of another size
    other = os.path.join(tmp, "other.raw")
    make_source(other, 3 * MiB)
    p = subprocess.run([DEVIO, "serve", other, "--cow", cow, "--nbd", f"unix:{tmp}/x.sock"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "source of 2097152 bytes; this source has 3145728" in p.stderr, p.stderr
    # a corrupt header names the field's offset
    with open(cow, "r+b") as f:
        f.seek(24)
        f.write(b"\x01\x00\x00\x00")
    p = subprocess.run([DEVIO, "serve", src, "--cow", cow, "--nbd", f"unix:{tmp}/x.sock"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "bad overlay header at offset" in p.stderr, p.stderr
    # not an overlay at all
    p = subprocess.run([DEVIO, "serve", src, "--cow", other, "--nbd", f"unix:{tmp}/x.sock"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "not a devio overlay" in p.stderr, p.stderr
    assert sha(other) == hashlib.sha256(make_source_copy(other)).hexdigest()


def test_cow_over_qcow2(serve, tmp):
    """A qcow2 made by qemu-img as the source: once the qcow2 layer exists."""
    src = os.path.join(tmp, "src.qcow2")
    run_ok("qemu-img", "create", "-q", "-f", "qcow2", src, "4M")
    run_ok("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", src)
    before = sha(src)
    cow = os.path.join(tmp, "o.cow")
    probe = subprocess.run([DEVIO, "info", "--format", "qcow2", src], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"--format qcow2 is refused in this tree: {probe.stderr.strip()}")
    s, uri = serve_cow(serve, tmp, src, cow, "--format", "qcow2")
    model = bytearray(b"\x5a" * MiB + bytes(3 * MiB))
    qemu_write(uri, model, 512 * 1024, MiB, 0x77)
    assert read_all(uri, tmp) == model
    assert s.stop() == 0, s.stderr()
    assert sha(src) == before
    run_ok("qemu-img", "check", src)


def test_cow_fuse_loop_mkfs_fsck_over_readonly_source(serve, scratch):  # noqa: F811
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    src = scratch.path("fs.raw")
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
    os.chmod(src, 0o444)
    before = sha(src)
    cow = scratch.path("fs.cow")
    s, _, dev = start_fuse(serve, scratch, src, "dev", "--cow", cow)
    run_ok("mkfs.ext4", "-q", dev)
    fsmnt = scratch.mkdir("fs")
    run_ok("mount", dev, fsmnt)
    data = os.urandom(5 * MiB + 77)
    with open(os.path.join(fsmnt, "f"), "wb") as f:
        f.write(data)
    run_ok("umount", fsmnt)
    stop_and_check_gone(s, scratch, dev)
    assert sha(src) == before
    s, _, dev = start_fuse(serve, scratch, src, "dev", "--cow", cow)
    run_ok("e2fsck", "-fn", dev)
    run_ok("mount", "-o", "ro", dev, fsmnt)
    try:
        with open(os.path.join(fsmnt, "f"), "rb") as f:
            assert f.read() == data
    finally:
        run_ok("umount", fsmnt)
    stop_and_check_gone(s, scratch, dev)
    assert sha(src) == before


def test_cow_fio_verify_qd32_two_connections(serve, tmp):
    """Random 4 KiB writes at QD32 from two connections, many of them
    copying up the same 64 KiB blocks at once; verified, then verified again
    after the server restarted over the same overlay."""
    probe = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, timeout=30)
    if "nbd" not in probe.stdout:
        pytest.skip("fio without the nbd engine")
    src = os.path.join(tmp, "src.raw")
    make_source(src, 64 * MiB)
    before = sha(src)
    cow = os.path.join(tmp, "o.cow")
    job = ["fio", "--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=16M",
           "--iodepth=32", "--numjobs=2", "--offset_increment=32M", "--verify=crc32c", "--verify_fatal=1",
           "--group_reporting", "--verify_state_save=0", "--randseed=7"]
    s, uri = serve_cow(serve, tmp, src, cow)
    run_ok(*job, f"--uri={uri}", "--do_verify=1", timeout=300)
    assert s.stop() == 0, s.stderr()
    s, uri = serve_cow(serve, tmp, src, cow, name="t.sock")
    run_ok(*job, f"--uri={uri}", "--verify_only=1", timeout=300)
    assert s.stop() == 0, s.stderr()
    assert sha(src) == before


CRASH_WRITER = """
import random, sys
r = random.Random(11)
for i in range(1, 1000000):
    h.pwrite(bytes([i % 251 + 1]) * 4096, r.randrange(0, {blocks}) * 4096)
    if i % 10 == 0:
        h.flush()
        print(i, flush=True)
"""


def test_cow_kill9_mid_run_keeps_flushed_writes_and_whole_blocks(serve, tmp):
    """Writes with a flush every ten, the server killed -9 while they run:
    after a restart every write acknowledged before the last flush is
    there, and every 4 KiB piece holds the source's bytes or one of the
    writes made there, never zeroes of a block whose copy-up was lost."""
    src = os.path.join(tmp, "src.raw")
    size = 8 * MiB
    model = make_source(src, size)
    model[MiB:2 * MiB] = os.urandom(MiB)  # no zeroes in the source: zeroes would mean a lost copy-up
    with open(src, "r+b") as f:
        f.write(model)
    cow = os.path.join(tmp, "o.cow")
    s, uri = serve_cow(serve, tmp, src, cow)
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    w = subprocess.Popen(["nbdsh", "--connect", uri, "-c", CRASH_WRITER.format(blocks=size // 4096)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    flushed = 0
    try:
        for line in w.stdout:
            flushed = int(line)
            if flushed >= 600:
                break
        s.stop(sig=signal.SIGKILL)
        # the writer fails on its next request; its last line is the last
        # flush the server acknowledged.  Read the rest through w.stdout
        # itself: communicate(timeout=) reads the raw pipe and would lose
        # lines already in w.stdout's buffer (a flush acknowledged but not
        # counted: writes after it then look impossible)
        killer = threading.Timer(60, w.kill)
        killer.start()
        try:
            rest = w.stdout.read()
        finally:
            killer.cancel()
        w.wait()
        flushed = max([flushed] + [int(x) for x in rest.split()])
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    assert flushed >= 600
    # replay the writer's sequence: at most ten writes after the last flush
    r = __import__("random").Random(11)
    history = {}
    for i in range(1, flushed + 11):
        history.setdefault(r.randrange(0, size // 4096), []).append(i)
    s, uri = serve_cow(serve, tmp, src, cow, name="t.sock")
    data = read_all(uri, tmp)
    for piece in range(size // 4096):
        got = data[piece * 4096:(piece + 1) * 4096]
        writes = history.get(piece, [])
        durable = [i for i in writes if i <= flushed]
        allowed = {bytes([i % 251 + 1]) * 4096 for i in writes if not durable or i >= durable[-1]}
        if not durable:
            allowed.add(bytes(model[piece * 4096:(piece + 1) * 4096]))
        assert got in allowed, f"piece {piece}: writes {writes}, flushed up to {flushed}"


def test_cow_ram_capped_by_ram_max(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    make_source(src, 4 * MiB)
    s, uri = serve_cow(serve, tmp, src, "ram", "--ram-max", "1M")
    model = bytearray(make_source_copy(src))
    qemu_write(uri, model, 2 * MiB, 512 * 1024, 7)
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 2M", uri], capture_output=True, text=True,
                       timeout=60)
    assert "No space left on device" in p.stdout + p.stderr
    assert read_all(uri, tmp)[2 * MiB:3 * MiB] == model[2 * MiB:3 * MiB]
