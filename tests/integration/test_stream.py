"""test_stream.py - the --devio front end driven by an independent Python
client (devio_wire.py): round trips over TCP and Unix sockets on image files
and RAM disks, stdio sessions, and bad input, where in every case a second
client connected at the same time keeps being served."""
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import time

import pytest

import devio_wire as w
from conftest import DEVIO, free_port, wait_for

MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-stream-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_image(path, size, seed=1):
    data = bytes((i * 7 + seed) & 0xFF for i in range(4096)) * (size // 4096)
    with open(path, "wb") as f:
        f.write(data)
    return data


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def vmrss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_tcp(serve, *args):
    port = free_port()
    s = serve(*args, "--devio", f"tcp:{port}")
    s.wait_tcp(port)
    return s, (lambda: w.Client(port=port))


def start_unix(serve, tmp, *args):
    path = os.path.join(tmp, "devio.sock")
    s = serve(*args, "--devio", f"unix:{path}")
    s.wait_unix(path)
    return s, (lambda: w.Client(path=path))


def check_alive(c, expect_size):
    """The bystander client is still served correctly."""
    size, _, _ = c.info()
    assert size == expect_size
    err, data = c.read(0, 4096)
    assert err == 0 and len(data) == 4096


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_file_round_trip(serve, tmp, transport):
    img = os.path.join(tmp, "disk.img")
    orig = make_image(img, 4 * MiB)
    if transport == "tcp":
        _, connect = start_tcp(serve, img)
        with connect() as c0:
            port = c0.s.getpeername()[1]
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                                   timeout=10).stdout
        assert f"127.0.0.1:{port}" in listening, listening  # loopback unless told otherwise
        with connect() as c1:
            c1.info()
            # the server's end probes an idle peer, so a vanished one frees its slot
            est = subprocess.run(["ss", "-Htno", "state", "established", f"sport = :{port}"],
                                 capture_output=True, text=True, timeout=10).stdout
            assert "keepalive" in est, est
    else:
        _, connect = start_unix(serve, tmp, img)
    with connect() as c:
        size, align, flags = c.info()
        assert size == 4 * MiB and 1 <= align <= 512
        assert not flags & w.FLAG_RO
        err, data = c.read(12345, 100000)
        assert err == 0 and data == orig[12345:12345 + 100000]
        payload = os.urandom(MiB + 333)
        assert c.write(77777, payload) == (0, len(payload))
        err, back = c.read(77777, len(payload))
        assert err == 0 and back == payload
        c.bye()
        assert c.at_eof()
    with open(img, "rb") as f:
        f.seek(77777)
        assert f.read(len(payload)) == payload


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_ram_round_trip_and_zero_unmap(serve, tmp, transport):
    if transport == "tcp":
        _, connect = start_tcp(serve, "ram:16M")
    else:
        _, connect = start_unix(serve, tmp, "ram:16M")
    with connect() as c:
        size, _, flags = c.info()
        assert size == 16 * MiB
        assert flags & w.FLAG_UNMAP and flags & w.FLAG_ZERO
        assert c.read(0, 4096) == (0, bytes(4096))
        data = os.urandom(3 * MiB)
        assert c.write(MiB, data) == (0, len(data))
        assert c.read(MiB, len(data)) == (0, data)
        assert c.zero([(MiB, 4096), (2 * MiB, 8192)]) == 0
        _, back = c.read(MiB, len(data))
        expect = bytearray(data)
        expect[0:4096] = bytes(4096)
        expect[MiB:MiB + 8192] = bytes(8192)
        assert back == bytes(expect)
        assert c.unmap([(MiB, 3 * MiB)]) == 0
        assert c.read(MiB, len(data)) == (0, bytes(len(data)))


def test_many_clients_at_once(serve, tmp):
    _, connect = start_unix(serve, tmp, "ram:8M")
    clients = [connect() for _ in range(8)]
    try:
        for i, c in enumerate(clients):
            assert c.write(i * 65536, bytes([i + 1]) * 65536) == (0, 65536)
        for i, c in enumerate(reversed(clients)):
            j = len(clients) - 1 - i
            assert c.read(j * 65536, 65536) == (0, bytes([j + 1]) * 65536)
    finally:
        for c in clients:
            c.close()


def test_stdio_session(tmp):
    img = os.path.join(tmp, "disk.img")
    orig = make_image(img, MiB)
    req = w.q(w.INFO) + w.q(w.READ, 4096, 512) + w.q(w.WRITE, 0, 4) + b"ABCD" + w.q(w.CLOSE)
    p = subprocess.run([DEVIO, "serve", img, "--devio", "stdio"], input=req, capture_output=True, timeout=30)
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert struct.unpack("<3Q", out[:24])[0] == MiB
    assert struct.unpack("<2Q", out[24:40]) == (0, 512)
    assert out[40:552] == orig[4096:4608]
    assert struct.unpack("<2Q", out[552:568]) == (0, 4)
    assert len(out) == 568
    with open(img, "rb") as f:
        assert f.read(4) == b"ABCD"


# ---- bad input: each with a bystander that must keep being served ----

