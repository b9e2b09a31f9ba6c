"""test_stream_remote.py - the devio client backend (backends/devio_remote.c)
re-exported by a second server: `devio serve devio+unix:///A --devio unix:B`.
The Python wire client talks to B; B's backend talks to A.  Checks several
clients in parallel through the connection pool, reconnection after A
restarts, alignment handled by read-modify-write, windows and read-only."""
import os
import shutil
import tempfile
import threading

import pytest

import devio_wire as w
from conftest import wait_for

MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-remote-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def image(path, size):
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def connectable(path):
    try:
        with w.Client(path=path, timeout=5) as c:
            return c.info()[0] > 0
    except (OSError, w.ProtocolError):
        return False


def chain(serve, tmp, src, upstream_args=(), front_args=(), a_opts=""):
    a = os.path.join(tmp, "a.sock")
    b = os.path.join(tmp, "b.sock")
    sa = serve(src, *upstream_args, "--devio", f"unix:{a}{a_opts}")
    sa.wait_unix(a)
    sb = serve(f"devio+unix://{a}", *front_args, "--devio", f"unix:{b}")
    sb.wait_unix(b)
    return sa, sb, a, b


def test_reexport_round_trip(serve, tmp):
    img = os.path.join(tmp, "disk.img")
    data = bytearray(image(img, 8 * MiB))
    _, _, _, b = chain(serve, tmp, img)
    with w.Client(path=b) as c:
        assert c.info()[0] == len(data)
        # larger than the client's 1 MiB chunk: split on the way
        err, got = c.read(MiB - 7, 3 * MiB)
        assert err == 0 and got == data[MiB - 7:4 * MiB - 7]
        payload = os.urandom(2 * MiB + 5)
        assert c.write(3, payload) == (0, len(payload))
        data[3:3 + len(payload)] = payload
        assert c.zero([(5 * MiB, 4096)]) == 0
        data[5 * MiB:5 * MiB + 4096] = bytes(4096)
    with open(img, "rb") as f:
        assert f.read() == bytes(data)


def test_parallel_clients_through_the_pool(serve, tmp):
    _, _, _, b = chain(serve, tmp, "ram:64M")
    errors = []

    def worker(i):
        try:
            with w.Client(path=b) as c:
                block = bytes([i + 1]) * (256 << 10)
                for k in range(8):
                    off = (i * 8 + k) * len(block)
                    assert c.write(off, block) == (0, len(block))
                for k in range(8):
                    off = (i * 8 + k) * len(block)
                    assert c.read(off, len(block)) == (0, block)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_reconnects_when_upstream_restarts(serve, tmp):
    img = os.path.join(tmp, "disk.img")
    data = image(img, 2 * MiB)
    sa, sb, a, b = chain(serve, tmp, img)
    with w.Client(path=b) as c:
        assert c.read(0, 4096) == (0, data[:4096])
        sa.stop()
        assert not os.path.exists(a)  # the server removes its socket
        sa2 = serve(img, "--devio", f"unix:{a}")
        sa2.wait_unix(a)
        # the socket file appears at bind(), a moment before listen()
        wait_for(lambda: connectable(a), 10, f"{a} accepting")
        # the first request after the restart finds a dead connection and redials
        assert c.read(4096, 4096) == (0, data[4096:8192])
        assert c.write(0, b"again") == (0, 5)
    with open(img, "rb") as f:
        assert f.read(5) == b"again"
    assert "reconnecting" in sb.stderr()


def test_alignment_by_read_modify_write(serve, tmp):
    img = os.path.join(tmp, "disk.img")
    data = bytearray(image(img, MiB))
    sa, _, a, b = chain(serve, tmp, img, a_opts=",align=4096")
    with w.Client(path=a) as direct:
        assert direct.info()[1] == 4096
        assert direct.write(1001, b"x")[0] != 0  # the upstream enforces its alignment
    with w.Client(path=b) as c:
        assert c.info()[1] == 4096  # the preference passes through
        assert c.write(1001, b"unaligned write") == (0, 15)
        data[1001:1016] = b"unaligned write"
        assert c.write(4096 * 3 - 2, b"straddle") == (0, 8)
        data[4096 * 3 - 2:4096 * 3 + 6] = b"straddle"
        assert c.read(1000, 20) == (0, bytes(data[1000:1020]))
        big = os.urandom(600000 + 5)  # unaligned at both ends, several blocks
        assert c.write(4097, big) == (0, len(big))
        data[4097:4097 + len(big)] = big
        assert c.read(4095, len(big) + 10) == (0, bytes(data[4095:4095 + len(big) + 10]))
    with open(img, "rb") as f:
        assert f.read() == bytes(data)


