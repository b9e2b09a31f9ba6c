"""test_layers.py - the window layer stacked over each kind of source.

--partition N numbered as Linux and sfdisk number it, on an MBR disk built
by sfdisk with gaps (primaries in slots 1 and 3, the extended partition in
slot 4 with three logicals): every N from 1 to 8 either serves exactly the
bytes sfdisk lists (and the kernel's loop device partition shows) or is a
clear error (the gap, the extended container, past the last logical).
Then a partition over devio:// and over nbd:// (nbdkit serving the image),
and a window (--offset/--size) over ram: and over nbd:// (nbdkit's memory
plugin), written through devio and read back from the far end at the
window's offset; -r over a writable source refuses writes."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import DEVIO, run_ok as run, stop_process, wait_for

SECTOR = 512
MiB = 1 << 20
# slot 2 empty; slot 4 the extended partition with logicals 5, 6, 7
LAYOUT = """label: dos
{img}1 : start=2048, size=4096, type=83
{img}3 : start=8192, size=6144, type=7
{img}4 : start=16384, size=40960, type=5
{img}5 : start=18432, size=8192, type=83
{img}6 : start=28672, size=2048, type=82
{img}7 : start=32768, size=16384, type=83
"""


def nbd_uri(sock):
    return f"nbd+unix:///?socket={sock}"


def wait_nbd(uri):
    wait_for(lambda: subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                                    timeout=10).returncode == 0, 10, uri)


def start_nbd(serve, source, sock, *opts):
    s = serve(source, *opts, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    wait_nbd(nbd_uri(sock))
    return s


def read_export(uri, d):
    out = os.path.join(d, "export.bin")
    if os.path.exists(out):
        os.unlink(out)
    run("nbdcopy", uri, out)
    with open(out, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def mbr_disk():
    for tool in ("sfdisk", "nbdinfo", "nbdcopy"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    d = tempfile.mkdtemp(prefix="devio-layers-", dir="/var/tmp")
    img = os.path.join(d, "disk.img")
    try:
        with open(img, "wb") as f:
            f.truncate(32 * MiB)
        subprocess.run(["sfdisk", "-q", img], input=LAYOUT.format(img=img).encode(), check=True, timeout=60)
        table = json.loads(run("sfdisk", "-J", img))["partitiontable"]
        parts = {int(p["node"][len(img):]): (p["start"] * SECTOR, p["size"] * SECTOR, p["type"])
                 for p in table["partitions"]}
        assert sorted(parts) == [1, 3, 4, 5, 6, 7], parts
        with open(img, "r+b") as f:  # a distinct pattern in every data partition
            for n, (start, size, _) in parts.items():
                if n != 4:
                    f.seek(start)
                    f.write((f"part {n} ".encode() * (size // 7 + 1))[:size])
        yield img, parts, d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def image_bytes(img, start, size):
    with open(img, "rb") as f:
        f.seek(start)
        return f.read(size)


def test_every_partition_number_as_sfdisk_lists_it(serve, mbr_disk):
    img, parts, d = mbr_disk
    for n in range(1, 9):
        sock = os.path.join(d, f"p{n}.sock")
        if n in parts and n != 4:
            start, size, _ = parts[n]
            s = start_nbd(serve, img, sock, "-r", "--partition", str(n))
            assert int(run("nbdinfo", "--size", nbd_uri(sock))) == size
            assert read_export(nbd_uri(sock), d) == image_bytes(img, start, size)
            s.stop()
            continue
        r = subprocess.run([DEVIO, "serve", img, "-r", "--partition", str(n), "--nbd", f"unix:{sock}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and not os.path.exists(sock), r.stderr
        assert "AddressSanitizer" not in r.stderr and "runtime error:" not in r.stderr
        if n == 4:
            assert "partition 4 is the extended partition" in r.stderr, r.stderr
        else:
            assert f"no partition {n} (the tables list 5)" in r.stderr, r.stderr


def test_partitions_match_the_kernels(serve, mbr_disk):
    """The kernel's own reading of the table (losetup -P, its partitions'
    start and size in sysfs) gives the same numbers for the same bytes."""
    img, parts, d = mbr_disk
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup")
    r = subprocess.run(["losetup", "-P", "-r", "-f", "--show", img], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    loop = os.path.basename(r.stdout.strip())
    try:
        sysfs = f"/sys/block/{loop}"
        try:
            wait_for(lambda: os.path.exists(f"{sysfs}/{loop}p1"), 5, "partitions in sysfs")
        except TimeoutError:
            pytest.skip("the kernel shows no partitions of loop devices here")
        kernel = {}
        for name in os.listdir(sysfs):
            if name.startswith(f"{loop}p"):
                with open(f"{sysfs}/{name}/start") as f, open(f"{sysfs}/{name}/size") as g:
                    kernel[int(name[len(loop) + 1:])] = (int(f.read()) * SECTOR, int(g.read()) * SECTOR)
        assert sorted(kernel) == [1, 3, 4, 5, 6, 7]
        for n in (1, 3, 5, 6, 7):
            start, size = kernel[n]
            sock = os.path.join(d, f"k{n}.sock")
            s = start_nbd(serve, img, sock, "-r", "--partition", str(n))
            assert read_export(nbd_uri(sock), d) == image_bytes(img, start, size)
            s.stop()
    finally:
        subprocess.run(["losetup", "-d", f"/dev/{loop}"], capture_output=True, timeout=30)


def test_partition_over_devio_remote(serve, mbr_disk):
    img, parts, d = mbr_disk
    far = os.path.join(d, "far-devio.sock")
    serve(img, "--devio", f"unix:{far}").wait_unix(far)
    sock = os.path.join(d, "near-devio.sock")
    for n in (3, 6):
        start, size, _ = parts[n]
        s = start_nbd(serve, f"devio+unix://{far}", sock, "--partition", str(n))
        assert int(run("nbdinfo", "--size", nbd_uri(sock))) == size
        assert read_export(nbd_uri(sock), d) == image_bytes(img, start, size)
        s.stop()
    # writes stay inside the partition, at the place sfdisk lists
    start, size, _ = parts[5]
    s = start_nbd(serve, f"devio+unix://{far}", sock, "--partition", "5")
    run("nbdsh", "-u", nbd_uri(sock), "-c", f"h.pwrite(b'end of five', {size - 11})")
    r = subprocess.run(["nbdsh", "-u", nbd_uri(sock), "-c", f"h.pwrite(b'x', {size})"], capture_output=True,
                       timeout=30)
    assert r.returncode != 0  # past the partition: refused
    s.stop()
    assert image_bytes(img, start + size - 11, 11) == b"end of five"
    assert image_bytes(img, start + size, 7) == b"\0" * 7  # the EBR gap after logical 5


def nbdkit(args, d, name):
    sock = os.path.join(d, name)
    p = subprocess.Popen(["nbdkit", "-f", "-U", sock] + args, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_nbd(nbd_uri(sock))
    except Exception:
        p.kill()
        p.wait()
        raise
    return p, sock


def test_partition_over_nbd_remote(serve, mbr_disk):
    img, parts, d = mbr_disk
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit not installed")
    p, far = nbdkit(["-r", "file", img], d, "far-nbd.sock")
    try:
        sock = os.path.join(d, "near-nbd.sock")
        for n in (1, 7):
            start, size, _ = parts[n]
            s = start_nbd(serve, nbd_uri(far), sock, "--partition", str(n))
            assert int(run("nbdinfo", "--size", nbd_uri(sock))) == size
            assert read_export(nbd_uri(sock), d) == image_bytes(img, start, size)
            s.stop()
        r = subprocess.run([DEVIO, "serve", nbd_uri(far), "--partition", "2", "--nbd", f"unix:{sock}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "no partition 2" in r.stderr, r.stderr
    finally:
        stop_process(p)


def test_window_over_ram(serve):
    d = tempfile.mkdtemp(prefix="devio-layers-ram-")
    try:
        sock = os.path.join(d, "w.sock")
        start_nbd(serve, "ram:16M", sock, "--offset", "1M", "--size", "4M")
        u = nbd_uri(sock)
        assert int(run("nbdinfo", "--size", u)) == 4 * MiB
        run("nbdsh", "-u", u, "-c", f"h.pwrite(b'last bytes', {4 * MiB - 10})")
        out = run("nbdsh", "-u", u, "-c", f"print(h.pread(10, {4 * MiB - 10}).decode())")
        assert out.strip() == "last bytes"
        r = subprocess.run(["nbdsh", "-u", u, "-c", f"h.pwrite(b'xy', {4 * MiB - 1})"], capture_output=True,
                           timeout=30)
        assert r.returncode != 0  # the window's end is the end
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_window_over_nbd_remote(serve):
    """nbdkit's memory plugin as the far end: bytes written through the
    window are at offset + N in it, and nothing before or after moved."""
    if not shutil.which("nbdkit"):
        pytest.skip("nbdkit not installed")
    d = tempfile.mkdtemp(prefix="devio-layers-nbd-")
    p = None
    try:
        p, far = nbdkit(["memory", "16M"], d, "far.sock")
        sock = os.path.join(d, "w.sock")
        start_nbd(serve, nbd_uri(far), sock, "--offset", "3M", "--size", "2M")
        u = nbd_uri(sock)
        assert int(run("nbdinfo", "--size", u)) == 2 * MiB
        run("nbdsh", "-u", u, "-c", "h.pwrite(b'A' * 4096, 0); h.pwrite(b'Z' * 4096, 2 * 1024 * 1024 - 4096)")
        far_u = nbd_uri(far)
        out = run("nbdsh", "-u", far_u, "-c",
                  "print(h.pread(4096, 3 << 20) == b'A' * 4096, h.pread(4096, (5 << 20) - 4096) == b'Z' * 4096,"
                  " h.pread(4096, (3 << 20) - 4096) == bytes(4096), h.pread(4096, 5 << 20) == bytes(4096))")
        assert out.split() == ["True"] * 4, out
        # extents come back in the window's offsets
        m = json.loads(run("nbdinfo", "--map", "--json", u))
        assert m[0]["offset"] == 0 and sum(e["length"] for e in m) == 2 * MiB, m
        # -r over the writable nbdkit export: the guard refuses writes
        ro = os.path.join(d, "ro.sock")
        start_nbd(serve, nbd_uri(far), ro, "-r", "--offset", "3M")
        assert int(run("nbdinfo", "--size", nbd_uri(ro))) == 13 * MiB
        assert subprocess.run(["nbdinfo", "--is", "read-only", nbd_uri(ro)], timeout=30).returncode == 0
        r = subprocess.run(["nbdsh", "-u", nbd_uri(ro), "-c", "h.pwrite(b'no', 0)"], capture_output=True, timeout=30)
        assert r.returncode != 0
        assert run("nbdsh", "-u", nbd_uri(ro), "-c", "print(h.pread(1, 0) == b'A')").strip() == "True"
    finally:
        if p:
            stop_process(p)
        shutil.rmtree(d, ignore_errors=True)
