"""test_partition_serve.py - serving one partition of an MBR disk image made
with sfdisk (three primaries, an extended partition with logicals 5 and 6):
what the devio server serves must equal what dd extracts at the offsets
sfdisk reports, through `serve --partition N` and ImDisk's command line."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

import devio_wire as w
from conftest import DEVIO, free_port, wait_for, port_open

SECTOR = 512
LAYOUT = """label: dos
start=2048, size=16384, type=83
size=16384, type=83
size=16384, type=83
type=5
size=12288, type=83
size=8192, type=83
"""


@pytest.fixture(scope="module")
def disk():
    if not shutil.which("sfdisk"):
        pytest.skip("sfdisk not installed")
    d = tempfile.mkdtemp(prefix="devio-part-")
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", img], input=LAYOUT.encode(), check=True, timeout=60)
    table = json.loads(subprocess.run(["sfdisk", "-J", img], capture_output=True, check=True,
                                      timeout=60).stdout)["partitiontable"]
    parts = {int(p["node"][len(img):]): (p["start"], p["size"]) for p in table["partitions"]}
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    # a distinct pattern in every data partition, written with dd
    for n in (1, 2, 3, 5, 6):
        start, size = parts[n]
        pattern = (f"partition {n} ".encode() * (size * SECTOR // 12 + 1))[:size * SECTOR]
        pat = os.path.join(d, f"p{n}.pat")
        with open(pat, "wb") as f:
            f.write(pattern)
        subprocess.run(["dd", f"if={pat}", f"of={img}", "bs=512", f"seek={start}", "conv=notrunc",
                        "status=none"], check=True, timeout=60)
    yield img, parts, d
    shutil.rmtree(d, ignore_errors=True)


def dd_extract(img, start, size, d):
    out = os.path.join(d, "extract.bin")
    subprocess.run(["dd", f"if={img}", f"of={out}", "bs=512", f"skip={start}", f"count={size}",
                    "status=none"], check=True, timeout=60)
    with open(out, "rb") as f:
        return f.read()


def read_all(c, size):
    chunks = []
    for off in range(0, size, 1 << 20):
        err, data = c.read(off, min(1 << 20, size - off))
        assert err == 0
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("n", [5, 6, 2])
def test_serve_partition_equals_dd(serve, disk, n):
    img, parts, d = disk
    start, size = parts[n]
    sock = os.path.join(d, f"part{n}.sock")
    serve(img, "--readonly", "--partition", str(n), "--devio", f"unix:{sock}").wait_unix(sock)
    with w.Client(path=sock) as c:
        got_size, _, flags = c.info()
        assert got_size == size * SECTOR
        assert flags & w.FLAG_RO
        assert read_all(c, got_size) == dd_extract(img, start, size, d)
        assert c.read(got_size, 1) == (0, b"")  # the window ends where the partition does


def test_partition_write_stays_inside(serve, disk):
    img, parts, d = disk
    start, size = parts[5]
    sock = os.path.join(d, "rw5.sock")
    neighbour = dd_extract(img, *parts[6], d)
    serve(img, "--partition", "5", "--devio", f"unix:{sock}").wait_unix(sock)
    with w.Client(path=sock) as c:
        end = size * SECTOR
        assert c.write(end - 4, b"last")[0] == 0
        assert c.write(end - 2, b"over")[0] != 0  # past the partition: refused
    assert dd_extract(img, start + size - 1, 1, d)[-4:] == b"last"
    assert dd_extract(img, *parts[6], d) == neighbour


def test_missing_partition_is_an_error(disk):
    img, _, d = disk
    p = subprocess.run([DEVIO, "serve", img, "--partition", "9", "--devio", f"unix:{d}/none.sock"],
                       capture_output=True, timeout=30)
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    assert p.returncode != 0
    assert not os.path.exists(f"{d}/none.sock")


def test_imdisk_command_line_partition_form(disk):
    """ImDisk's own numbers: the extended entry is slot 4, so its logicals
    are 4 and 5 there (Linux's 5 and 6): ImDisk's 5 is Linux's 6."""
    img, parts, d = disk
    start, size = parts[6]
    port = free_port()
    p = subprocess.Popen([DEVIO, "-r", str(port), img, "5"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: port_open(port) or p.poll() is not None, 30, f"port {port}")
        assert p.poll() is None
        with w.Client(port=port) as c:
            got_size, _, flags = c.info()
            assert got_size == size * SECTOR and flags & w.FLAG_RO
            assert read_all(c, got_size) == dd_extract(img, start, size, d)
    finally:
        p.terminate()
        p.wait(timeout=20)
    err = p.stderr.read()
    p.stderr.close()
    assert b"partition 5" in err
    assert b"AddressSanitizer" not in err and b"runtime error:" not in err


def test_imdisk_default_is_partition_1_when_mbr(disk):
    img, parts, d = disk
    start, size = parts[1]
    req = w.q(w.INFO) + w.q(w.READ, 0, 4096) + w.q(w.CLOSE)
    p = subprocess.run([DEVIO, "-r", "-", img], input=req, capture_output=True, timeout=30)
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    assert p.returncode == 0, p.stderr
    assert int.from_bytes(p.stdout[:8], "little") == size * SECTOR
    assert p.stdout[40:40 + 4096] == dd_extract(img, start, 8, d)