def test_aligned_writes_survive_concurrent_read_modify_write(serve, tmp):
    """Aligned writes to a block while another client patches a few bytes
    of it (read-modify-write through the backend): the bytes only the
    aligned writer touches always read back as it last wrote them."""
    img = os.path.join(tmp, "disk.img")
    image(img, MiB)
    _, _, _, b = chain(serve, tmp, img, a_opts=",align=4096")
    patch_at, patch_len = 100, 10
    stop = threading.Event()
    errors = []

    def recorded(fn):
        def run(*args):
            try:
                fn(*args)
            except Exception as e:  # a thread's failure fails the test
                errors.append(repr(e))
        return run

    @recorded
    def patcher():
        with w.Client(path=b) as c:
            n = 0
            while not stop.is_set():
                for blk in (0, 1):
                    if c.write(blk * 4096 + patch_at, bytes([n & 0xFF]) * patch_len) != (0, patch_len):
                        errors.append("patch failed")
                n += 1

    @recorded
    def writer(blk):
        with w.Client(path=b) as c:
            for v in range(1, 256):
                if c.write(blk * 4096, bytes([v]) * 4096) != (0, 4096):
                    errors.append("write failed")
                    return
                err, got = c.read(blk * 4096, 4096)
                outside = got[:patch_at] + got[patch_at + patch_len:]
                if err or outside != bytes([v]) * (4096 - patch_len):
                    errors.append(f"block {blk}: write {v} undone")
                    return

    p = threading.Thread(target=patcher)
    ws = [threading.Thread(target=writer, args=(blk,)) for blk in (0, 1)]
    p.start()
    for t in ws:
        t.start()
    for t in ws:
        t.join(120)
    stop.set()
    p.join(60)
    assert not errors, errors[:3]


def test_window_and_readonly(serve, tmp):
    img = os.path.join(tmp, "disk.img")
    data = image(img, 4 * MiB)
    _, _, _, b = chain(serve, tmp, img, front_args=("--offset", "1M", "--size", "2M", "--readonly"))
    with w.Client(path=b) as c:
        size, _, flags = c.info()
        assert size == 2 * MiB and flags & w.FLAG_RO
        assert c.read(0, 4096) == (0, data[MiB:MiB + 4096])
        assert c.write(0, b"no")[0] != 0
    with open(img, "rb") as f:
        assert f.read() == data


def test_upstream_readonly_is_inherited(serve, tmp):
    img = os.path.join(tmp, "disk.img")
    data = image(img, MiB)
    _, _, _, b = chain(serve, tmp, img, upstream_args=("--readonly",))
    with w.Client(path=b) as c:
        assert c.info()[2] & w.FLAG_RO
        assert c.write(0, b"no")[0] != 0
    with open(img, "rb") as f:
        assert f.read() == data


def fake_server(path, info, requests_to_answer=0):
    """A one-shot devio server in a thread: answers INFO with `info`
    (size, alignment, flags), then hangs up and stops listening."""
    import socket
    import struct
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    ls.settimeout(30)

    def run():
        try:
            conn, _ = ls.accept()
            conn.settimeout(30)
            with conn:
                assert struct.unpack("<Q", conn.recv(8))[0] == w.INFO
                conn.sendall(w.q(*info))
        except OSError:
            pass
        finally:
            ls.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_server_vanishing_fails_the_client_cleanly(tmp):
    import subprocess
    from conftest import DEVIO
    path = os.path.join(tmp, "fake.sock")
    t = fake_server(path, (MiB, 1, 0))
    try:
        p = subprocess.run([DEVIO, "cat", f"devio+unix://{path}"], capture_output=True, timeout=60)
    finally:
        t.join(30)
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    assert p.returncode == 1, p  # an error exit, not killed by SIGPIPE
    assert b"fake.sock" in p.stderr and p.stdout == b""


def test_size_zero_needs_size_option(tmp):
    import subprocess
    from conftest import DEVIO
    path = os.path.join(tmp, "fake.sock")
    t = fake_server(path, (0, 1, 0))
    try:
        p = subprocess.run([DEVIO, "info", f"devio+unix://{path}"], capture_output=True, timeout=60)
    finally:
        t.join(30)
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    assert p.returncode == 1
    assert b"does not tell its size" in p.stderr and b"--size" in p.stderr


def test_size_beyond_signed_offsets_is_refused(tmp):
    import subprocess
    from conftest import DEVIO
    path = os.path.join(tmp, "huge.sock")
    t = fake_server(path, (2 ** 64 - 512, 512, 0))
    try:
        p = subprocess.run([DEVIO, "info", f"devio+unix://{path}"], capture_output=True, timeout=60)
    finally:
        t.join(30)
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    assert p.returncode == 1
    assert b"more than the protocol can address" in p.stderr


