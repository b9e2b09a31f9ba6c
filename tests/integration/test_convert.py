"""test_convert.py - `devio convert` against qemu-img (compare, check) and
from real peers (a devio and an nbdkit NBD server), the sparseness of what
it writes (st_blocks), windows and overlays as sources, the refusals
(an image onto itself), the progress line as a terminal shows it (tmux),
and `devio info --json` read back with Python's json.  -O vhd: images
read back by qemu's vpc driver (info, compare, convert), their footer,
header and BAT parsed here, written again through devio's NBD server.
-O qcow2: images checked by qemu-img (check, info, compare) for both
versions and several cluster sizes, written again through devio's NBD
server."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

from conftest import DEVIO, run_ok, wait_for

MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-convert-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def devio(*args, check=True):
    p = subprocess.run([DEVIO] + list(args), capture_output=True, text=True, timeout=120)
    if check and p.returncode:
        raise AssertionError(f"devio {args} exited {p.returncode}: {p.stderr}")
    return p


def sparse_source(path):
    """32 MiB: holes, 3 MiB of random data in two places, and 4 MiB of
    zeroes written out (allocated, all zero)."""
    a, b = os.urandom(2 * MiB), os.urandom(MiB + 4096)
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB)
        f.write(a)
        f.seek(10 * MiB)
        f.write(bytes(4 * MiB))
        f.seek(20 * MiB + 512)
        f.write(b)
    expect = bytearray(32 * MiB)
    expect[3 * MiB:5 * MiB] = a
    expect[20 * MiB + 512:20 * MiB + 512 + len(b)] = b
    return bytes(expect)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_raw_to_raw_is_sparse_and_identical(tmp):
    src, out = os.path.join(tmp, "src.raw"), os.path.join(tmp, "out.raw")
    sparse_source(src)
    p = devio("convert", src, out)
    assert "converted 33554432 bytes" in p.stderr
    assert "Images are identical" in run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", src, out)
    assert os.path.getsize(out) == 32 * MiB
    # only the 3 MiB of data (rounded to file system blocks) is allocated:
    # neither the holes nor the written-out zeroes of the source
    assert os.stat(out).st_blocks * 512 <= 3 * MiB + 2 * 65536, os.stat(out).st_blocks
    assert os.stat(out).st_blocks < os.stat(src).st_blocks
    # an existing file is replaced, not merged into
    with open(out, "r+b") as f:
        f.write(b"x" * 100)
        f.truncate(64 * MiB)
    devio("convert", "-O", "raw", src, out)
    assert read(out) == read(src)


def test_from_nbd_servers(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    expect = sparse_source(src)
    sock = os.path.join(tmp, "d.sock")
    serve(src, "--readonly", "--nbd", f"unix:{sock}").wait_unix(sock)
    out = os.path.join(tmp, "out.raw")
    devio("convert", f"nbd+unix:///?socket={sock}", out)
    assert read(out) == expect
    run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", src, out)
    assert os.stat(out).st_blocks * 512 <= 3 * MiB + 2 * 65536
    # a devio server, and ram: (nothing but zeroes: nothing written)
    dsock = os.path.join(tmp, "s.sock")
    serve(src, "--readonly", "--devio", f"unix:{dsock}").wait_unix(dsock)
    out3 = os.path.join(tmp, "devio.raw")
    devio("convert", f"devio+unix://{dsock}", out3)
    assert read(out3) == expect
    p = devio("convert", "ram:8M", out3)
    assert "8388608 bytes not written" in p.stderr
    assert read(out3) == bytes(8 * MiB) and os.stat(out3).st_blocks == 0
    # nbdkit's pattern plugin: every byte is data
    ksock = os.path.join(tmp, "k.sock")
    k = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "pattern", "3M"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(ksock), 10, ksock)
        out2 = os.path.join(tmp, "pattern.raw")
        devio("convert", f"nbd+unix:///?socket={ksock}", out2)
        run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", f"nbd+unix:///?socket={ksock}", out2)
    finally:
        k.terminate()
        k.wait(timeout=20)


def test_window_and_overlay_sources(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    expect = sparse_source(src)
    out = os.path.join(tmp, "win.raw")
    devio("convert", "--offset", "3M", "--size", "5M", src, out)
    assert read(out) == expect[3 * MiB:8 * MiB]
    # an overlay's view: the source with the overlay's writes
    cow = os.path.join(tmp, "o.cow")
    sock = os.path.join(tmp, "c.sock")
    s = serve(src, "--cow", cow, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 100k", f"nbd+unix:///?socket={sock}")
    assert s.stop() == 0
    view = bytearray(expect)
    view[MiB:MiB + 100 * 1024] = b"\x3c" * (100 * 1024)
    devio("convert", "--cow", cow, src, out)
    assert read(out) == bytes(view)
    assert read(src) == expect


def test_self_copy_refused(tmp):
    src = os.path.join(tmp, "src.raw")
    expect = sparse_source(src)
    link = os.path.join(tmp, "link.raw")
    os.symlink(src, link)
    hard = os.path.join(tmp, "hard.raw")
    os.link(src, hard)
    for dst in (src, link, hard):
        p = devio("convert", src, dst, check=False)
        assert p.returncode == 1 and "same file" in p.stderr, p.stderr
    assert read(src) == expect


def convert_closing(fds, *args):
    """devio convert with the descriptors fds closed, as a caller may
    leave them: the files the source opens take the lowest numbers."""
    return subprocess.run([DEVIO, "convert", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=120, preexec_fn=lambda: [os.close(fd) for fd in fds])


def test_backing_file_refused_as_dst_on_any_descriptor(tmp):
    """A qcow2 child converted onto its own backing file is refused, also
    when the caller closed descriptors 0-2 so that the files the source
    opens take those numbers (the refusal then only in the exit status:
    there is no stderr); a DST the caller holds open itself (a
    redirection) is no reason to refuse."""
    base, child = os.path.join(tmp, "base.raw"), os.path.join(tmp, "child.qcow2")
    with open(base, "wb") as f:
        f.write(os.urandom(4 * MiB))
    before = read(base)
    run_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", child)
    for fds in ((), (0, 1, 2)):
        p = convert_closing(fds, "--format", "qcow2", child, base)
        assert p.returncode == 1, p.stderr
        assert fds or "refusing to write over a file the source is made of" in p.stderr, p.stderr
        assert read(base) == before
    out = os.path.join(tmp, "out.raw")
    with open(out, "wb") as held:
        p = subprocess.run([DEVIO, "convert", "--format", "qcow2", child, out], capture_output=True, text=True,
                           timeout=120, pass_fds=(held.fileno(),))
    assert p.returncode == 0, p.stderr
    assert read(out) == before


def test_block_devices_compared_by_device_not_node(tmp):
    """Two nodes of one loop device are one disk: converting the device
    onto a second node of it is the same-file refusal, and a qcow2 child
    whose backing file is the device converted onto that second node is
    refused as a file the source is made of; the device is never written."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    base = os.path.join(tmp, "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(4 * MiB))
    before = read(base)
    r = subprocess.run(["losetup", "-f", "--show", base], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    loop = r.stdout.strip()
    try:
        node = os.path.join(tmp, "node")
        os.mknod(node, 0o600 | 0o060000, os.stat(loop).st_rdev)  # S_IFBLK
        child = os.path.join(tmp, "child.qcow2")
        run_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", loop, "-F", "raw", child)
        p = devio("convert", loop, node, check=False)
        assert p.returncode == 1 and "same file" in p.stderr, p.stderr
        p = devio("convert", "--format", "qcow2", child, node, check=False)
        assert p.returncode == 1 and "the source is made of" in p.stderr, p.stderr
        assert read(base) == before
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=30)


