"""test_fuse.py - the --fuse front end against the real kernel: the export as
one file in a FUSE mount, a loop device on it (--loop), file systems made and
checked on it, fio with verification, discard reaching the backend, backend
errors, kill -9 and clean shutdown.  Every test runs over both transports:
FUSE over io_uring and plain /dev/fuse."""
import hashlib
import mmap
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import vmrss, wait_for

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
MiB = 1 << 20


def run(*cmd, timeout=120, check=True, **kw):
    return subprocess.run(list(cmd), check=check, timeout=timeout, capture_output=True, text=True, **kw)


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def loop_exists(dev):
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return bool(f.read().strip())
    except OSError:
        return False



def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(params=["uring", "dev"])
def transport(request):
    """The FUSE transport; for uring, enable_uring is switched on and the
    original value restored afterwards."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    old = None
    if request.param == "uring":
        if not os.path.exists(ENABLE_URING):
            pytest.skip("kernel without FUSE over io_uring")
        with open(ENABLE_URING) as f:
            old = f.read().strip()
        with open(ENABLE_URING, "w") as f:
            f.write("Y")
    yield request.param
    if old is not None:
        with open(ENABLE_URING, "w") as f:
            f.write(old)


class Scratch:
    """A temp dir plus cleanups that run in reverse order, on every path."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="devio-fuse-")
        self.cleanups = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def mkdir(self, name):
        p = self.path(name)
        os.makedirs(p, exist_ok=True)
        self.cleanups.append(lambda: lazy_umount(p))
        return p

    def close(self):
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:
                pass
        # anything still mounted under the scratch dir
        with open("/proc/self/mountinfo") as f:
            mnts = [line.split()[4] for line in f if line.split()[4].startswith(self.dir)]
        for m in sorted(mnts, reverse=True):
            lazy_umount(m)
        shutil.rmtree(self.dir, ignore_errors=True)


def lazy_umount(path):
    if is_mounted(path):
        subprocess.run(["umount", path], capture_output=True, timeout=30)
    if is_mounted(path):
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


@pytest.fixture
def scratch():
    s = Scratch()
    yield s
    s.close()


def start_fuse(serve, scratch, source, transport, *extra, loop=True, mnt_name="mnt"):
    """Serve source on a FUSE mount (and a loop device); returns (server, file, loopdev)."""
    mnt = scratch.mkdir(mnt_name)
    args = [source, "--fuse", mnt, "--fuse-transport", transport] + list(extra)
    if loop:
        args.append("--loop")
    s = serve(*args)
    want = r"^(/dev/loop\d+)$" if loop else "^" + re.escape(mnt) + r"/disk$"
    wait_for(lambda: re.search(want, s.stderr(), re.M) or s.proc.poll() is not None, 30, "fuse ready")
    if s.proc.poll() is not None:
        raise RuntimeError(f"server exited {s.proc.returncode}: {s.stderr()}")
    dev = re.search(want, s.stderr(), re.M).group(1) if loop else None
    if dev:
        scratch.cleanups.append(lambda: loop_exists(dev) and subprocess.run(["losetup", "-d", dev], capture_output=True))
    return s, os.path.join(mnt, "disk"), dev


def stop_and_check_gone(s, scratch, dev, transport=None):
    assert s.stop() == 0, s.stderr()
    if transport:
        m = re.search(r"(\d+) requests over the io_uring, (\d+) over /dev/fuse", s.stderr())
        assert m, s.stderr()
        ring = int(m.group(1))
        assert ring > 0 if transport == "uring" else ring == 0, m.group(0)
    mnt = os.path.join(scratch.dir, "mnt")
    assert not is_mounted(mnt)
    if dev:
        wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")


def transport_in_status(s, transport):
    out = run(os.environ.get("DEVIO", "devio"), "status").stdout
    want = "io_uring" if transport == "uring" else "/dev/fuse"
    block = [b for b in out.split("\n\n") if f"pid {s.proc.pid}\n" in b + "\n"]
    assert block and f"fuse transport {want}" in block[0], out


def test_file_semantics(serve, scratch, transport):
    """The mount shows one file of the export's size; reads past the end are
    short, size changes are refused, SEEK_HOLE finds the end."""
    img = scratch.path("img.raw")
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    s, disk, _ = start_fuse(serve, scratch, img, transport, loop=False)
    transport_in_status(s, transport)
    assert os.listdir(os.path.dirname(disk)) == ["disk"]
    assert os.stat(disk).st_size == 8 * MiB
    data = os.urandom(MiB + 123)
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * MiB + 7)
        os.fsync(fd)
        assert os.pread(fd, len(data), 3 * MiB + 7) == data
        assert os.pread(fd, 4096, 8 * MiB - 100) == b"\0" * 100  # short at the end
        assert os.pread(fd, 4096, 8 * MiB) == b""
        with pytest.raises(OSError):
            os.ftruncate(fd, 4 * MiB)
        assert os.lseek(fd, 0, os.SEEK_HOLE) <= 8 * MiB
    finally:
        os.close(fd)
    with open(img, "rb") as f:
        f.seek(3 * MiB + 7)
        assert f.read(len(data)) == data
    stop_and_check_gone(s, scratch, None)