@pytest.fixture
def pair(serve, tmp):
    """A RAM-disk server, an attacker connection and a bystander connection."""
    s, connect = start_unix(serve, tmp, "ram:4M")
    bad, good = connect(), connect()
    assert good.write(0, b"bystander") == (0, 9)
    yield s, bad, good, connect
    bad.close()
    good.close()


def test_truncated_headers(pair):
    s, bad, good, connect = pair
    for prefix in (b"\x02\x00\x00", w.q(w.READ) + b"\x00" * 5, w.q(w.WRITE, 0, 100) + b"x" * 10,
                   w.q(w.UNMAP, 32) + b"\x00" * 20):
        c = connect()
        c.send(prefix)
        c.s.shutdown(1)  # the peer vanishes mid-request
        assert c.at_eof()
        c.close()
        check_alive(good, 4 * MiB)
    assert good.read(0, 9) == (0, b"bystander")
    assert s.proc.poll() is None


def test_unknown_codes_answer_enodev_and_keep_connection(pair):
    _, bad, good, _ = pair
    for code in (0, 10, 12345, 2 ** 64 - 1):
        bad.send(w.q(code))
        assert bad.recv_q(1) == (w.ENODEV,)
    assert bad.info()[0] == 4 * MiB
    check_alive(good, 4 * MiB)


def test_connect_scsi_shared_answered_in_their_format(pair):
    _, bad, good, _ = pair
    bad.send(w.q(w.CONNECT, 0, 11) + b"10.0.0.1:99")
    err, ptr = bad.recv_q(2)
    assert err != 0 and ptr == 0
    bad.send(w.q(w.SCSI) + bytes(16) + w.q(6, 512) + b"abcdef")
    err, n = bad.recv_q(2)
    assert err != 0 and n == 0
    bad.send(w.q(w.SHARED, 0, 0, 0, 0, 0, 0))
    resp = bad.recv_exact(64)
    assert struct.unpack("<Q", resp[:8])[0] != 0 and struct.unpack("<Q", resp[-8:])[0] == 0
    assert bad.info()[0] == 4 * MiB
    check_alive(good, 4 * MiB)


def test_over_limit_lengths_are_refused_without_allocation(pair):
    s, bad, good, connect = pair
    before = vmrss(s.proc.pid)
    for n in (2 ** 63, 2 ** 64 - 1, (64 << 20) + 1, 1 << 40):
        # served up to the end, as ImDisk's devio serves any length; the
        # buffer stays bounded by max-transfer whatever the length says
        err, data = bad.read(0, n)
        assert err == 0 and len(data) == 4 * MiB
    assert vmrss(s.proc.pid) - before < 32 * MiB
    bad.send(w.q(w.WRITE, 0, 1 << 62))
    err, n = bad.recv_q(2)
    assert err != 0 and n == 0
    assert bad.at_eof()  # the stream cannot be followed: closed
    c = connect()
    c.send(w.q(w.UNMAP, 1 << 40))
    assert c.recv_q(1)[0] != 0
    assert c.at_eof()
    c.close()
    assert vmrss(s.proc.pid) - before < 32 * MiB
    check_alive(good, 4 * MiB)


def test_offset_overflow_and_past_end(pair):
    _, bad, good, _ = pair
    size = 4 * MiB
    assert bad.write(size - 4, b"tail") == (0, 4)
    err, data = bad.read(size - 4, 4096)  # short read at the end
    assert err == 0 and data == b"tail"
    assert bad.read(size, 10) == (0, b"")
    assert bad.read(size + 1, 10)[0] != 0  # beyond the end: an error
    assert bad.read(2 ** 64 - 100, 200)[0] != 0
    assert bad.write(size - 2, b"four")[0] != 0
    assert bad.write(2 ** 64 - 2, b"four")[0] != 0
    assert bad.zero([(size - 10, 20)]) != 0
    assert bad.unmap([(2 ** 63 - 1, 2 ** 64 - 1)]) != 0
    assert bad.unmap([(-4096, 8192)]) != 0
    # a WRITE of nothing is still checked: fine at the end, refused beyond it
    assert bad.write(size, b"") == (0, 0)
    assert bad.write(size + 1, b"")[0] != 0
    assert bad.write(2 ** 64 - 1, b"")[0] != 0
    assert bad.read(size - 4, 4) == (0, b"tail")
    check_alive(good, size)


def test_range_arrays_not_multiple_of_16(pair):
    _, bad, good, _ = pair
    assert bad.write(0, b"\xff" * 4096) == (0, 4096)
    bad.send(w.q(w.UNMAP, 24) + struct.pack("<qQ", 0, 4096) + b"\x00" * 8)
    assert bad.recv_q(1)[0] != 0
    bad.send(w.q(w.ZERO, 15) + b"\x00" * 15)
    assert bad.recv_q(1)[0] != 0
    assert bad.read(0, 4096) == (0, b"\xff" * 4096)  # nothing was run
    check_alive(good, 4 * MiB)


