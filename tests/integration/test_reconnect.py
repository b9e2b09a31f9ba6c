"""test_reconnect.py - `devio attach URI --fuse DIR --loop` keeps its device
while the remote `devio serve` is killed with SIGKILL and started again on
the same address: fio writes and verifies through the loop device meanwhile
with no error, and every block of the device equals the image afterwards.
A server away past --timeout gives EIO (not a hang) and the device works
again once it is back; a server that comes back with another size is
refused.  RESTARTS=N (env DEVIO_RECONNECT_RESTARTS, default 3) per variant."""
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import DEVIO, free_port, port_open, wait_for
from test_fuse import MiB, Scratch, loop_exists

RESTARTS = int(os.environ.get("DEVIO_RECONNECT_RESTARTS", "3"))
SIZE = 16 * MiB
BLOCK = 4096
FAR_OFF = 7 * MiB + 3 * 4096  # never read before (partition scan, readahead)


@pytest.fixture
def scratch():
    s = Scratch()
    yield s
    s.close()


class Far:
    """The remote `devio serve IMG --nbd|--devio ADDR`, killed and restarted."""

    def __init__(self, scratch, img, kind):
        self.scratch, self.img, self.kind = scratch, img, kind
        self.proc = None
        self.logs = []
        if kind == "nbd":
            self.sock = scratch.path("far.sock")
            self.addr = f"unix:{self.sock}"
            self.uri = f"nbd+unix:///?socket={self.sock}"
        else:
            self.port = free_port()
            self.addr = f"tcp:127.0.0.1:{self.port}"
            self.uri = f"devio://127.0.0.1:{self.port}"
        scratch.cleanups.append(self.kill)

    def start(self):
        log = open(self.scratch.path(f"far{len(self.logs)}.log"), "w+")
        self.logs.append(log)
        self.scratch.cleanups.append(log.close)
        flag = "--nbd" if self.kind == "nbd" else "--devio"
        self.proc = subprocess.Popen([DEVIO, "serve", self.img, flag, self.addr], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        if self.kind == "nbd":
            wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None, 10, self.sock)
        else:
            wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 10, self.addr)
        assert self.proc.poll() is None, self.output()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.kind == "nbd" and os.path.exists(self.sock):
            os.unlink(self.sock)  # left behind by a killed server

    def output(self):
        out = ""
        for log in self.logs:
            log.seek(0)
            out += log.read()
        return out


def make_image(path, size=SIZE):
    with open(path, "wb") as f:
        f.truncate(size)


def attach(scratch, uri, timeout=30):
    """devio attach -d with a log file; returns (loop device, log path)."""
    mnt = scratch.mkdir("mnt")
    log = scratch.path("attach.log")
    r = subprocess.run([DEVIO, "attach", uri, "--fuse", mnt, "--loop", "-d", "--timeout", str(timeout),
                        "--log", log], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    scratch.cleanups.append(lambda: subprocess.run([DEVIO, "detach", mnt], capture_output=True, timeout=90))
    assert r.returncode == 0, r.stderr
    dev = r.stdout.strip()
    assert dev.startswith("/dev/loop"), r.stdout
    scratch.cleanups.append(lambda: loop_exists(dev) and subprocess.run(["losetup", "-d", dev], capture_output=True))
    return mnt, dev, log


def read_log(path):
    with open(path) as f:
        return f.read()


def fio_verify(dev, seed):
    """One fio pass: random 4 KiB writes by two jobs (each its own half),
    then every written block read back and checked."""
    r = subprocess.run(["fio", "--name=rc", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
                        "--size=8M", "--offset_increment=8M", "--numjobs=2", "--iodepth=16",
                        "--ioengine=libaio", "--direct=1", "--verify=crc32c", "--verify_fatal=1",
                        "--verify_state_save=0", f"--randseed={seed}", "--group_reporting",
                        "--output-format=json"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    assert job["read"]["io_bytes"] == 16 * MiB  # every block written was verified
    return job


def block_hashes(path, size=SIZE):
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, BLOCK):
            out.append(hashlib.sha256(os.pread(fd, BLOCK, off)).digest())
    finally:
        os.close(fd)
    return out


def restarts_during_fio(far, dev, n):
    """fio passes run back to back while the server is killed and started
    again n times; returns the fio passes' count."""
    done = threading.Event()
    failure = []

    def killer():
        try:
            rnd = random.Random(n)
            for _ in range(n):
                time.sleep(rnd.uniform(0.3, 1.2))
                far.kill()
                time.sleep(rnd.uniform(0.05, 0.5))
                far.start()
        except Exception as e:  # reported by the main thread
            failure.append(e)
        finally:
            done.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    passes = 0
    try:
        while not done.is_set() or passes == 0:
            fio_verify(dev, 1000 + passes)
            passes += 1
    finally:
        t.join(120)
    assert not failure, failure
    fio_verify(dev, 99)  # and once more with the last server
    return passes + 1


@pytest.mark.parametrize("kind", ["nbd", "devio"])
def test_restarts_under_fio_verify(scratch, kind):
    img = scratch.path("far.img")
    make_image(img)
    far = Far(scratch, img, kind)
    far.start()
    mnt, dev, log = attach(scratch, far.uri)
    try:
        passes = restarts_during_fio(far, dev, RESTARTS)
    except AssertionError as e:  # what the client and the servers said, with fio's failure
        raise AssertionError(f"{e}\n--- attach log:\n{read_log(log)}\n--- servers:\n{far.output()}") from None
    with open(dev, "rb+", buffering=0) as f:
        os.fsync(f.fileno())
    # every block of the device is the image's, read back through it (O_DIRECT: not the page cache)
    subprocess.run(["dd", f"if={dev}", f"of={scratch.path('back.img')}", "bs=1M", "iflag=direct",
                    "status=none"], check=True, timeout=120)
    assert block_hashes(scratch.path("back.img")) == block_hashes(img)
    text = read_log(log)
    assert "AddressSanitizer" not in text and "runtime error:" not in text, text
    # each loss told once and each return told once: a failure that
    # belongs to a loss already told (a pooled connection, or an attempt,
    # that began before it) is not a new one, and an answer read just
    # before a loss does not end it.  Two restarts close together may be
    # one loss (a connection to the first restarted server, dialled before
    # anyone noticed the kill, fails in the same outage): at most RESTARTS
    lost = text.count("connection lost")
    back = text.count("reconnected after")
    assert 1 <= lost <= RESTARTS and back == lost, text
    assert "error" not in text.lower().replace("errors", ""), text
    assert passes >= 2


@pytest.mark.parametrize("kind", ["nbd", "devio"])
def test_past_the_timeout_is_eio_then_back(scratch, kind):
    img = scratch.path("far.img")
    make_image(img)
    far = Far(scratch, img, kind)
    far.start()
    mnt, dev, log = attach(scratch, far.uri, timeout=2)
    data = os.urandom(BLOCK)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, BLOCK)
        buf.write(data)
        assert os.pwritev(fd, [buf], 0) == BLOCK
        far.kill()
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], FAR_OFF)
        assert e.value.errno == 5  # EIO, after the timeout, not a hang
        assert time.monotonic() - t0 < 30
        far.start()
        # back: the device works again (the client kept trying)
        wait_for(lambda: try_read(fd, buf), 20, "the device working again")
        assert buf[:BLOCK] == data
    finally:
        os.close(fd)
    text = read_log(log)
    assert "no server for 2 s" in text and "reconnected after" in text, text


