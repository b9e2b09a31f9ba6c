"""test_vhd.py - the VHD format layer against qemu's vpc driver: images made
and filled by qemu-img/qemu-io are served byte-exact; images written through
devio (NBD, the devio protocol on ImDisk's command line, FUSE+loop with
mkfs/fsck) read back with qemu; differencing images (qemu cannot make them:
a small writer from the specification below) only with --format vhd;
corrupt headers are refused with a message naming the field."""
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import uuid

import pytest

import devio_wire as w
from conftest import DEVIO, run_ok, wait_for

MiB = 1 << 20
BLOCK = 2 * MiB


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-vhd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def qemu_vhd(path, size, sub="dynamic", *opts):
    o = ",".join([f"subformat={sub}", *opts])
    run_ok("qemu-img", "create", "-q", "-f", "vpc", "-o", o, path, str(size))
    return virtual_size(path)


def virtual_size(path):
    out = run_ok("qemu-img", "info", "-f", "vpc", "--output=json", path)
    return int(re.search(r'"virtual-size": (\d+)', out).group(1))


def qemu_write(path, *writes, fmt="vpc"):
    cmds = []
    for pat, off, ln in writes:
        cmds += ["-c", f"write -P {pat:#x} {off} {ln}"]
    run_ok("qemu-io", "-f", fmt, *cmds, path)