def test_readonly_export(serve, scratch, transport):
    img = scratch.path("ro.raw")
    with open(img, "wb") as f:
        f.write(b"x" * MiB)
    s, disk, dev = start_fuse(serve, scratch, img, transport, "--readonly")
    assert os.stat(disk).st_mode & 0o777 == 0o444
    with pytest.raises(OSError):
        os.open(disk, os.O_WRONLY)
    assert run("blockdev", "--getro", dev).stdout.strip() == "1"
    with open(dev, "rb") as f:
        assert f.read(4096) == b"x" * 4096
    stop_and_check_gone(s, scratch, dev)


FS_CASES = [("file", "ext4"), ("ram", "xfs")]


@pytest.mark.parametrize("kind,fstype", FS_CASES)
def test_filesystem_roundtrip(serve, scratch, transport, kind, fstype):
    """mkfs on the loop device, files with known checksums, unmount without
    sync (dirty pages must reach the backend), stop, serve again, fsck clean,
    checksums equal (the RAM disk is checked while its server still runs)."""
    if kind == "file":
        source = scratch.path("fs.raw")
        with open(source, "wb") as f:
            f.truncate(320 * MiB)
    else:
        source = "ram:320M"
    s, disk, dev = start_fuse(serve, scratch, source, transport)
    fsmnt = scratch.mkdir("fs")
    run("mkfs." + fstype, "-q", *(["-f"] if fstype == "xfs" else []), dev)
    run("mount", dev, fsmnt)
    sums = {}
    for i in range(4):
        data = os.urandom((i + 1) * 3 * MiB + i)
        name = os.path.join(fsmnt, f"f{i}")
        with open(name, "wb") as f:
            f.write(data)
        sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
    run("umount", fsmnt)
    if kind == "file":
        stop_and_check_gone(s, scratch, dev)
        s, disk, dev = start_fuse(serve, scratch, source, transport)
    if fstype == "ext4":
        run("e2fsck", "-fn", dev)
    else:
        run("xfs_repair", "-n", dev)
    run("mount", "-o", "ro", dev, fsmnt)
    try:
        for name, want in sums.items():
            assert sha256_file(os.path.join(fsmnt, name)) == want
    finally:
        run("umount", fsmnt)
    stop_and_check_gone(s, scratch, dev)


