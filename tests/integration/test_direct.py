"""test_direct.py - the file backend with O_DIRECT (--direct) seen through NBD
by independent clients: requests of two connections that share a 4 KiB
block but not a byte (a sub-block write is a read-modify-write) never undo
each other, whatever the other request is (WRITE, ZERO, TRIM, a whole-block
write); and an image whose size is not a multiple of 4096 is read, written
and copied to its last byte by nbdcopy, qemu-img and qemu-io without
growing."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import run_ok as run, wait_for

BLOCK = 4096

# One connection's share of the race, run as its own process so that the
# two connections really run at once: libnbd's asynchronous calls with up
# to 64 requests in flight.
RACER = r"""
import sys, nbd
uri, kind, nblocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
one = nbd.Buffer.from_bytearray(bytearray(b"\x5a"))
full = nbd.Buffer.from_bytearray(bytearray(b"\x3c" * 4096))
head = nbd.Buffer.from_bytearray(bytearray(b"\x77" * 100))
failed = []
def done(err):  # returning 1 retires the command
    if err.value:
        failed.append(err.value)
    return 1
for i in range(nblocks):
    base = i * 4096
    if kind == "byte":        # the last byte of the block
        h.aio_pwrite(one, base + 4095, completion=done)
    elif kind == "zero":      # every byte but the last
        h.aio_zero(4095, base, completion=done)
    elif kind == "trim":
        h.aio_trim(4095, base, completion=done)
    elif kind == "full":      # the whole block
        h.aio_pwrite(full, base, completion=done)
    elif kind == "head":      # the first 100 bytes: overlaps "full" there only
        h.aio_pwrite(head, base, completion=done)
    while h.aio_in_flight() >= 64:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
if failed:
    sys.exit(f"{len(failed)} requests failed, errno {failed[0]}")
h.flush()
h.shutdown()
"""


@pytest.fixture
def scratch():
    for tool in ("nbdcopy", "qemu-img", "qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    d = tempfile.mkdtemp(prefix="devio-direct-", dir="/var/tmp")  # not tmpfs: O_DIRECT
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start(serve, img, sock, *opts):
    s = serve(img, "--direct", *opts, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    wait_for(lambda: subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                                    capture_output=True, timeout=10).returncode == 0, 10, "NBD server")
    return s


def race(uri, kind_a, kind_b, nblocks):
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, k, str(nblocks)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for k in (kind_a, kind_b)]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode(errors="replace")
    finally:
        for p in procs:  # never left running, whatever failed
            if p.poll() is None:
                p.kill()
                p.wait()


# kind_a, kind_b, what every block must hold afterwards (as a function of
# its old contents, which are 0xa5 everywhere)
CASES = {
    "byte-vs-zero": ("byte", "zero", b"\0" * 4095 + b"\x5a"),
    "byte-vs-trim": ("byte", "trim", b"\0" * 4095 + b"\x5a"),
    "full-vs-head": ("full", "head", None),  # head's 100 bytes either way, the rest full's
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_connections_sharing_blocks_lose_nothing(serve, scratch, case):
    kind_a, kind_b, want = CASES[case]
    nblocks = 4000
    img = os.path.join(scratch, "disk.img")
    with open(img, "wb") as f:
        f.write(b"\xa5" * (nblocks * BLOCK))
    sock = os.path.join(scratch, "nbd.sock")
    srv = start(serve, img, sock)
    race(f"nbd+unix:///?socket={sock}", kind_a, kind_b, nblocks)
    srv.stop()
    with open(img, "rb") as f:
        data = f.read()
    bad = []
    for i in range(nblocks):
        blk = data[i * BLOCK:(i + 1) * BLOCK]
        if want is not None:
            ok = blk == want
        else:
            ok = blk[100:] == b"\x3c" * (BLOCK - 100) and blk[:100] in (b"\x77" * 100, b"\x3c" * 100)
        if not ok:
            bad.append(i)
    assert not bad, f"{len(bad)} of {nblocks} blocks lost a write, first {bad[:5]}"


# A CD image: 1001 sectors of 2048 bytes, so the last 4 KiB block is half there.
ODD_SIZE = 1001 * 2048


def pattern(n, seed=7):
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


def test_odd_sized_image_read_and_copied_to_the_last_byte(serve, scratch):
    img = os.path.join(scratch, "cd.iso")
    data = pattern(ODD_SIZE)
    with open(img, "wb") as f:
        f.write(data)
    sock = os.path.join(scratch, "nbd.sock")
    start(serve, img, sock, "--readonly")
    uri = f"nbd+unix:///?socket={sock}"
    assert int(run("nbdinfo", "--size", uri)) == ODD_SIZE
    out = os.path.join(scratch, "copy.bin")
    run("nbdcopy", uri, out)
    with open(out, "rb") as f:
        assert f.read() == data
    conv = os.path.join(scratch, "conv.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, conv)
    with open(conv, "rb") as f:
        assert f.read() == data


def test_odd_sized_image_written_to_the_last_byte_without_growing(serve, scratch):
    img = os.path.join(scratch, "cd.iso")
    with open(img, "wb") as f:
        f.write(b"\xa5" * ODD_SIZE)
    src = os.path.join(scratch, "src.bin")
    data = pattern(ODD_SIZE, seed=11)
    with open(src, "wb") as f:
        f.write(data)
    sock = os.path.join(scratch, "nbd.sock")
    srv = start(serve, img, sock)
    uri = f"nbd+unix:///?socket={sock}"
    run("nbdcopy", "--flush", src, uri)
    # sub-block writes around the end of the last full block and in the tail
    last_full = ODD_SIZE // BLOCK * BLOCK
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 {last_full - 10} 20",
        "-c", f"write -P 0x22 {ODD_SIZE - 5} 5", "-c", f"write -z {ODD_SIZE - 700} 100",
        "-c", "flush", uri)
    expect = bytearray(data)
    expect[last_full - 10:last_full + 10] = b"\x11" * 20
    expect[ODD_SIZE - 5:] = b"\x22" * 5
    expect[ODD_SIZE - 700:ODD_SIZE - 600] = bytes(100)
    run("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x22 {ODD_SIZE - 5} 5",
        "-c", f"read -P 0x11 {last_full - 10} 20", uri)
    back = os.path.join(scratch, "back.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back)
    srv.stop()
    assert os.path.getsize(img) == ODD_SIZE, "the image grew"
    with open(img, "rb") as f:
        assert f.read() == bytes(expect)
    with open(back, "rb") as f:
        assert f.read() == bytes(expect)
