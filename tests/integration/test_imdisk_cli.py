"""test_imdisk_cli.py - ImDisk's own devio command line as a drop-in:
`devio [-r] tcp-port|commdev diskdev [blocks] [offset] [alignm] [buffersize]`,
checked with the independent Python client over TCP and stdin/stdout."""
import os
import shutil
import subprocess
import tempfile

import pytest

import devio_wire as w
from conftest import DEVIO, stop_process, wait_for

MiB = 1 << 20


@pytest.fixture
def image():
    d = tempfile.mkdtemp(prefix="devio-imdisk-")
    path = os.path.join(d, "disk.img")
    data = os.urandom(4 * MiB)  # random: no master boot record at sector 0
    if data[510:512] == b"\x55\xaa":
        data = data[:510] + b"\0\0" + data[512:]
    with open(path, "wb") as f:
        f.write(data)
    yield path, data
    shutil.rmtree(d, ignore_errors=True)


def stdio(args, requests):
    r = subprocess.run([DEVIO, *args], input=requests, capture_output=True, timeout=30)
    assert b"AddressSanitizer" not in r.stderr and b"runtime error:" not in r.stderr, r.stderr
    return r


def test_tcp_port_serves_whole_image_on_all_interfaces(imdisk, image):
    path, data = image
    p, port = imdisk("PORT", path)
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                               timeout=10).stdout
    assert any(a in listening for a in (f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}")), listening
    with w.Client(port=port) as c:
        size, align, flags = c.info()
        assert size == len(data) and align == 1 and not flags & w.FLAG_RO
        assert c.read(MiB, 8192) == (0, data[MiB:MiB + 8192])
        assert c.write(0, b"imdisk") == (0, 6)
    with open(path, "rb") as f:
        assert f.read(6) == b"imdisk"
    p.terminate()
    p.wait(timeout=20)
    assert b"ALL interfaces" in p.stderr.read()
    p.stderr = open(os.devnull, "rb")


def test_blocks_and_offset_form(imdisk, image):
    path, data = image
    # 2048 blocks of 512 bytes from block 1024 (512 KiB), read-only
    _, port = imdisk("-r", "PORT", path, "2048", "1024")
    with w.Client(port=port) as c:
        size, _, flags = c.info()
        assert size == 2048 * 512 and flags & w.FLAG_RO
        assert c.read(0, 4096) == (0, data[512 * 1024:512 * 1024 + 4096])
        assert c.write(0, b"x")[0] != 0


def test_size_suffixes(image):
    path, data = image
    # 1M bytes from 64K bytes (K/M are powers of 1024 as in ImDisk)
    r = stdio(["-", path, "1M", "64K"], w.q(w.INFO) + w.q(w.READ, 0, 100) + w.q(w.CLOSE))
    assert r.returncode == 0, r.stderr
    assert int.from_bytes(r.stdout[:8], "little") == MiB
    assert r.stdout[40:140] == data[65536:65636]
    # lower case: powers of 1000
    r = stdio(["-", path, "1m", "1k"], w.q(w.INFO) + w.q(w.READ, 0, 10) + w.q(w.CLOSE))
    assert int.from_bytes(r.stdout[:8], "little") == 1000000
    assert r.stdout[40:50] == data[1000:1010]


def test_partition_zero_is_whole_image_and_buffersize_bounds_transfers(image):
    path, data = image
    reqs = w.q(w.INFO) + w.q(w.READ, 0, 4096) + w.q(w.READ, 0, 8192) + w.q(w.CLOSE)
    r = stdio(["-r", "-", path, "0", "0", "1", "4096"], reqs)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert int.from_bytes(out[:8], "little") == len(data)
    assert out[24:40] == w.q(0, 4096) and out[40:4136] == data[:4096]
    # over the buffer size: served in buffer-sized pieces, as ImDisk's devio
    # serves reads of any length (never E2BIG)
    assert out[4136:4152] == w.q(0, 8192) and out[4152:] == data[:8192]


def test_alignment_is_reported(image):
    path, _ = image
    r = stdio(["-", path, "0", "0", "512"], w.q(w.INFO) + w.q(w.CLOSE))
    assert r.returncode == 0
    assert int.from_bytes(r.stdout[8:16], "little") == 512


def test_readonly_stdio_refuses_writes(image):
    path, data = image
    r = stdio(["-r", "-", path], w.q(w.WRITE, 0, 3) + b"abc" + w.q(w.CLOSE))
    assert r.returncode == 0
    err, n = int.from_bytes(r.stdout[:8], "little"), int.from_bytes(r.stdout[8:16], "little")
    assert err != 0 and n == 0
    with open(path, "rb") as f:
        assert f.read() == data


# shm:NAME on this command line: test_shm.py::test_imdisk_command_line


@pytest.mark.parametrize("args", [["9000"], ["-x", "9000", "img"], ["9000", "img", "1", "2", "3", "4", "5"],
                                  ["-", "img", "12Q"]])
def test_bad_command_lines(args):
    r = subprocess.run([DEVIO, *args], capture_output=True, timeout=30)
    assert r.returncode == 2
    assert b"usage" in r.stderr


@pytest.mark.parametrize("name", ["drv:", "drv:.", "drv:..", "drv:a/b"])
def test_drv_names_that_are_not_a_plain_name_are_refused(tmp_path, name):
    # the image does not exist, so even a wrongly accepted name maps nothing
    r = subprocess.run([DEVIO, name, str(tmp_path / "missing.img")], capture_output=True, timeout=30)
    assert r.returncode == 2
    assert b"want drv:NAME" in r.stderr


def test_drv_maps_to_a_kernel_device(image):
    """drv:NAME: ublk when the kernel has it, else a FUSE file with a loop device."""
    if not os.path.exists("/dev/fuse") or os.path.exists("/dev/ublk-control"):
        pytest.skip("tests the FUSE mapping (needs /dev/fuse and no ublk)")
    path, data = image
    name = f"imdisk-test-{os.getpid()}"
    mnt = f"/run/devio/{name}"
    p = subprocess.Popen([DEVIO, f"drv:{name}", path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        def loop_dev():
            out = subprocess.run(["losetup", "-j", f"{mnt}/disk"], capture_output=True, text=True,
                                 timeout=10).stdout
            return out.split(":")[0] if out else None
        wait_for(lambda: loop_dev() or p.poll() is not None, 60, "loop device")
        assert p.poll() is None, p.stderr.read()
        dev = loop_dev()
        with open(dev, "rb") as f:
            assert f.read(MiB) == data[:MiB]
        with open(f"{mnt}/disk", "rb") as f:
            f.seek(2 * MiB)
            assert f.read(4096) == data[2 * MiB:2 * MiB + 4096]
    finally:
        stop_process(p, 30)
        p.stdout.close()
        p.stderr.close()
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], timeout=30)
        if os.path.isdir(mnt):
            os.rmdir(mnt)
    assert p.returncode == 0
    assert not subprocess.run(["losetup", "-j", f"{mnt}/disk"], capture_output=True, text=True,
                              timeout=10).stdout


def test_partition_number_without_mbr_serves_whole_image(image):
    path, data = image
    # as ImDisk's devio: no table, so "3" selects nothing; the next word is the offset
    r = stdio(["-", path, "3", "8"], w.q(w.INFO) + w.q(w.READ, 0, 512) + w.q(w.CLOSE))
    assert r.returncode == 0, r.stderr
    assert int.from_bytes(r.stdout[:8], "little") == len(data) - 8 * 512
    assert r.stdout[40:552] == data[4096:4608]
    assert b"no master boot record" in r.stderr


def test_stdin_socket_carries_both_directions(image):
    """`-` with a socket on fd 0 (inetd style): answers come back on fd 0,
    as ImDisk's devio sends them; nothing goes to stdout."""
    import socket
    path, data = image
    a, b = socket.socketpair()
    out = tempfile.TemporaryFile()
    with a:
        p = subprocess.Popen([DEVIO, "-", path], stdin=b, stdout=out, stderr=subprocess.PIPE)
        b.close()
        try:
            c = w.Client(sock=a)
            assert c.info()[0] == len(data)
            assert c.read(4096, 1000) == (0, data[4096:5096])
            assert c.write(0, b"abc") == (0, 3)
            c.bye()
            _, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, err
    out.seek(0)
    assert out.read() == b""
    with open(path, "rb") as f:
        assert f.read(3) == b"abc"


def test_partition_numbers_as_imdisk(tmp_path):
    """p1, an extended partition in slot 2 with two logicals, p3: 1 = p1,
    2 and 3 = the logicals, 4 = p3; 5 does not exist.  Primaries only and a
    number beyond them: refused where ImDisk's devio would serve the whole
    image."""
    import struct
    img = bytearray(16 * MiB)

    def entry(lba, slot, typ, start, sectors):
        o = lba * 512 + 446 + 16 * slot
        img[o + 4] = typ
        img[o + 8:o + 16] = struct.pack("<II", start, sectors)
        img[lba * 512 + 510:lba * 512 + 512] = b"\x55\xaa"

    entry(0, 0, 0x83, 2048, 2048)
    entry(0, 1, 0x0F, 8192, 8192)
    entry(8192, 0, 0x83, 63, 1000)
    entry(8192, 1, 0x05, 4096, 4096)
    entry(8192 + 4096, 0, 0x07, 63, 1001)
    entry(0, 2, 0x0C, 20480, 4096)
    for n, (start, sectors) in enumerate([(2048, 2048), (8192 + 63, 1000), (12288 + 63, 1001), (20480, 4096)], 1):
        img[start * 512:start * 512 + 8] = b"part%04d" % n
    path = tmp_path / "mbr.img"
    path.write_bytes(bytes(img))
    for n, sectors in enumerate([2048, 1000, 1001, 4096], 1):
        r = stdio(["-", str(path), str(n)], w.q(w.INFO) + w.q(w.READ, 0, 8) + w.q(w.CLOSE))
        assert r.returncode == 0, r.stderr
        assert int.from_bytes(r.stdout[:8], "little") == sectors * 512
        assert r.stdout[40:48] == b"part%04d" % n
    r = stdio(["-", str(path), "5"], w.q(w.CLOSE))
    assert r.returncode != 0 and b"no partition 5" in r.stderr
    img2 = bytearray(4 * MiB)
    img2[446 + 4] = 0x83
    img2[446 + 8:446 + 16] = struct.pack("<II", 2048, 2048)
    img2[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(img2))
    r = stdio(["-", str(path), "2"], w.q(w.CLOSE))
    assert r.returncode != 0 and b"would serve the whole image" in r.stderr, r.stderr