@pytest.mark.parametrize("fmt,qfmt", [("qcow2", "qcow2"), ("vhd", "vpc")])
def test_convert_to_image_formats(tmp, fmt, qfmt):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    out = os.path.join(tmp, "out." + fmt)
    p = devio("convert", "-O", fmt, src, out, check=False)
    assert p.returncode == 0, p.stderr
    if fmt == "qcow2":
        run_ok("qemu-img", "check", out)
    run_ok("qemu-img", "compare", "-f", "raw", "-F", qfmt, src, out)


# ---- -O vhd, read back by qemu's vpc driver ----

BLOCK = 2 * MiB


def vhd_meta(path):
    """Footer fields and the BAT of a VHD, parsed here from the spec."""
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        foot = f.read(512)
        m = {"creator": foot[28:32], "size": struct.unpack(">Q", foot[48:56])[0],
             "chs": struct.unpack(">HBB", foot[56:60]), "type": struct.unpack(">I", foot[60:64])[0],
             "checksum_ok": struct.unpack(">I", foot[64:68])[0] == ~sum(foot[:64] + foot[68:]) & 0xffffffff,
             "uid": foot[68:84], "file_size": f.tell()}
        if m["type"] == 3:
            f.seek(0)
            assert f.read(512) == foot  # the copy at 0
            h = f.read(1024)
            assert h[:8] == b"cxsparse"
            assert struct.unpack(">I", h[36:40])[0] == ~sum(h[:36] + h[40:]) & 0xffffffff
            table, = struct.unpack(">Q", h[16:24])
            n, bs = struct.unpack(">II", h[28:36])
            assert bs == BLOCK
            f.seek(table)
            m["bat"] = list(struct.unpack(f">{n}I", f.read(4 * n)))
    return m