def try_read(fd, buf):
    try:
        return os.preadv(fd, [buf], 0) == BLOCK
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["nbd", "devio"])
def test_server_back_with_another_size_is_refused(scratch, kind):
    img = scratch.path("far.img")
    make_image(img)
    far = Far(scratch, img, kind)
    far.start()
    mnt, dev, log = attach(scratch, far.uri, timeout=20)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, BLOCK)
        assert os.preadv(fd, [buf], 0) == BLOCK
        far.kill()
        make_image(img, 2 * SIZE)
        far.start()
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], FAR_OFF)
        assert e.value.errno == 5
        assert time.monotonic() - t0 < 15  # refused at once, not after the 20 s timeout
    finally:
        os.close(fd)
    text = read_log(log)
    assert "giving up" in text and str(2 * SIZE) in text and str(SIZE) in text, text


class OrderingServer:
    """A hand-written NBD server on a Unix socket (simple replies only):
    its first transmission connection takes one request and closes without
    answering it (a lost connection); on the next, it notes the order of
    the requests and whether a second one arrived before it answered the
    first, then answers everything."""

    def __init__(self, path, size):
        import socket
        self.size = size
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(path)
        self.ls.listen(4)
        self.ls.settimeout(30)
        self.got_first = threading.Event()
        self.second_conn = []     # (type, offset, first payload byte) in arrival order
        self.early = None         # did a request arrive before the first was answered?
        self.error = None
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def handshake(self, c):
        import struct
        c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
        self.recv(c, 4)
        while True:
            _, opt, ln = struct.unpack(">QII", self.recv(c, 16))
            self.recv(c, ln)
            if opt == 7:  # GO
                c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, 3, 12) +
                          struct.pack(">HQH", 0, self.size, 1 | 4 | 8))  # HAS_FLAGS|FLUSH|FUA
                c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, 1, 0))
                return
            c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, 0x80000001, 0))

    @staticmethod
    def recv(c, n):
        b = b""
        while len(b) < n:
            got = c.recv(n - len(b))
            if not got:
                raise EOFError
            b += got
        return b

    def request(self, c):
        import struct
        _, _, typ, cookie, off, ln = struct.unpack(">IHHQQI", self.recv(c, 28))
        data = self.recv(c, ln) if typ == 1 else b""
        return typ, cookie, off, ln, data

    def answer(self, c, typ, cookie, ln):
        import struct
        c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + (bytes(ln) if typ == 0 else b""))

    def run(self):
        import select
        try:
            c, _ = self.ls.accept()  # the near server's open
            self.handshake(c)
            self.request(c)          # the first write: never answered
            self.got_first.set()
            time.sleep(0.3)          # the second write is submitted meanwhile
            c.close()
            c, _ = self.ls.accept()  # the reconnection
            self.handshake(c)
            typ, cookie, off, ln, data = self.request(c)
            self.second_conn.append((typ, off, data[:1]))
            self.early = bool(select.select([c], [], [], 0.5)[0])
            self.answer(c, typ, cookie, ln)
            while True:
                typ, cookie, off, ln, data = self.request(c)
                if typ == 2:
                    break
                self.second_conn.append((typ, off, data[:1]))
                self.answer(c, typ, cookie, ln)
        except EOFError:
            pass
        except Exception as e:  # reported by the test
            self.error = e

    def close(self):
        self.ls.close()
        self.t.join(30)


