"""test_partition_table.py - the file backend's partitions seen from outside
through NBD: a GPT disk partitioned by sfdisk (whose JSON listing is the
reference) served one partition at a time; qemu-io's unaligned writes, with
and without O_DIRECT, land inside the partition and nowhere else in the
image file; and four fio jobs writing interleaved 512-byte sectors through
O_DIRECT (every 4 KiB block shared, read-modify-written concurrently) read
back verified."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import run_ok as run, wait_for

SECTOR = 512
LAYOUT = """label: gpt
size=4096, type=L
size=16384, type=L
size=8192, type=S
"""


@pytest.fixture
def gpt_disk():
    for tool in ("sfdisk", "qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    d = tempfile.mkdtemp(prefix="devio-gpt-", dir="/var/tmp")
    img = os.path.join(d, "disk.img")
    try:
        with open(img, "wb") as f:
            f.write(bytes(range(256)) * (40 << 12))  # 40 MiB of a known pattern
        subprocess.run(["sfdisk", "-q", img], input=LAYOUT.encode(), check=True, timeout=60)
        table = json.loads(run("sfdisk", "-J", img))["partitiontable"]
        parts = [(p["start"] * SECTOR, p["size"] * SECTOR) for p in table["partitions"]]
        assert len(parts) == 3
        yield img, parts, d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def nbd_uri(sock):
    return f"nbd+unix:///?socket={sock}"


def start(serve, img, sock, *opts):
    s = serve(img, *opts, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    wait_for(lambda: subprocess.run(["nbdinfo", "--size", nbd_uri(sock)], capture_output=True,
                                    timeout=10).returncode == 0, 10, "NBD server")
    return s


def read_image(img):
    with open(img, "rb") as f:
        return f.read()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_gpt_partition_matches_sfdisk(serve, gpt_disk, n):
    img, parts, d = gpt_disk
    sock = os.path.join(d, "nbd.sock")
    start(serve, img, sock, "--partition", str(n))
    off, size = parts[n - 1]
    assert int(run("nbdinfo", "--size", nbd_uri(sock))) == size
    out = os.path.join(d, "copy.bin")
    run("nbdcopy", nbd_uri(sock), out)
    assert read_image(out) == read_image(img)[off:off + size]


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_unaligned_writes_stay_inside(serve, gpt_disk, direct):
    img, parts, d = gpt_disk
    sock = os.path.join(d, "nbd.sock")
    before = read_image(img)
    off, size = parts[1]
    srv = start(serve, img, sock, "--partition", "2", *(["--direct"] if direct else []))
    run("qemu-io", "-f", "raw",
        "-c", "write -P 0x11 1 4095",           # unaligned head and tail
        "-c", "write -P 0x22 4097 70001",       # crosses several blocks
        "-c", f"write -P 0x33 {size - 700} 700",  # the partition's last bytes
        "-c", "write -z 200000 12345",
        "-c", "read -P 0x11 1 4095",
        "-c", "read -P 0x22 4097 70001",
        "-c", f"read -P 0x33 {size - 700} 700",
        "-c", "read -P 0 200000 12345",
        nbd_uri(sock))
    srv.stop()
    after = read_image(img)
    assert len(after) == len(before)
    assert after[:off] == before[:off]                     # nothing before the partition
    assert after[off + size:] == before[off + size:]       # nor after it
    part = after[off:off + size]
    assert part[0:1] == before[off:off + 1]
    assert part[1:4096] == b"\x11" * 4095
    assert part[4096:4097] == before[off + 4096:off + 4097]
    assert part[4097:4097 + 70001] == b"\x22" * 70001
    assert part[size - 700:] == b"\x33" * 700
    assert part[200000:212345] == bytes(12345)


def test_direct_shared_blocks_verified(serve, gpt_disk):
    """Four fio jobs (four NBD connections) write interleaved 512-byte
    sectors, job j sectors j, j+4, j+8, ..., so every 4 KiB block is shared
    by all of them and O_DIRECT must read-modify-write it while the others
    do the same; then every sector is read back with a checksum."""
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, timeout=30).stdout
    if "nbd" not in engines:
        pytest.skip("fio has no nbd engine")
    img, parts, d = gpt_disk
    sock = os.path.join(d, "nbd.sock")
    start(serve, img, sock, "--partition", "2", "--direct")
    off, size = parts[1]
    before = read_image(img)
    span = 1 << 20  # per job; the four interleaved cover 4 MiB of the 8 MiB partition
    run("fio", "--name=v", "--ioengine=nbd", f"--uri={nbd_uri(sock)}", "--rw=write", "--bs=512",
        "--zonemode=strided", "--zonesize=512", "--zonerange=2048", "--offset_increment=512",
        f"--size={span}", "--iodepth=4", "--numjobs=4", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--verify_state_save=0", "--group_reporting", timeout=300)  # exits 1 on a bad sector
    after = read_image(img)
    assert after[:off] == before[:off]
    assert after[off + size:] == before[off + size:]
    end = off + 4 * span + 4096
    assert after[end:off + size] == before[end:off + size]