def qemu_info(path):
    return json.loads(run_ok("qemu-img", "info", "-f", "vpc", "--output=json", path))


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_convert_to_vhd_read_by_qemu(tmp, sub):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    out = os.path.join(tmp, "out.vhd")
    p = devio("convert", "-O", "vhd", "-o", f"subformat={sub}", src, out)
    # 32 MiB is no whole CHS geometry: said, and the largest one written
    assert "no whole CHS geometry" in p.stderr and "963/4/17" in p.stderr
    info = qemu_info(out)
    assert info["format"] == "vpc" and info["virtual-size"] == 32 * MiB
    assert "Images are identical" in run_ok("qemu-img", "compare", "-f", "vpc", out, "-F", "raw", src)
    m = vhd_meta(out)
    assert m["creator"] == b"dvio" and m["checksum_ok"] and m["size"] == 32 * MiB
    assert m["chs"] == (65535, 16, 255)
    st = os.stat(out)
    if sub == "dynamic":
        assert m["type"] == 3
        # data in 3 MiB..5 MiB (blocks 1, 2) and 20 MiB+512.. (block 10) only
        assert [i for i, e in enumerate(m["bat"]) if e != 0xFFFFFFFF] == [1, 2, 10]
        assert st.st_size == 512 + 1024 + 512 + 3 * (512 + BLOCK) + 512
    else:
        assert m["type"] == 2 and st.st_size == 32 * MiB + 512
    assert st.st_blocks * 512 <= 3 * MiB + 4 * 65536  # the data, not the zeroes
    j = json.loads(devio("info", "--json", out).stdout)
    assert j["format"] == "vhd" and j["virtual_size"] == 32 * MiB
    assert j["stack"][0]["description"].startswith(f"VHD {sub}")
    if sub == "dynamic":
        assert "3 of 16 blocks" in j["stack"][0]["description"]


def test_vhd_sizes_and_geometry(tmp):
    """A whole geometry is written as the specification computes it (qemu
    reads that size from it, no warning); other sizes keep their exact
    size; odd sizes become whole sectors."""
    for size, chs, warn in [(964 * 4 * 17 * 512, (964, 4, 17), False),
                            (21 * MiB + 4096, (65535, 16, 255), True),
                            (1000 * 1000, (65535, 16, 255), True)]:
        src = os.path.join(tmp, "s.raw")
        with open(src, "wb") as f:
            f.truncate(size)
            f.seek(size - 700)
            f.write(b"\xd7" * 700)
        out = os.path.join(tmp, "o.vhd")
        p = devio("convert", "-O", "vhd", src, out)
        assert ("CHS geometry" in p.stderr) == warn, p.stderr
        want = (size + 511) // 512 * 512
        assert qemu_info(out)["virtual-size"] == want
        assert vhd_meta(out)["chs"] == chs
        ref = os.path.join(tmp, "ref.raw")
        run_ok("qemu-img", "convert", "-f", "vpc", "-O", "raw", out, ref)
        assert read(ref) == read(src) + bytes(want - size)
    assert "1000000 bytes become 1000448" in p.stderr
    # past the largest geometry (127 GiB) the algorithm itself gives 65535/16/255
    big = os.path.join(tmp, "big.vhd")
    p = devio("convert", "-O", "vhd", "ram:200G", big)
    assert "CHS geometry" not in p.stderr
    assert qemu_info(big)["virtual-size"] == 200 << 30
    m = vhd_meta(big)
    assert m["chs"] == (65535, 16, 255) and len(m["bat"]) == 102400 and set(m["bat"]) == {0xFFFFFFFF}
    assert os.path.getsize(big) == 512 + 1024 + 4 * 102400 + 512