def test_reissued_write_goes_before_a_newer_overlapping_one(serve, scratch):
    """A write in flight when the connection is lost is sent again, and a
    newer write to the same bytes (submitted while the first was in flight)
    is sent only after the reissued one is answered: it cannot be
    overtaken.  Through `devio serve nbd+unix://... --remote-timeout`."""
    import nbd
    far_sock, near_sock = scratch.path("far.sock"), scratch.path("near.sock")
    far = OrderingServer(far_sock, SIZE)
    scratch.cleanups.append(far.close)
    near = serve(f"nbd+unix:///?socket={far_sock}", "--nbd", f"unix:{near_sock}", "--remote-timeout", "30")
    near.wait_unix(near_sock)
    results = {}

    def write(name, byte):
        h = nbd.NBD()
        try:
            h.connect_unix(near_sock)
            h.pwrite(bytes([byte]) * BLOCK, 0)
            results[name] = "ok"
            h.shutdown()
        except Exception as e:
            results[name] = repr(e)

    older = threading.Thread(target=write, args=("older", 0xAA))
    older.start()
    assert far.got_first.wait(20)
    newer = threading.Thread(target=write, args=("newer", 0xBB))
    newer.start()
    older.join(60)
    newer.join(60)
    assert far.error is None, far.error
    assert results == {"older": "ok", "newer": "ok"}, results
    writes = [(off, b) for typ, off, b in far.second_conn if typ == 1]
    assert writes[:2] == [(0, b"\xaa"), (0, b"\xbb")], far.second_conn
    assert far.early is False  # the newer write waited for the reissued one's answer
    near.stop()
    assert "reconnected after" in near.stderr()


class CrashLoopServer(OrderingServer):
    """A hand-written NBD server that accepts every connection and drops
    it, unanswered, at the first request it reads: a server that crashes
    on what is sent to it, restarted at once, over and over."""

    def __init__(self, path, size):
        self.connections = 0
        self.stopping = False
        super().__init__(path, size)

    def run(self):
        import socket
        self.ls.settimeout(0.5)  # a blocked accept() does not see close(): look at stopping
        try:
            while not self.stopping:
                try:
                    c, _ = self.ls.accept()
                except socket.timeout:
                    continue
                c.settimeout(30)
                self.connections += 1
                try:
                    self.handshake(c)
                    self.request(c)
                except EOFError:
                    pass
                c.close()
        except OSError:
            pass  # closed by the test

    def close(self):
        self.stopping = True
        super().close()


def test_a_server_lost_again_during_the_replay_still_times_out(serve, scratch):
    """The wait is counted from the first loss: a connection lost again
    before what was sent again is answered does not start the timeout
    anew (it used to: the request waited for ever)."""
    import nbd
    far_sock, near_sock = scratch.path("far.sock"), scratch.path("near.sock")
    far = CrashLoopServer(far_sock, SIZE)
    scratch.cleanups.append(far.close)
    near = serve(f"nbd+unix:///?socket={far_sock}", "--nbd", f"unix:{near_sock}", "--remote-timeout", "2")
    near.wait_unix(near_sock)
    h = nbd.NBD()
    h.connect_unix(near_sock)
    outcome = []

    def write():
        try:
            h.pwrite(b"\xcc" * BLOCK, 0)
            outcome.append("ok")
        except nbd.Error as e:
            outcome.append(e)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(30)
    waited = t.is_alive()
    near.stop()  # ends a write still waiting, so that a regression fails instead of hanging
    t.join(30)
    assert not waited, "the write waited past the timeout: " + near.stderr()[-2000:]
    assert outcome and isinstance(outcome[0], nbd.Error), outcome
    assert far.connections >= 3  # lost, reconnected and lost again, more than once
    text = near.stderr()
    before_stop = text.split("stopping")[0]  # (its flush at exit meets the server once more)
    assert "no server for 2 s (it closes the connection before answering)" in before_stop, text
    assert before_stop.count("connection lost") == 1, text  # one loss, told once
    assert before_stop.count("reconnected after") == 1, text  # and its return once
    # the redials back off: not thousands of connections in those seconds
    assert far.connections < 40, far.connections