def cat_from_slow_server(tmp, answer, timeout_s, cmd=("cat", "--length", "4096"), stdin=None):
    """A one-connection server that answers INFO (1 MiB, alignment 1), then
    runs answer(conn, done) for the request that `devio cat --length 4096`
    (or cmd) sends, with DEVIO_REMOTE_TIMEOUT=timeout_s.  done is set once
    the command has exited.  Returns its CompletedProcess, checked for
    sanitizer reports."""
    import socket
    import subprocess
    from conftest import DEVIO
    path = os.path.join(tmp, "slow.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(4)
    done = threading.Event()

    def run():
        ls.settimeout(30)
        try:
            conn, _ = ls.accept()
            with conn:
                conn.recv(8)
                conn.sendall(w.q(MiB, 1, 0))
                ls.close()  # the redial after the timeout is refused
                conn.recv(24)
                answer(conn, done)
        except OSError:
            pass

    t = threading.Thread(target=run)
    t.start()
    try:
        p = subprocess.run([DEVIO, cmd[0], f"devio+unix://{path}", *cmd[1:]], input=stdin, capture_output=True,
                           timeout=60, env=dict(os.environ, DEVIO_REMOTE_TIMEOUT=str(timeout_s)))
    finally:
        done.set()
        t.join(30)
        ls.close()
    assert b"AddressSanitizer" not in p.stderr and b"runtime error:" not in p.stderr
    return p


def test_silent_server_times_out(tmp):
    """A server that answers INFO, then never answers: the request fails
    after DEVIO_REMOTE_TIMEOUT instead of hanging the client."""
    p = cat_from_slow_server(tmp, lambda conn, done: done.wait(60), 1)
    assert p.returncode == 1 and p.stdout == b""
    assert b"connection lost" in p.stderr


def test_write_that_timed_out_is_not_sent_again(tmp):
    """A WRITE the server never answers may still land later: it fails
    without a second copy on a new connection (a READ would be retried)."""
    p = cat_from_slow_server(tmp, lambda conn, done: done.wait(60), 1, cmd=("write",), stdin=b"w" * 4096)
    assert p.returncode == 1
    assert b"connection lost" in p.stderr and b"reconnecting" not in p.stderr


def test_trickling_server_times_out(tmp):
    """A server that answers a READ one byte at a time, each well within the
    per-call timeout: the request still fails after DEVIO_REMOTE_TIMEOUT."""
    import time

    def trickle(conn, done):
        answer = w.q(0, 4096) + bytes(4096)
        for i in range(200):  # at most 40 s, far less than the answer
            if done.is_set():
                break
            conn.sendall(answer[i:i + 1])
            time.sleep(0.2)

    p = cat_from_slow_server(tmp, trickle, 2)
    assert p.returncode == 1 and p.stdout == b""
    assert b"timed out" in p.stderr


def test_nbd_front_end_over_devio_backend(serve, tmp):
    """Real NBD peers (nbdcopy with requests in flight, qemu-io) through
    `serve devio+unix://A --nbd`: the pool carries their parallel requests."""
    import subprocess
    if not shutil.which("nbdcopy") or not shutil.which("qemu-io"):
        pytest.skip("nbdcopy/qemu-io not installed")
    img = os.path.join(tmp, "disk.img")
    data = bytearray(image(img, 16 * MiB))
    a = os.path.join(tmp, "a.sock")
    b = os.path.join(tmp, "b.sock")
    serve(img, "--devio", f"unix:{a}").wait_unix(a)
    serve(f"devio+unix://{a}", "--nbd", f"unix:{b}").wait_unix(b)
    uri = f"nbd+unix:///?socket={b}"
    out = os.path.join(tmp, "out.img")
    subprocess.run(["nbdcopy", "--requests=16", "--connections=1", uri, out], check=True, timeout=120)
    with open(out, "rb") as f:
        assert f.read() == bytes(data)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000000 300000", uri],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "wrote 300000" in r.stdout, r.stdout + r.stderr
    data[1000000:1300000] = b"\x5a" * 300000
    with open(img, "rb") as f:
        assert f.read() == bytes(data)


def test_size_zero_takes_offset_plus_size(serve, tmp):
    """A server that does not tell its size: the export is --offset +
    --size long and the window layer serves the --size bytes after
    --offset, as over any source."""
    import subprocess
    path = os.path.join(tmp, "fake.sock")
    t = fake_server(path, (0, 512, 0))
    sock = os.path.join(tmp, "win.sock")
    try:
        serve(f"devio+unix://{path}", "--offset", "1M", "--size", "3M", "--nbd", f"unix:{sock}").wait_unix(sock)
    finally:
        t.join(30)
    r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 3 * MiB