def test_fio_verify(serve, scratch, transport):
    """Random 4 KiB writes at QD32 and 1 MiB sequential, verified with crc32c."""
    if not shutil.which("fio"):
        pytest.skip("no fio")
    s, _, dev = start_fuse(serve, scratch, "ram:128M", transport)
    for extra in (["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M"],
                  ["--rw=write", "--bs=1M", "--iodepth=8", "--size=96M"]):
        r = run("fio", "--name=v", f"--filename={dev}", "--ioengine=io_uring", "--direct=1",
                "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                "--output-format=terse",
                *extra, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    assert s.proc.poll() is None
    stop_and_check_gone(s, scratch, dev, transport)


def test_ring_hands_big_requests_to_an_idle_queue(serve, scratch):
    """The kernel queues a FUSE request on the issuing CPU's ring queue: with
    fio pinned to CPU 0, every 1 MiB request lands on queue 0, and the
    thread of queue 0 hands those it cannot start at once to the idle
    thread of another queue, which answers them on its own ring.  Written
    and read back verified (crc32c); the exit log counts the hand-overs."""
    if not shutil.which("fio"):
        pytest.skip("no fio")
    if len(os.sched_getaffinity(0)) < 2 or not os.path.exists(ENABLE_URING):
        pytest.skip("needs two CPUs and FUSE over io_uring")
    with open(ENABLE_URING) as f:
        old = f.read().strip()
    with open(ENABLE_URING, "w") as f:
        f.write("Y")
    try:
        s, disk, _ = start_fuse(serve, scratch, "ram:128M", "uring", loop=False)
        cpu = min(os.sched_getaffinity(0))
        r = run("fio", "--name=v", f"--filename={disk}", "--ioengine=libaio", "--direct=1", "--rw=write",
                "--bs=1M", "--iodepth=16", "--size=128M", f"--cpus_allowed={cpu}", "--verify=crc32c",
                "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--output-format=terse",
                timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        stop_and_check_gone(s, scratch, None, "uring")
    finally:
        with open(ENABLE_URING, "w") as f:
            f.write(old)
    handed = [int(n) for n in re.findall(r"served \d+ requests \((\d+) handed over by another queue\)", s.stderr())]
    assert len(handed) >= 2 and sum(handed) > 0, s.stderr()


def test_discard_reaches_ram(serve, scratch, transport):
    """blkdiscard on the loop device frees the RAM disk's memory."""
    s, _, dev = start_fuse(serve, scratch, "ram:256M", transport)
    before = vmrss(s.proc.pid) // 1024
    with open(dev, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    full = vmrss(s.proc.pid) // 1024
    assert full - before > 64 * 1024, (before, full)
    run("blkdiscard", dev)
    wait_for(lambda: vmrss(s.proc.pid) // 1024 < full - 64 * 1024, 20, "RSS to shrink after discard")
    with open(dev, "rb") as f:
        assert f.read(MiB) == b"\0" * MiB
    stop_and_check_gone(s, scratch, dev)


def test_discard_punches_image(serve, scratch, transport):
    """fstrim of a file system on the loop device punches holes in the image."""
    img = scratch.path("trim.raw")
    with open(img, "wb") as f:
        f.truncate(256 * MiB)
    s, disk, dev = start_fuse(serve, scratch, img, transport)
    fsmnt = scratch.mkdir("fs")
    run("mkfs.ext4", "-q", "-E", "nodiscard", dev)
    run("mount", dev, fsmnt)
    with open(os.path.join(fsmnt, "big"), "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    run("sync")
    used = os.stat(img).st_blocks * 512
    os.unlink(os.path.join(fsmnt, "big"))
    run("sync")
    run("fstrim", fsmnt)
    run("umount", fsmnt)
    after = os.stat(img).st_blocks * 512
    assert after < used - 48 * MiB, (used, after)
    # the holes are visible through the FUSE file too
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) < 256 * MiB
    finally:
        os.close(fd)
    run("e2fsck", "-fn", dev)
    stop_and_check_gone(s, scratch, dev)


def test_backend_error_is_eio(serve, scratch, transport):
    """An image on a tiny full tmpfs: writes fail with an error for the
    application, the server stays up and still reads."""
    tmp = scratch.mkdir("tiny")
    run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", tmp)
    img = os.path.join(tmp, "img.raw")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    s, disk, _ = start_fuse(serve, scratch, img, transport, loop=False)
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    import mmap
    buf = mmap.mmap(-1, MiB)
    buf.write(os.urandom(MiB))
    try:
        with pytest.raises(OSError) as e:
            for i in range(32):
                os.pwritev(fd, [buf], i * MiB)
        assert e.value.errno in (5, 28), e.value  # EIO or ENOSPC
        rb = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [rb], 0) == MiB
    finally:
        os.close(fd)
    assert s.proc.poll() is None
    stop_and_check_gone(s, scratch, None)
    lazy_umount(tmp)


def test_kill9_fails_fast(serve, scratch, transport):
    """kill -9 with a file system mounted on the loop device: I/O fails
    promptly, everything can be unmounted, the loop device goes away."""
    s, _, dev = start_fuse(serve, scratch, "ram:128M", transport)
    fsmnt = scratch.mkdir("fs")
    run("mkfs.ext4", "-q", dev)
    run("mount", dev, fsmnt)
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(timeout=20)
    r = run("dd", f"if={dev}", "of=/dev/null", "bs=1M", "count=4", "iflag=direct", "skip=8",
            check=False, timeout=60)
    assert r.returncode != 0
    run("umount", "-l", fsmnt, timeout=60)
    wait_for(lambda: not loop_exists(dev), 30, f"{dev} autoclear")
    mnt = os.path.join(scratch.dir, "mnt")
    run("umount", "-l", mnt, check=False, timeout=60)
    assert not is_mounted(mnt)


def test_fsync_survives_kill(serve, scratch, transport):
    """Every write acknowledged after fsync is in the image, even when the
    server is killed right after."""
    img = scratch.path("sync.raw")
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    s, disk, _ = start_fuse(serve, scratch, img, transport, loop=False)
    blocks = {}
    fd = os.open(disk, os.O_RDWR)
    try:
        for i in range(16):
            off = (i * 7 % 16) * MiB + i * 512
            data = os.urandom(64 * 1024)
            os.pwrite(fd, data, off)
            blocks[off] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(timeout=20)
    lazy_umount(os.path.join(scratch.dir, "mnt"))
    with open(img, "rb") as f:
        for off, data in blocks.items():
            f.seek(off)
            assert f.read(len(data)) == data


def test_stop_with_file_held_open(serve, scratch, transport):
    """SIGTERM while a process holds the file open: the server detaches the
    mount lazily, aborts the connection and exits; the holder gets errors."""
    s, disk, _ = start_fuse(serve, scratch, "ram:16M", transport, loop=False)
    import mmap
    buf = mmap.mmap(-1, 4096)
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)  # no page cache to answer for the server
    try:
        assert os.preadv(fd, [buf], 0) == 4096
        assert s.stop(timeout=30) == 0, s.stderr()
        assert "aborting the connection" in s.stderr()
        with pytest.raises(OSError):
            os.preadv(fd, [buf], 12 * MiB)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # FLUSH on a dead connection: ENOTCONN
    assert not is_mounted(os.path.join(scratch.dir, "mnt"))


def ext4_dir(scratch, mb=128):
    """An ext4 file system (an image mounted with -o loop, detached again
    on unmount) in the scratch dir: a store where io_uring reads the page
    cache without a worker thread (RWF_NOWAIT), unlike tmpfs."""
    img = scratch.path("ext4.img")
    with open(img, "wb") as f:
        f.truncate(mb * MiB)
    run("mkfs.ext4", "-q", "-F", img)
    d = scratch.mkdir("ext4")
    run("mount", "-o", "loop", img, d)
    return d


def drop_file_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_file_reads_on_the_queue_ring(serve, scratch, transport):
    """An image on ext4, its page cache dropped: over io_uring the file
    backend's reads that miss the cache (and the flushes) go on the FUSE
    queue's own ring, not through the backend's ring and a second wake-up;
    the loop device is read with O_DIRECT (no FUSE page cache in between),
    sequentially and at scattered 4 KiB offsets, and every byte must be the
    image's; then a write + fsync and the same read again."""
    img = os.path.join(ext4_dir(scratch), "disk.raw")
    data = os.urandom(48 * MiB)
    with open(img, "wb") as f:
        f.write(data)
    drop_file_cache(img)
    s, _, dev = start_fuse(serve, scratch, img, transport)
    got = scratch.path("got.raw")
    run("dd", f"if={dev}", f"of={got}", "bs=1M", "iflag=direct", timeout=120)
    with open(got, "rb") as f:
        assert f.read() == data
    drop_file_cache(img)
    # 4 KiB reads at scattered offsets, each compared with the image
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        for i in range(512):
            off = (i * 7919 % (48 * 256)) * 4096
            assert os.preadv(fd, [buf], off) == 4096
            assert buf[:] == data[off:off + 4096], off
    finally:
        os.close(fd)
    patch = os.urandom(4 * MiB)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(patch))
        buf.write(patch)
        assert os.pwritev(fd, [buf], 5 * MiB) == len(patch)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_file_cache(img)
    run("dd", f"if={dev}", f"of={got}", "bs=1M", "iflag=direct", timeout=120)
    want = data[:5 * MiB] + patch + data[9 * MiB:]
    with open(got, "rb") as f:
        assert f.read() == want
    stop_and_check_gone(s, scratch, dev, transport)
    m = re.search(r"(\d+) backend I/Os on the queue rings", s.stderr())
    assert m, s.stderr()
    on_ring = int(m.group(1))
    assert on_ring > 0 if transport == "uring" else on_ring == 0, m.group(0)
    with open(img, "rb") as f:
        assert f.read() == want


def test_forced_uring_enables_the_module_parameter(serve, scratch):
    """--fuse-enable-uring switches enable_uring on when it is off, and says
    so on stderr (--fuse-transport uring alone refuses: test_shared_state.py)."""
    if not os.path.exists(ENABLE_URING):
        pytest.skip("kernel without FUSE over io_uring")
    with open(ENABLE_URING) as f:
        old = f.read().strip()
    try:
        with open(ENABLE_URING, "w") as f:
            f.write("N")
        s, disk, _ = start_fuse(serve, scratch, "ram:8M", "uring", "--fuse-enable-uring", loop=False)
        with open(ENABLE_URING) as f:
            assert f.read().strip() == "Y"
        assert f"set {ENABLE_URING} to Y for the whole machine" in s.stderr()
        transport_in_status(s, "uring")
        with open(disk, "r+b", buffering=0) as f:
            f.write(b"ring" * 1024)
        stop_and_check_gone(s, scratch, None, "uring")
    finally:
        with open(ENABLE_URING, "w") as f:
            f.write(old)