def qemu_raw(path, tmp, name="ref.raw"):
    out = os.path.join(tmp, name)
    run_ok("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def nbd_read(sock, tmp, name="got.raw"):
    out = os.path.join(tmp, name)
    run_ok("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock), out)
    with open(out, "rb") as f:
        return f.read()


def serve_nbd(serve, tmp, image, *extra):
    sock = os.path.join(tmp, "nbd.sock")
    s = serve(image, "--nbd", f"unix:{sock}", *extra)
    s.wait_unix(sock)
    return s, sock


def devio_fails(*args):
    r = subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout
    assert "AddressSanitizer" not in r.stderr and "runtime error:" not in r.stderr, r.stderr
    return r.stderr


def bat(path):
    """The BAT of a dynamic image, as a list of sector offsets."""
    with open(path, "rb") as f:
        foot = f.read(512)
        hdr_at = struct.unpack(">Q", foot[16:24])[0]
        f.seek(hdr_at)
        h = f.read(1024)
        table, = struct.unpack(">Q", h[16:24])
        n, = struct.unpack(">I", h[28:32])
        f.seek(table)
        return list(struct.unpack(f">{n}I", f.read(4 * n)))


# ---- images made by qemu, read by devio ----

@pytest.mark.parametrize("sub,opts", [("dynamic", ()), ("fixed", ()), ("dynamic", ("force_size=on",))])
def test_qemu_image_served_byte_exact(serve, tmp, sub, opts):
    img = os.path.join(tmp, "q.vhd")
    size = qemu_vhd(img, 21 * MiB + 4096, sub, *opts)  # CHS rounding: qemu's size is the truth
    qemu_write(img, (0xa5, 0, 4096), (0x11, MiB + 512, 70000), (0x5c, 9 * MiB, 3 * MiB),
               (0xe7, size - 8192, 8192))
    want = qemu_raw(img, tmp)
    assert len(want) == size
    s, sock = serve_nbd(serve, tmp, img)
    assert nbd_read(sock, tmp) == want
    info = run_ok("nbdinfo", "--json", uri(sock))
    assert f'"export-size": {size}' in info
    assert '"can_trim": true' in info and '"can_zero": true' in info
    assert s.stop() == 0
    assert subprocess.run([DEVIO, "cat", img], capture_output=True, timeout=60).stdout == want


def test_nbd_map_reports_unallocated_blocks_as_holes(serve, tmp):
    img = os.path.join(tmp, "q.vhd")
    qemu_vhd(img, 16 * MiB)
    qemu_write(img, (0x42, 4 * MiB + 100, 1000))
    s, sock = serve_nbd(serve, tmp, img)
    out = run_ok("nbdinfo", "--map", uri(sock))
    rows = [(int(r[0]), int(r[1]), int(r[2])) for r in (line.split() for line in out.splitlines() if line.strip())]
    assert sum(r[1] for r in rows) == virtual_size(img)
    data = [(o, n) for o, n, f in rows if f == 0]
    assert data and all(4 * MiB <= o and o + n <= 6 * MiB for o, n in data), out  # only in the block
    assert any(o <= 4 * MiB + 100 and 4 * MiB + 1100 <= o + n for o, n in data), out  # the written bytes
    assert sum(n for _, n in data) < BLOCK, out  # the rest of the block is a hole in the file
    assert all(f == 3 for o, n, f in rows if f != 0), out


# ---- images written through devio, read by qemu ----

def patterned(size):
    """Random data with zero stretches, a whole zero block among them."""
    data = bytearray(os.urandom(size))
    data[2 * MiB:4 * MiB] = bytes(BLOCK)        # one whole block of zeroes
    data[6 * MiB + 1000:7 * MiB] = bytes(MiB - 1000)
    return bytes(data)


def test_nbdcopy_and_qemu_io_through_nbd(serve, tmp):
    img = os.path.join(tmp, "w.vhd")
    size = qemu_vhd(img, 12 * MiB)
    raw = os.path.join(tmp, "src.raw")
    data = bytearray(patterned(size))
    with open(raw, "wb") as f:
        f.write(data)
    s, sock = serve_nbd(serve, tmp, img)
    run_ok("nbdcopy", raw, uri(sock))
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x5a 5242880 100000", "-c", "write -z -u 8M 2M",
           "-c", "flush", uri(sock))
    data[5 * MiB:5 * MiB + 100000] = b"\x5a" * 100000
    data[8 * MiB:10 * MiB] = bytes(BLOCK)
    assert s.stop() == 0
    with open(raw, "wb") as f:
        f.write(data)
    run_ok("qemu-img", "compare", "-f", "vpc", img, "-F", "raw", raw)
    assert virtual_size(img) == size
    entries = bat(img)
    assert entries[1] == 0xFFFFFFFF  # 2-4M: zeroes, never allocated
    assert entries[4] == 0xFFFFFFFF  # 8-10M: allocated by nbdcopy, freed by an unmapping zero
    assert entries[0] != 0xFFFFFFFF and entries[5] != 0xFFFFFFFF
    with open(img, "rb") as f:
        f.seek(-512, 2)
        assert f.read(8) == b"conectix"


def test_large_reads_spliced_in_pieces_from_tmpfs(serve):
    """On tmpfs the file splices reads; a VHD block's data starts 512 bytes
    into a page, so a 1 MiB read moved to it needs one page more than the
    1 MiB pipe holds and goes in pieces (frontends/nbd_fast.c); a piece the
    layer declines (its sectors absent from the bitmap) is read into memory
    in the middle of the same reply.  Byte-exact against qemu's vpc driver."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(prefix="devio-vhd-", dir="/dev/shm")
    try:
        img = os.path.join(d, "d.vhd")
        qemu_vhd(img, 8 * MiB)
        # block 0: only its first 512 KiB present; block 1: whole
        qemu_write(img, (0x5A, 0, 512 << 10), (0x33, BLOCK, BLOCK))
        ref = qemu_raw(img, d)
        _, sock = serve_nbd(serve, d, img)
        for reqs in ("1", "4"):
            out = os.path.join(d, "got.raw")
            run_ok("nbdcopy", "--request-size=1048576", "-R", reqs, uri(sock), out)
            with open(out, "rb") as f:
                assert f.read() == ref
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_all_zero_write_does_not_grow_the_file(serve, tmp):
    img = os.path.join(tmp, "z.vhd")
    qemu_vhd(img, 16 * MiB)
    before = os.path.getsize(img)
    r = subprocess.run([DEVIO, "write", img, "--offset", str(MiB)], input=bytes(6 * MiB),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s, sock = serve_nbd(serve, tmp, img)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0 0 4M", uri(sock))
    assert s.stop() == 0
    assert os.path.getsize(img) == before
    assert set(bat(img)) == {0xFFFFFFFF}


def test_trim_of_whole_blocks_frees_them(serve, tmp):
    img = os.path.join(tmp, "t.vhd")
    size = qemu_vhd(img, 8 * MiB)
    qemu_write(img, (0x33, 0, 8 * MiB))
    s, sock = serve_nbd(serve, tmp, img)
    run_ok("qemu-io", "-f", "raw", "-c", "discard 2M 2M", "-c", "discard 4M 1M", "-c", "flush", uri(sock))
    assert s.stop() == 0
    entries = bat(img)
    assert entries[1] == 0xFFFFFFFF and entries[0] != 0xFFFFFFFF and entries[2] != 0xFFFFFFFF
    want = bytearray(b"\x33" * 8 * MiB + bytes(size - 8 * MiB))
    want[2 * MiB:5 * MiB] = bytes(3 * MiB)  # freed block, and zeroes written over half a block
    assert qemu_raw(img, tmp) == bytes(want)


# ---- ImDisk's command line ----


def imdisk_rules_read(path):
    """The virtual disk as ImDisk's devio reads a dynamic VHD: footer copy
    at 0, header at 512, a one-sector bitmap before each block's data,
    bitmaps ignored, unallocated blocks zero."""
    with open(path, "rb") as f:
        img = f.read()
    assert img[:8] == b"conectix" and img[512:520] == b"cxsparse"
    assert struct.unpack(">I", img[60:64])[0] == 3
    size, = struct.unpack(">Q", img[48:56])
    table, = struct.unpack(">Q", img[512 + 16:512 + 24])
    bs, = struct.unpack(">I", img[512 + 32:512 + 36])
    out = bytearray(size)
    for blk in range((size + bs - 1) // bs):
        e, = struct.unpack(">I", img[table + 4 * blk:table + 4 * blk + 4])
        if e != 0xFFFFFFFF:
            n = min(bs, size - blk * bs)
            out[blk * bs:blk * bs + n] = img[e * 512 + 512:e * 512 + 512 + n]
    return bytes(out)


def imdisk_rules_write(path, off, data):
    """A write inside one block as ImDisk's devio makes it: a new block
    where the footer was (BAT entry, zeroes, footer after), the data, then
    0xFF bytes over the bitmap bytes the written sectors fall in."""
    with open(path, "r+b") as f:
        f.seek(512 + 16)
        table, = struct.unpack(">Q", f.read(8))
        f.seek(512 + 32)
        bs, = struct.unpack(">I", f.read(4))
        blk, inb = divmod(off, bs)
        f.seek(table + 4 * blk)
        e, = struct.unpack(">I", f.read(4))
        if e == 0xFFFFFFFF:
            f.seek(-512, 2)
            at = f.tell()
            foot = f.read(512)
            e = at // 512
            f.seek(table + 4 * blk)
            f.write(struct.pack(">I", e))
            f.seek(at)
            f.write(bytes(512 + bs) + foot)
        f.seek(e * 512 + 512 + inb)
        f.write(data)
        f.seek(e * 512 + (inb >> 12))
        f.write(b"\xff" * ((((len(data) + 511) >> 9) + 7) >> 3))


def test_image_written_by_imdisk_rules_is_served(serve, tmp):
    img = os.path.join(tmp, "w.vhd")
    size = qemu_vhd(img, 8 * MiB)
    want = bytearray(size)
    for off, ln, pat in ((4096, 1024, 0x61), (3 * MiB + 7 * 512, 512, 0x62), (3 * MiB + 64 * 1024, 8192, 0x63)):
        imdisk_rules_write(img, off, bytes([pat]) * ln)
        want[off:off + ln] = bytes([pat]) * ln
    assert qemu_raw(img, tmp) == bytes(want)
    s, sock = serve_nbd(serve, tmp, img)
    assert nbd_read(sock, tmp) == bytes(want)
    # sectors 200 and 300 of block 1: their bits unset (the second a partial sector)
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x64 3248128 512", "-c", "write -P 0x65 3299338 100", uri(sock))
    want[3248128:3248128 + 512] = b"\x64" * 512
    want[3299338:3299338 + 100] = b"\x65" * 100
    assert s.stop() == 0
    assert qemu_raw(img, tmp, "after.raw") == bytes(want)
    # devio honours the bitmap: the bits of the new sectors were set
    assert subprocess.run([DEVIO, "cat", img], capture_output=True, timeout=60).stdout == bytes(want)


def test_imdisk_command_line_serves_the_virtual_disk(imdisk, tmp):
    img = os.path.join(tmp, "i.vhd")
    size = qemu_vhd(img, 16 * MiB)
    qemu_write(img, (0x77, 5 * MiB, 65536))
    p, port = imdisk("PORT", img)
    with w.Client(port=port) as c:
        assert c.info()[0] == size
        assert c.read(5 * MiB, 65536) == (0, b"\x77" * 65536)
        assert c.write(11 * MiB + 3, b"imdisk") == (0, 6)
    payload = os.urandom(3 * MiB)
    r = subprocess.run([DEVIO, "write", f"devio://127.0.0.1:{port}", "--offset", str(MiB)], input=payload,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([DEVIO, "cat", f"devio://127.0.0.1:{port}"], capture_output=True, timeout=60)
    assert r.returncode == 0 and len(r.stdout) == size, r.stderr
    p.terminate()
    p.wait(timeout=20)
    want = bytearray(size)
    want[5 * MiB:5 * MiB + 65536] = b"\x77" * 65536
    want[11 * MiB + 3:11 * MiB + 9] = b"imdisk"
    want[MiB:4 * MiB] = payload
    assert r.stdout == bytes(want)
    assert qemu_raw(img, tmp) == bytes(want)
    assert imdisk_rules_read(img) == bytes(want)  # the layout ImDisk's devio reads


def test_image_made_by_convert_follows_imdisk_rules(imdisk, tmp):
    """A VHD `devio convert -O vhd` makes has the layout ImDisk's devio
    reads and writes (footer copy, header at 512, one-sector bitmaps, 2 MiB
    blocks), and its command line serves it."""
    src = os.path.join(tmp, "src.raw")
    data = bytearray(12 * MiB)
    data[MiB:MiB + 5000] = os.urandom(5000)
    data[7 * MiB - 100:7 * MiB + 100] = b"\x5e" * 200
    with open(src, "wb") as f:
        f.write(data)
    img = os.path.join(tmp, "c.vhd")
    run_ok(DEVIO, "convert", "-O", "vhd", src, img)
    assert imdisk_rules_read(img) == bytes(data)
    assert [i for i, e in enumerate(bat(img)) if e != 0xFFFFFFFF] == [0, 3]
    imdisk_rules_write(img, 9 * MiB + 1024, b"\x71" * 2048)  # a new block, ImDisk's way
    data[9 * MiB + 1024:9 * MiB + 3072] = b"\x71" * 2048
    assert qemu_raw(img, tmp) == bytes(data)
    p, port = imdisk("PORT", img)
    with w.Client(port=port) as c:
        assert c.info()[0] == len(data)
        assert c.read(7 * MiB - 512, 1024) == (0, bytes(data[7 * MiB - 512:7 * MiB + 512]))
        assert c.read(9 * MiB, 4096) == (0, bytes(data[9 * MiB:9 * MiB + 4096]))


def test_imdisk_novhd_serves_the_container(imdisk, tmp):
    img = os.path.join(tmp, "n.vhd")
    qemu_vhd(img, 16 * MiB)
    qemu_write(img, (0x21, 0, 4096))
    with open(img, "rb") as f:
        container = f.read()
    p, port = imdisk("--novhd", "PORT", img)
    with w.Client(port=port) as c:
        assert c.info()[0] == len(container)
        assert c.read(0, 512) == (0, container[:512])
        assert c.read(len(container) - 512, 512) == (0, container[-512:])


# ---- FUSE + loop: a file system on a VHD, read back by qemu ----

def test_fuse_loop_mkfs_fsck(serve, tmp):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    img = os.path.join(tmp, "fs.vhd")
    qemu_vhd(img, 96 * MiB)
    mnt, fs = os.path.join(tmp, "mnt"), os.path.join(tmp, "fs")
    os.makedirs(mnt)
    os.makedirs(fs)
    s = serve(img, "--fuse", mnt, "--loop")
    dev = None
    try:
        wait_for(lambda: re.search(r"^/dev/loop\d+$", s.stderr(), re.M) or s.proc.poll() is not None, 30,
                 "loop device")
        assert s.proc.poll() is None, s.stderr()
        dev = re.search(r"^(/dev/loop\d+)$", s.stderr(), re.M).group(1)
        run_ok("mkfs.ext4", "-q", dev)
        run_ok("mount", dev, fs)
        data = os.urandom(5 * MiB + 123)
        with open(os.path.join(fs, "f"), "wb") as f:
            f.write(data)
        run_ok("umount", fs)
        run_ok("e2fsck", "-fn", dev)
    finally:
        subprocess.run(["umount", fs], capture_output=True)
        assert s.stop() == 0, s.stderr()
        subprocess.run(["umount", mnt], capture_output=True)
    raw = os.path.join(tmp, "fs.raw")
    run_ok("qemu-img", "convert", "-f", "vpc", "-O", "raw", img, raw)
    run_ok("e2fsck", "-fn", raw)
    out = subprocess.run(["debugfs", "-R", "cat /f", raw], capture_output=True, timeout=60).stdout
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    assert virtual_size(img) >= 96 * MiB


# ---- differencing images, written from the specification ----

def checksum(b, field):
    return (~sum(b[:field] + b[field + 4:])) & 0xFFFFFFFF


def footer(size, dtype, data_offset, uid):
    f = bytearray(512)
    struct.pack_into(">8sIIQI4sI4sQQI I", f, 0, b"conectix", 2, 0x10000, data_offset, 0, b"test", 0x10000,
                     b"Wi2k", size, size, 0, dtype)
    f[68:84] = uid
    struct.pack_into(">I", f, 64, checksum(f, 64))
    return bytes(f)


def write_child(path, size, parent_uid, locators, blocks, block_size=BLOCK):
    """A differencing image: blocks maps a block number to (bitmap, data)."""
    n = (size + block_size - 1) // block_size
    bat_off = 512 + 1024
    bat_len = (n * 4 + 511) // 512 * 512
    pos = bat_off + bat_len
    h = bytearray(1024)
    struct.pack_into(">8sQQIII", h, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, bat_off, 0x10000, n, block_size)
    h[40:56] = parent_uid
    loc_blobs = []
    for i, (code, blob) in enumerate(locators):
        space = (len(blob) + 511) // 512 * 512
        struct.pack_into(">4sIIIQ", h, 576 + 24 * i, code, space, len(blob), 0, pos)
        loc_blobs.append((pos, blob))
        pos += space
    struct.pack_into(">I", h, 36, checksum(h, 36))
    entries = [0xFFFFFFFF] * n
    body = []
    for b, (bitmap, data) in sorted(blocks.items()):
        entries[b] = pos // 512
        body.append((pos, bitmap + data))
        pos += len(bitmap) + len(data)
    uid = uuid.uuid4().bytes
    foot = footer(size, 4, 512, uid)
    with open(path, "wb") as f:
        f.write(foot + h)
        f.write(struct.pack(f">{n}I", *entries).ljust(bat_len, b"\xff"))
        for at, blob in loc_blobs + body:
            f.seek(at)
            f.write(blob)
        f.seek(pos)
        f.write(foot)


def parent_uid(path):
    with open(path, "rb") as f:
        f.seek(-512, 2)
        return f.read(512)[68:84]


@pytest.fixture
def chain(tmp):
    """A qemu-made parent and a child made here: block 1 has sectors 0-7
    (0xC1), block 3 all 4096 sectors (0xC3)."""
    parent = os.path.join(tmp, "parent.vhd")
    size = qemu_vhd(parent, 10 * MiB)
    qemu_write(parent, (0xB0, 0, 10 * MiB - 4 * MiB), (0xB1, 6 * MiB, 2 * MiB))
    base = qemu_raw(parent, tmp, "parent.raw")
    os.makedirs(os.path.join(tmp, "sub"))
    child = os.path.join(tmp, "sub", "child.vhd")
    bm1 = bytes([0xFF]) + bytes(511)
    full = bytes([0xFF]) * 512
    rel = "..\\parent.vhd".encode("utf-16-le")
    absolute = ("C:\\nowhere\\parent.vhd").encode("utf-16-le")
    write_child(child, size, parent_uid(parent), [(b"W2ku", absolute), (b"W2ru", rel)],
                {1: (bm1, b"\xc1" * 4096 + bytes(BLOCK - 4096)), 3: (full, b"\xc3" * BLOCK)})
    want = bytearray(base)
    want[BLOCK:BLOCK + 4096] = b"\xc1" * 4096
    want[3 * BLOCK:4 * BLOCK] = b"\xc3" * BLOCK
    return parent, child, bytes(want)


def test_piece_declined_mid_reply_is_read_into_memory(serve):
    """A differencing child on tmpfs whose block 1 holds its first 1.5 MiB:
    the 1 MiB read at 3 MiB goes in pieces, the first moved to the child's
    file and spliced, the second (absent there: the parent's bytes) read
    into memory in the same reply.  Byte-exact, whole disk, 1 MiB reads."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(prefix="devio-vhd-", dir="/dev/shm")
    try:
        parent = os.path.join(d, "parent.vhd")
        size = qemu_vhd(parent, 8 * MiB)
        qemu_write(parent, (0xB0, 0, 8 * MiB))
        want = bytearray(qemu_raw(parent, d, "parent.raw"))
        child = os.path.join(d, "child.vhd")
        present = 3 * MiB // 2
        bitmap = bytes([0xFF]) * (present // 512 // 8) + bytes(512 - present // 512 // 8)
        write_child(child, size, parent_uid(parent), [(b"W2ru", "parent.vhd".encode("utf-16-le"))],
                    {1: (bitmap, b"\xc1" * present + bytes(BLOCK - present))})
        want[BLOCK:BLOCK + present] = b"\xc1" * present
        _, sock = serve_nbd(serve, d, child, "--format", "vhd")
        out = os.path.join(d, "got.raw")
        run_ok("nbdcopy", "--request-size=1048576", "-R", "1", uri(sock), out)
        with open(out, "rb") as f:
            assert f.read() == bytes(want)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_differencing_needs_format_named(serve, tmp, chain):
    parent, child, want = chain
    err = devio_fails("info", child)
    assert "differencing" in err and "--format vhd" in err, err
    s, sock = serve_nbd(serve, tmp, child, "--format", "vhd")
    assert nbd_read(sock, tmp) == want
    info = run_ok("nbdinfo", "--json", uri(sock))
    assert '"can_trim": false' in info and '"can_zero": true' in info  # TRIM would write zeroes
    with open(parent, "rb") as f:
        before = hashlib.sha256(f.read()).digest()
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0xD1 2098176 1000", "-c", "write -P 0xD2 512 100",
           "-c", "write -z 3M 512", uri(sock))
    expect = bytearray(want)
    expect[2098176:2098176 + 1000] = b"\xd1" * 1000
    expect[512:612] = b"\xd2" * 100
    expect[3 * MiB:3 * MiB + 512] = bytes(512)
    assert nbd_read(sock, tmp, "got2.raw") == bytes(expect)
    assert s.stop() == 0
    with open(parent, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == before  # the parent is never written
    s, sock = serve_nbd(serve, tmp, child, "--format", "vhd")
    assert nbd_read(sock, tmp, "got3.raw") == bytes(expect)


@pytest.mark.parametrize("fmt", ["raw", "vhd", "qcow2"])
def test_convert_onto_the_parent_of_its_source_is_refused(tmp, chain, fmt):
    """A differencing child converted onto its own parent (by name or
    through a symlink) would replace the bytes the child reads through:
    refused before anything is written, the parent as it was and no
    temporary file beside it; onto another file the same convert works."""
    parent, child, want = chain
    with open(parent, "rb") as f:
        before = f.read()
    link = os.path.join(tmp, "link.vhd")
    os.symlink(parent, link)
    for dst in (parent, link):
        err = devio_fails("convert", "-O", fmt, "--format", "vhd", child, dst)
        assert "refusing to write over a file the source is made of" in err and "parent" in err, err
        with open(parent, "rb") as f:
            assert f.read() == before
    assert sorted(os.listdir(tmp)) == ["link.vhd", "parent.raw", "parent.vhd", "sub"]
    out, raw = os.path.join(tmp, "out.img"), os.path.join(tmp, "out.raw")
    run_ok(DEVIO, "convert", "-O", fmt, "--format", "vhd", child, out)
    run_ok("qemu-img", "convert", "-f", {"vhd": "vpc"}.get(fmt, fmt), "-O", "raw", out, raw)
    with open(raw, "rb") as f:
        assert f.read() == want


def test_differencing_parent_refused_when_wrong(tmp, chain):
    parent, child, _ = chain
    # a parent with another unique id
    other = os.path.join(tmp, "other.vhd")
    qemu_vhd(other, 10 * MiB)
    os.replace(other, parent)
    r = subprocess.run([DEVIO, "serve", child, "--format", "vhd", "--nbd", f"unix:{tmp}/x.sock"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unique id" in r.stderr, r.stderr
    # a child that names itself as its parent: a loop
    me = os.path.join(tmp, "sub", "me.vhd")
    uid = uuid.uuid4().bytes
    write_child(me, 4 * MiB, uid, [(b"W2ru", "me.vhd".encode("utf-16-le"))], {})
    r = subprocess.run([DEVIO, "serve", me, "--format", "vhd", "--nbd", f"unix:{tmp}/y.sock"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "loops" in r.stderr, r.stderr


# ---- corrupt images: clean errors naming the field ----

def corrupt(path, off, data, fix=None):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)
        if fix is not None:  # recompute a checksum (footer: 0/64, header: 512/36)
            start, field, ln = fix
            f.seek(start)
            b = f.read(ln)
            f.seek(start + field)
            f.write(struct.pack(">I", checksum(b, field)))


@pytest.mark.parametrize("case", ["footer_checksum", "block_size", "max_entries", "bat_past_end",
                                  "header_offset", "header_cookie", "disk_type", "fixed_too_big"])
def test_corrupt_images_are_refused_clearly(tmp, case):
    img = os.path.join(tmp, "c.vhd")
    qemu_vhd(img, 8 * MiB, "fixed" if case == "fixed_too_big" else "dynamic")
    if case != "fixed_too_big":
        qemu_write(img, (0x10, 0, 4096))
    end = os.path.getsize(img) - 512
    want = {
        "footer_checksum": ("checksum", lambda: corrupt(img, end + 100, b"\x01")),
        "block_size": ("block size 3000", lambda: corrupt(img, 512 + 32, struct.pack(">I", 3000), (512, 36, 1024))),
        "max_entries": ("max table entries", lambda: corrupt(img, 512 + 28, struct.pack(">I", 1), (512, 36, 1024))),
        "bat_past_end": ("BAT entry 0", lambda: corrupt(img, 1536, struct.pack(">I", 0x7FFFFFF0))),
        "header_offset": ("data offset", lambda: (corrupt(img, 16, struct.pack(">Q", 1 << 60), (0, 64, 512)),
                                                  corrupt(img, end + 16, struct.pack(">Q", 1 << 60), (end, 64, 512)))),
        "header_cookie": ("cxsparse", lambda: corrupt(img, 512, b"xxsparse")),
        "disk_type": ("disk type 9", lambda: corrupt(img, end + 60, struct.pack(">I", 9), (end, 64, 512))),
        "fixed_too_big": ("current size", lambda: corrupt(img, end + 48, struct.pack(">Q", 1 << 40), (end, 64, 512))),
    }[case]
    want[1]()
    err = devio_fails("info", img)
    assert want[0] in err and "c.vhd" in err, err


# ---- many writers at once, and crashes ----

@pytest.mark.parametrize("direct", [False, True])
def test_parallel_out_of_order_writes(serve, tmp, direct):
    """qemu-img convert -m 16 -W: 16 writers, out of order, allocating the
    same blocks at once (and with O_DIRECT, the growing file's tail)."""
    img = os.path.join(tmp, "p.vhd")
    size = qemu_vhd(img, 24 * MiB)
    raw = os.path.join(tmp, "src.raw")
    with open(raw, "wb") as f:
        f.write(patterned(size))
    s, sock = serve_nbd(serve, tmp, img, *(["--direct"] if direct else []))
    run_ok("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-m", "16", "-W", "-S", "0", raw, uri(sock))
    assert s.stop() == 0
    run_ok("qemu-img", "compare", "-f", "vpc", img, "-F", "raw", raw)
    entries = [e for e in bat(img) if e != 0xFFFFFFFF]
    n = (size + BLOCK - 1) // BLOCK - 1  # block 1 is all zeroes
    assert len(entries) == len(set(entries)) == n
    assert os.path.getsize(img) == 512 + 1024 + 512 + n * (512 + BLOCK) + 512


def test_kill_during_writes_leaves_an_image_that_opens(serve, tmp):
    """Copies of the file taken while writers allocate blocks, and the file
    after kill -9: each opens (footer at the end, every BAT entry inside
    the file) in qemu and in devio; what was flushed before the kill is
    there."""
    img = os.path.join(tmp, "k.vhd")
    size = qemu_vhd(img, 32 * MiB)
    s, sock = serve_nbd(serve, tmp, img)
    first = os.urandom(3 * MiB)
    with open(os.path.join(tmp, "first.raw"), "wb") as f:
        f.write(first)
    run_ok("nbdcopy", os.path.join(tmp, "first.raw"), uri(sock))  # nbdcopy flushes at the end
    raw = os.path.join(tmp, "rest.raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(size - 4 * MiB))
    writer = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-m", "8", "-W",
                               "--target-image-opts", raw,
                               f"driver=raw,file.driver=nbd,file.path={sock},offset={4 * MiB}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        snaps = []
        for i in range(6):
            snap = os.path.join(tmp, f"snap{i}.vhd")
            shutil.copyfile(img, snap)
            snaps.append(snap)
        s.stop(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    for path in snaps + [img]:
        assert virtual_size(path) == size
        out = subprocess.run([DEVIO, "cat", path, "--length", str(3 * MiB)], capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == first


def test_format_vhd_on_raw_bytes_and_readonly(serve, tmp):
    raw = os.path.join(tmp, "plain.img")
    with open(raw, "wb") as f:
        f.write(os.urandom(MiB))
    r = subprocess.run([DEVIO, "serve", raw, "--format", "vhd", "--nbd", f"unix:{tmp}/r.sock"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "conectix" in r.stderr, r.stderr
    img = os.path.join(tmp, "ro.vhd")
    size = qemu_vhd(img, 8 * MiB)
    qemu_write(img, (0x3c, 0, 65536))
    before = os.path.getsize(img)
    s, sock = serve_nbd(serve, tmp, img, "--readonly")
    info = run_ok("nbdinfo", "--json", uri(sock))
    assert '"is_read_only": true' in info and f'"export-size": {size}' in info, info
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 4M 4096", uri(sock)], capture_output=True,
                       text=True, timeout=60)
    assert w.returncode != 0 or "error" in (w.stdout + w.stderr).lower()
    assert nbd_read(sock, tmp)[:65536] == b"\x3c" * 65536
    assert s.stop() == 0
    assert os.path.getsize(img) == before


def test_vhd_over_a_remote_store_only_when_named(serve, tmp):
    """A container served raw by one devio, read as a VHD by another over
    NBD with --format vhd; without it the export's bytes are what they are.
    A remote store cannot grow: a new block is refused, allocated ones are
    written."""
    img = os.path.join(tmp, "r.vhd")
    size = qemu_vhd(img, 8 * MiB)
    qemu_write(img, (0x5e, 2 * MiB, 4096))
    want = qemu_raw(img, tmp)
    with open(img, "rb") as f:
        container = f.read()
    inner_sock = os.path.join(tmp, "inner.sock")
    inner = serve(img, "--format", "raw", "--nbd", f"unix:{inner_sock}")
    inner.wait_unix(inner_sock)
    outer_sock = os.path.join(tmp, "outer.sock")
    outer = serve(uri(inner_sock), "--format", "vhd",
                  "--nbd", f"unix:{outer_sock}")
    outer.wait_unix(outer_sock)
    assert nbd_read(outer_sock, tmp) == want
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x6f 2101248 512", uri(outer_sock))  # block 1: allocated
    bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x70 0 512", uri(outer_sock)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 or "error" in (bad.stdout + bad.stderr).lower()
    assert "cannot append a VHD block" in outer.stderr()
    r = subprocess.run([DEVIO, "cat", uri(inner_sock)], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout[:512] == container[:512] and len(r.stdout) == len(container)
    assert outer.stop() == 0 and inner.stop() == 0
    expect = bytearray(want)
    expect[2101248:2101248 + 512] = b"\x6f" * 512
    assert qemu_raw(img, tmp, "after.raw") == bytes(expect)
    assert size == len(want)


def test_fixed_image_written_through_nbd(serve, tmp):
    img = os.path.join(tmp, "f.vhd")
    size = qemu_vhd(img, 6 * MiB, "fixed")
    with open(img, "rb") as f:
        f.seek(-512, 2)
        footer = f.read()
    s, sock = serve_nbd(serve, tmp, img)
    run_ok("qemu-io", "-f", "raw", "-c", f"write -P 0x4b {size - 4096} 4096", "-c", "write -P 0x4c 0 1000",
           "-c", "discard 2M 1M", uri(sock))
    too_far = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 1 {size} 512", uri(sock)],
                             capture_output=True, text=True, timeout=60)
    assert too_far.returncode != 0 or "error" in (too_far.stdout + too_far.stderr).lower()
    assert s.stop() == 0
    want = bytearray(size)
    want[size - 4096:] = b"\x4b" * 4096
    want[:1000] = b"\x4c" * 1000
    assert qemu_raw(img, tmp) == bytes(want)
    with open(img, "rb") as f:
        f.seek(-512, 2)
        assert f.read() == footer  # the footer is not part of the disk
    assert os.path.getsize(img) == size + 512