def test_write_to_readonly_export(serve, tmp):
    img = os.path.join(tmp, "ro.img")
    make_image(img, MiB)
    before = sha(img)
    _, connect = start_unix(serve, tmp, img, "--readonly")
    with connect() as bad, connect() as good:
        assert bad.info()[2] & w.FLAG_RO
        err, n = bad.write(0, b"x" * 8192)
        assert err != 0 and n == 0
        assert bad.write(0, b"")[0] != 0  # even 0 bytes: the export is read-only
        assert bad.zero([(0, 4096)]) != 0
        assert bad.unmap([(0, 4096)]) != 0
        assert bad.info()[0] == MiB  # payload consumed, stream in step
        check_alive(good, MiB)
    assert sha(img) == before


def test_peer_vanishing_mid_write(pair):
    s, bad, good, connect = pair
    c = connect()
    c.send(w.q(w.WRITE, 0, 4 * MiB) + b"y" * MiB)
    c.s.close()  # gone with 3 MiB still owed
    check_alive(good, 4 * MiB)
    assert good.read(0, 9) == (0, b"bystander")
    assert s.proc.poll() is None


def test_connection_limit_refuses_extras(serve, tmp):
    s, connect = start_unix(serve, tmp, "ram:1M")
    clients = []
    try:
        for _ in range(64):
            clients.append(connect())
            assert clients[-1].info()[0] == MiB  # accepted and served
        extra = connect()
        assert extra.at_eof()
        extra.close()
        clients.pop().close()
        w_ok = None
        for _ in range(400):  # the freed slot is reused once its session ends
            c = connect()
            try:
                c.s.settimeout(2)
                c.send(w.q(w.INFO))
                w_ok = c.recv_q(3)
                break
            except (w.ProtocolError, OSError):
                c.close()
                time.sleep(0.05)
        assert w_ok and w_ok[0] == MiB
        c.close()
    finally:
        for c in clients:
            c.close()
    assert s.proc.poll() is None


def test_serial_device_session(serve, tmp):
    """A tty (a pseudo-terminal here): opened, put in raw mode, one session."""
    import select
    master, slave = os.openpty()
    try:
        img = os.path.join(tmp, "disk.img")
        orig = make_image(img, MiB)
        s = serve(img, "--devio", os.ttyname(slave))
        import termios
        # the server's raw mode is in place once echo is off
        wait_for(lambda: not termios.tcgetattr(slave)[3] & termios.ECHO or s.proc.poll() is not None,
                 10, "raw mode on the tty")

        def xfer(data, n):
            os.write(master, data)
            out = b""
            while len(out) < n:
                r, _, _ = select.select([master], [], [], 10)
                assert r, f"no answer from the server: {s.stderr()}"
                out += os.read(master, n - len(out))
            return out

        # bytes a cooked tty would mangle (CR, ^C, ^D, NL) pass unchanged
        payload = bytes([13, 3, 4, 10, 0x7F, 0x11, 0x13]) * 100
        assert struct.unpack("<3Q", xfer(w.q(w.INFO), 24))[0] == MiB
        assert xfer(w.q(w.WRITE, 100, len(payload)) + payload, 16) == w.q(0, len(payload))
        out = xfer(w.q(w.READ, 100, len(payload)), 16 + len(payload))
        assert out == w.q(0, len(payload)) + payload
        os.write(master, w.q(w.CLOSE))
        assert s.proc.wait(timeout=20) == 0
        with open(img, "rb") as f:
            assert f.read()[100:100 + len(payload)] == payload
    finally:
        os.close(master)
        os.close(slave)


def test_stop_with_clients_connected_and_mid_request(serve, tmp):
    s, connect = start_unix(serve, tmp, "ram:4M")
    idle, busy = connect(), connect()
    try:
        assert idle.info()[0] == 4 * MiB
        busy.send(w.q(w.WRITE, 0, MiB) + b"z" * 1000)  # stalls mid-payload
        assert s.stop() == 0  # SIGTERM: sessions are ended, the server exits cleanly
        assert idle.at_eof() and busy.at_eof()
        assert not os.path.exists(os.path.join(tmp, "devio.sock"))
    finally:
        idle.close()
        busy.close()


def test_status_names_the_transport(serve, tmp):
    s, _ = start_unix(serve, tmp, "ram:1M")
    sock = os.path.join(tmp, "devio.sock")
    out = ""
    for _ in range(100):  # the status file is written right after start
        out = subprocess.run([DEVIO, "status"], capture_output=True, text=True, timeout=30).stdout
        if f"devio stream on unix:{sock}" in out:
            break
        time.sleep(0.05)
    assert f"devio stream on unix:{sock}" in out, out
    assert "served" in out


def test_unix_path_that_is_not_a_socket_is_left_alone(tmp):
    path = os.path.join(tmp, "precious.txt")
    with open(path, "w") as f:
        f.write("keep me")
    p = subprocess.run([DEVIO, "serve", "ram:1M", "--devio", f"unix:{path}"], capture_output=True, timeout=30)
    assert p.returncode != 0
    assert b"not a socket" in p.stderr
    with open(path) as f:
        assert f.read() == "keep me"
    assert os.listdir(tmp) == ["precious.txt"]