@pytest.mark.parametrize("size", [32 * MiB, 21 * MiB + 4096, 1000 * MiB])
def test_vhd_force_size_off_matches_qemu(tmp, size):
    """-o force_size=off rounds up to a whole geometry as qemu-img does by
    default: the same size and geometry as qemu-img create's."""
    q = os.path.join(tmp, "q.vhd")
    run_ok("qemu-img", "create", "-q", "-f", "vpc", q, str(size))
    src = os.path.join(tmp, "s.raw")
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(size // 3)
        f.write(b"\x42" * 5000)
    out = os.path.join(tmp, "o.vhd")
    p = devio("convert", "-O", "vhd", "-o", "subformat=dynamic,force_size=off", src, out)
    assert "CHS geometry" not in p.stderr, p.stderr
    assert qemu_info(out)["virtual-size"] == qemu_info(q)["virtual-size"] > size
    assert vhd_meta(out)["chs"] == vhd_meta(q)["chs"]
    assert json.loads(devio("info", "--json", out).stdout)["virtual_size"] == qemu_info(q)["virtual-size"]
    run_ok("qemu-img", "compare", "-f", "vpc", out, "-F", "raw", src)  # the rest reads as zeroes


def test_convert_to_vhd_from_nbd_and_qcow2(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    expect = sparse_source(src)
    sock = os.path.join(tmp, "d.sock")
    serve(src, "--readonly", "--nbd", f"unix:{sock}").wait_unix(sock)
    out = os.path.join(tmp, "nbd.vhd")
    devio("convert", "-O", "vhd", f"nbd+unix:///?socket={sock}", out)
    run_ok("qemu-img", "compare", "-f", "vpc", out, "-F", "raw", src)
    assert sum(e != 0xFFFFFFFF for e in vhd_meta(out)["bat"]) == 3
    # a qcow2 image qemu made and filled, served by qemu-nbd
    q = os.path.join(tmp, "src.qcow2")
    run_ok("qemu-img", "create", "-q", "-f", "qcow2", q, "24M")
    run_ok("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 300k", "-c", "write -P 0xa5 17M 2M", q)
    qsock = os.path.join(tmp, "q.sock")
    k = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-r", "-k", qsock, q], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(qsock), 10, qsock)
        out2 = os.path.join(tmp, "q.vhd")
        devio("convert", "-O", "vhd", f"nbd+unix:///?socket={qsock}", out2)
    finally:
        k.terminate()
        k.wait(timeout=20)
    assert "Images are identical" in run_ok("qemu-img", "compare", "-f", "vpc", out2, "-F", "qcow2", q)
    # blocks 0 (1M..1.3M), 8 and 9 (17M..19M)
    assert [i for i, e in enumerate(vhd_meta(out2)["bat"]) if e != 0xFFFFFFFF] == [0, 8, 9]
    # the qcow2 file itself, where this tree reads qcow2
    out3 = os.path.join(tmp, "q2.vhd")
    p = devio("convert", "--format", "qcow2", "-O", "vhd", q, out3, check=False)
    if p.returncode:
        assert not os.path.exists(out3)
        pytest.skip(f"--format qcow2 is not in this tree: {p.stderr.strip()}")
    run_ok("qemu-img", "compare", "-f", "vpc", out3, "-F", "qcow2", q)


def test_vhd_convert_syncs_once_not_per_block(tmp):
    """A new image no one sees until it is renamed into place needs no
    barrier per block: 16 blocks of data, one data sync at the end (and
    the creation's and the folder's fsyncs), counted by strace."""
    if not shutil.which("strace"):
        pytest.skip("no strace")
    src = os.path.join(tmp, "src.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(32 * MiB))
    out = os.path.join(tmp, "out.vhd")
    p = subprocess.run(["strace", "-f", "-c", "-o", os.path.join(tmp, "st"), "-e", "trace=fdatasync,fsync",
                        DEVIO, "convert", "-O", "vhd", src, out], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))  # LeakSanitizer cannot run traced
    assert p.returncode == 0, p.stderr
    calls = {}
    with open(os.path.join(tmp, "st")) as f:
        for line in f:
            fields = line.split()
            if fields and fields[-1] in ("fdatasync", "fsync"):
                calls[fields[-1]] = int(fields[3])
    assert calls.get("fdatasync", 0) + calls.get("fsync", 0) <= 4, calls
    assert sum(e != 0xFFFFFFFF for e in vhd_meta(out)["bat"]) == 16
    run_ok("qemu-img", "compare", "-f", "vpc", out, "-F", "raw", src)


def test_vhd_made_by_convert_served_and_written(serve, tmp):
    """The image devio made, served by devio, written through NBD (new
    blocks and allocated ones), then read by qemu's vpc driver."""
    src = os.path.join(tmp, "src.raw")
    expect = bytearray(sparse_source(src))
    out = os.path.join(tmp, "out.vhd")
    devio("convert", "-O", "vhd", src, out)
    uid = vhd_meta(out)["uid"]
    sock = os.path.join(tmp, "n.sock")
    s = serve(out, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    writes = [(0x11, 0, 4096), (0x22, 4 * MiB - 512, 1024), (0x33, 13 * MiB + 7, 100000),
              (0x44, 32 * MiB - 4096, 4096)]
    cmds = []
    for pat, off, ln in writes:
        cmds += ["-c", f"write -P {pat:#x} {off} {ln}"]
        expect[off:off + ln] = bytes([pat]) * ln
    run_ok("qemu-io", "-f", "raw", *cmds, f"nbd+unix:///?socket={sock}")
    assert s.stop() == 0
    ref = os.path.join(tmp, "ref.raw")
    run_ok("qemu-img", "convert", "-f", "vpc", "-O", "raw", out, ref)
    assert read(ref) == bytes(expect)
    m = vhd_meta(out)
    assert m["uid"] == uid and m["checksum_ok"]
    assert [i for i, e in enumerate(m["bat"]) if e != 0xFFFFFFFF] == [0, 1, 2, 6, 10, 15]


# ---- -O qcow2, read back by qemu ----

def qcow2_info(path):
    return json.loads(run_ok("qemu-img", "info", "-f", "qcow2", "--output=json", path))


def qcow2_check(path):
    """qemu-img check --output=json: no corruption, no leak."""
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", path], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    c = json.loads(p.stdout)
    assert c.get("corruptions", 0) == 0 and c.get("leaks", 0) == 0 and c.get("check-errors", 0) == 0, c
    return c


@pytest.mark.parametrize("opts,compat,cs", [(None, "1.1", 65536), ("compat=0.10", "0.10", 65536),
                                            ("cluster_size=4096", "1.1", 4096),
                                            ("compat=0.10,cluster_size=512", "0.10", 512),
                                            ("cluster_size=2M", "1.1", 2 * MiB)])
def test_convert_to_qcow2_read_by_qemu(tmp, opts, compat, cs):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    out = os.path.join(tmp, "out.qcow2")
    devio("convert", "-O", "qcow2", *(["-o", opts] if opts else []), src, out)
    qcow2_check(out)
    info = qcow2_info(out)
    assert info["format"] == "qcow2" and info["virtual-size"] == 32 * MiB
    assert info["cluster-size"] == cs
    assert info["format-specific"]["data"]["compat"] == compat
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    assert "backing-filename" not in info
    assert "Images are identical" in run_ok("qemu-img", "compare", "-f", "qcow2", out, "-F", "raw", src)
    # sparse: 3 MiB of data in two pieces (a partial cluster at each end),
    # metadata (header, refcount table, L1, a few clusters; with small
    # clusters L2 tables and refcount blocks add up to 1/32 of the data),
    # not 32 MiB
    bound = 3 * MiB * 33 // 32 + 9 * cs
    assert os.path.getsize(out) <= bound and os.stat(out).st_blocks * 512 <= bound
    j = json.loads(devio("info", out, "--json").stdout)
    assert j["format"] == "qcow2" and j["size"] == 32 * MiB
    assert [f for f in os.listdir(tmp) if f.startswith("out.qcow2.")] == []  # no temporary left


def test_convert_through_a_symlink_replaces_its_target(tmp):
    """A symbolic link at DST (here into another folder) is followed, as
    qemu-img follows it: the image it leads to is replaced by the new one,
    made next to itself, and the link stays a link."""
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    os.mkdir(os.path.join(tmp, "images"))
    target = os.path.join(tmp, "images", "disk.qcow2")
    with open(target, "wb") as f:
        f.write(b"old image")
    link = os.path.join(tmp, "disk.qcow2")
    os.symlink("images/disk.qcow2", link)
    devio("convert", "-O", "qcow2", src, link)
    assert os.path.islink(link) and os.readlink(link) == "images/disk.qcow2"
    qcow2_check(target)
    assert "Images are identical" in run_ok("qemu-img", "compare", "-f", "qcow2", target, "-F", "raw", src)
    assert sorted(os.listdir(os.path.join(tmp, "images"))) == ["disk.qcow2"]  # no temporary left
    assert sorted(os.listdir(tmp)) == ["disk.qcow2", "images", "src.raw"]


def test_qcow2_empty_and_odd_sizes(tmp):
    """A 0-byte source (no L1 table, as qemu makes it) and a size that is
    no whole sector (rounded up, said)."""
    for size, want in [(0, 0), (1000, 1024), (5 * MiB + 512, 5 * MiB + 512)]:
        src = os.path.join(tmp, f"s{size}.raw")
        with open(src, "wb") as f:
            f.truncate(size)
        out = os.path.join(tmp, f"s{size}.qcow2")
        p = devio("convert", "-O", "qcow2", src, out)
        assert ("whole 512-byte sectors" in p.stderr) == (size % 512 != 0), p.stderr
        qcow2_check(out)
        assert qcow2_info(out)["virtual-size"] == want


def test_qcow2_made_by_convert_served_and_written(serve, tmp):
    """The image devio made, served by devio, written through NBD (new
    clusters, clusters already there, a discard), then checked and read
    by qemu."""
    src = os.path.join(tmp, "src.raw")
    expect = bytearray(sparse_source(src))
    for opts in ("compat=1.1", "compat=0.10,cluster_size=4096"):
        out = os.path.join(tmp, "out.qcow2")
        devio("convert", "-O", "qcow2", "-o", opts, src, out)
        sock = os.path.join(tmp, "n.sock")
        s = serve("--format", "qcow2", out, "--nbd", f"unix:{sock}")
        s.wait_unix(sock)
        want = bytearray(expect)
        writes = [(0x11, 0, 4096), (0x22, 4 * MiB - 512, 1024), (0x33, 13 * MiB + 7, 100000),
                  (0x44, 32 * MiB - 4096, 4096)]
        cmds = []
        for pat, off, ln in writes:
            cmds += ["-c", f"write -P {pat:#x} {off} {ln}"]
            want[off:off + ln] = bytes([pat]) * ln
        cmds += ["-c", f"write -z {3 * MiB} {MiB}"]
        want[3 * MiB:4 * MiB] = bytes(MiB)
        run_ok("qemu-io", "-f", "raw", *cmds, f"nbd+unix:///?socket={sock}")
        assert s.stop() == 0  # the server removes its socket
        qcow2_check(out)
        ref = os.path.join(tmp, "ref.raw")
        with open(ref, "wb") as f:
            f.write(want)
        assert "Images are identical" in run_ok("qemu-img", "compare", "-f", "qcow2", out, "-F", "raw", ref)


def test_qcow2_refusals_leave_nothing(tmp):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    out = os.path.join(tmp, "out.qcow2")
    with open(out, "wb") as f:
        f.write(b"an older file")
    for opts, why in [("compat=2", "compat=0.10|1.1"), ("cluster_size=1000", "power of two"),
                      ("cluster_size=256", "power of two"), ("cluster_size=4M", "power of two"),
                      ("cluster_size=64x", "cluster_size=512..2M"), ("preallocation=full", "a qcow2 image (")]:
        p = devio("convert", "-O", "qcow2", "-o", opts, src, out, check=False)
        assert p.returncode == 1 and why in p.stderr, (opts, p.stderr)
    # too large for the L1 table 512-byte clusters allow (a RAM disk holds nothing)
    p = devio("convert", "-O", "qcow2", "-o", "cluster_size=512", "ram:1T", out, check=False)
    assert p.returncode == 1 and "L1 table over 32 MiB" in p.stderr, p.stderr
    assert read(out) == b"an older file"
    assert sorted(os.listdir(tmp)) == ["out.qcow2", "src.raw"]


def test_vhd_refusals_leave_nothing(tmp):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    out = os.path.join(tmp, "out.vhd")
    with open(out, "wb") as f:
        f.write(b"an older file")
    for opts, why in [("subformat=sparse", "subformat=dynamic|fixed"), ("block_size=1M", "a VHD ("),
                      ("force_size=maybe", "force_size=on|off"),
                      ("fixed", "KEY=VALUE")]:
        p = devio("convert", "-O", "vhd", "-o", opts, src, out, check=False)
        assert p.returncode == 1 and why in p.stderr, p.stderr
    # larger than a VHD can be (a RAM disk of 3 TiB holds nothing)
    p = devio("convert", "-O", "vhd", "ram:3T", out, check=False)
    assert p.returncode == 1 and "2040 GiB" in p.stderr, p.stderr
    assert read(out) == b"an older file"
    assert sorted(os.listdir(tmp)) == ["out.vhd", "src.raw"]  # no temporary file either
    p = devio("convert", "-O", "vhd", src, "/dev/null", check=False)
    assert p.returncode == 1 and "makes a new image file: /dev/null is not one" in p.stderr, p.stderr
    p = devio("convert", "-O", "raw", "-o", "subformat=fixed", src, out, check=False)
    assert p.returncode == 2 and "raw image takes no options" in p.stderr
    # an existing file is replaced by the new image
    devio("convert", "-O", "vhd", src, out)
    assert qemu_info(out)["virtual-size"] == 32 * MiB
    assert sorted(os.listdir(tmp)) == ["out.vhd", "src.raw"]


def convert_from_failing_source(tmp, fmt, dst):
    """devio convert -O fmt from an nbdkit source that fails after 4 MiB."""
    ksock = os.path.join(tmp, "k.sock")
    pread = ('if [ "$4" -ge 4194304 ]; then echo "EIO no" >&2; exit 1; fi; '
             'head -c "$3" /dev/zero | tr "\\0" "\\141"')
    k = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "eval", "get_size=echo 8388608", f"pread={pread}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(ksock), 10, ksock)
        p = devio("convert", "-O", fmt, f"nbd+unix:///?socket={ksock}", dst, check=False)
    finally:
        k.terminate()
        k.wait(timeout=20)
    assert p.returncode == 1 and "convert stopped" in p.stderr and "after 4194304 bytes" in p.stderr, p.stderr


def test_failed_vhd_convert_leaves_dst_as_it_was(tmp):
    """The source fails after 4 MiB (two blocks written): the old DST
    stays, the half-made image is gone."""
    out = os.path.join(tmp, "out.vhd")
    with open(out, "wb") as f:
        f.write(b"the old image")
    convert_from_failing_source(tmp, "vhd", out)
    assert read(out) == b"the old image"
    assert sorted(os.listdir(tmp)) == ["k.sock", "out.vhd"]


def test_failed_raw_convert_through_a_symlink_keeps_the_link(tmp):
    """A raw DST is written in place, through a symlink to its target; when
    the source fails, the half-written target goes and the link stays (it
    used to be the link that was removed, the half image left)."""
    os.mkdir(os.path.join(tmp, "images"))
    link = os.path.join(tmp, "out.raw")
    os.symlink("images/disk.raw", link)
    convert_from_failing_source(tmp, "raw", link)
    assert os.path.islink(link) and os.readlink(link) == "images/disk.raw"
    assert os.listdir(os.path.join(tmp, "images")) == []


def test_usage_errors():
    p = devio("convert", "-O", "vmdk", "a", "b", check=False)
    assert p.returncode == 2 and "want raw, vhd or qcow2" in p.stderr
    p = devio("convert", "onlyone", check=False)
    assert p.returncode == 2
    assert devio("convert", "--help").stdout.startswith("usage: devio convert")


def tmux(sock, *args):
    return subprocess.run(["tmux", "-L", sock] + list(args), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("cmd,done", [("convert -p", "converted"), ("copy", "copied")])
def test_progress_bar_in_a_terminal(tmp, cmd, done):
    """The bar with its rate and time left while it runs, and gone after
    (copy draws it whenever stderr is a terminal, convert with -p)."""
    if not shutil.which("tmux"):
        pytest.skip("no tmux")
    ksock = os.path.join(tmp, "k.sock")
    # a slow source (each 1 MiB read waits 100 ms) so the bar is seen mid-run
    k = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "--filter=delay", "pattern", "24M", "rdelay=100ms"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tsock = f"devio-test-{os.getpid()}"
    out = os.path.join(tmp, "out.raw")
    try:
        wait_for(lambda: os.path.exists(ksock), 10, ksock)
        line = f"{DEVIO} {cmd} 'nbd+unix:///?socket={ksock}' {out}; echo EXIT=$?; sleep 60"
        assert tmux(tsock, "new-session", "-d", "-x", "150", "-y", "10", line).returncode == 0
        seen = {}

        def pane_has(word):
            seen["pane"] = tmux(tsock, "capture-pane", "-p").stdout
            return word in seen["pane"]

        wait_for(lambda: pane_has("ETA"), 60, "the progress line")
        assert "%" in seen["pane"] and "MiB/s" in seen["pane"] and "[#" in seen["pane"] + "[#", seen["pane"]
        wait_for(lambda: pane_has("EXIT="), 120, f"{cmd} to finish")
        pane = seen["pane"]
        assert "EXIT=0" in pane, pane
        assert f"{done} 25165824 bytes" in pane
        assert "ETA" not in pane and "MiB/s" not in pane, pane  # the line cleared itself
    finally:
        tmux(tsock, "kill-server")
        k.terminate()
        k.wait(timeout=20)
    assert os.path.getsize(out) == 24 * MiB
    # without a terminal, nothing is drawn
    out2 = os.path.join(tmp, "out2.raw")
    p = devio(*cmd.split(), out, out2)
    assert "ETA" not in p.stderr and "\r" not in p.stderr


def test_info_json(tmp):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    j = json.loads(devio("info", "--json", src).stdout)
    assert j["format"] == "raw" and j["virtual_size"] == 32 * MiB == j["size"]
    assert 3 * MiB <= j["allocated"] <= 8 * MiB  # data and written-out zeroes, not the holes
    assert [layer["layer"] for layer in j["stack"]] == ["file"]
    t = devio("info", src).stdout
    assert "format: raw\n" in t and f"allocated: {j['allocated']}\n" in t
    # an overlay info would have to make is refused
    cow = os.path.join(tmp, "o.cow")
    p = devio("info", "--json", src, "--cow", cow, check=False)
    assert p.returncode == 1 and "never created" in p.stderr  # info makes no overlay
    assert not os.path.exists(cow)
    # a window
    j = json.loads(devio("info", "--json", "--offset", "3M", "--size", "2M", src).stdout)
    assert j["size"] == 2 * MiB and j["allocated"] == 2 * MiB
    # any bytes in a name: the JSON stays valid, the exact bytes in hex
    odd = os.path.join(tmp.encode(), b"odd\xff\"\\\n.raw")
    with open(odd, "wb") as f:
        f.truncate(MiB)
    p = subprocess.run([DEVIO.encode(), b"info", b"--json", odd], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert bytes.fromhex(j["source_hex"]) == odd
    assert j["source"] == odd.decode(errors="replace")
    assert j["allocated"] == 0


def test_info_json_of_an_overlay_stack(serve, tmp):
    src = os.path.join(tmp, "src.raw")
    sparse_source(src)
    cow = os.path.join(tmp, "o.cow")
    sock = os.path.join(tmp, "c.sock")
    s = serve(src, "--cow", cow, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 1 16M 128k", f"nbd+unix:///?socket={sock}")
    assert s.stop() == 0
    j = json.loads(devio("info", "--json", src, "--cow", cow).stdout)
    assert j["format"] == "cow over raw"
    assert [layer["layer"] for layer in j["stack"]] == ["cow", "file"]
    assert "2 of 512 blocks" in j["stack"][0]["description"]
    plain = json.loads(devio("info", "--json", src).stdout)
    assert j["allocated"] == plain["allocated"] + 128 * 1024  # the overlay's blocks over a hole
    assert j["read_only"] is True


def test_copy_shares_convert_rules(tmp):
    """devio copy (the same engine): a missing DST file is created sparse,
    an image is never copied onto itself."""
    src = os.path.join(tmp, "src.raw")
    expect = sparse_source(src)
    dst = os.path.join(tmp, "new.raw")
    devio("copy", src, dst)
    assert read(dst) == expect
    assert os.stat(dst).st_blocks * 512 <= 3 * MiB + 2 * 65536
    link = os.path.join(tmp, "link.raw")
    os.symlink(src, link)
    p = devio("copy", src, link, check=False)
    assert p.returncode == 1 and "same file" in p.stderr, p.stderr
    assert read(src) == expect
