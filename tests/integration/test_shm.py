"""test_shm.py - the shared-memory transport (--devio shm:NAME, devio+shm://):
client commands, re-export over NBD to qemu-img and nbdcopy, ext4 through
`attach --fuse --loop`, a client killed mid-stream, a hostile client that
writes garbage into its region (an independent Python client written from
docs/shm.md), and ImDisk's command line form."""
import itertools
import mmap
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time

import pytest

from conftest import DEVIO, Server, run_ok, wait_for
from test_attach import attach
from test_fuse import MiB, Scratch, is_mounted, lazy_umount, loop_exists, run

_names = itertools.count()


@pytest.fixture
def scratch():
    s = Scratch()
    yield s
    s.close()


def shm_name():
    return f"pytest-{os.getpid()}-{next(_names)}"


def shm_path(name):
    if name.startswith("/"):
        return name
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = "/run/devio" if os.geteuid() == 0 or not xdg else xdg + "/devio"
    return f"{base}/shm/{name}"


def start_shm(serve, source, name, *extra, opts=""):
    s = serve(source, "--devio", f"shm:{name}{opts}", *extra)
    s.wait_unix(shm_path(name))
    return s


def random_image(path, size):
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# ---- client commands ----

def test_info_cat_write_copy(serve, scratch):
    img = scratch.path("img")
    data = bytearray(random_image(img, 8 * MiB))
    name = shm_name()
    old = os.umask(0)  # the socket must be 0600 whatever the umask
    try:
        s = start_shm(serve, img, name)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(shm_path(name)).st_mode) == 0o600
    uri = "devio+shm://" + name
    info = run_ok(DEVIO, "info", uri)
    assert "size: 8388608" in info and "trim" in info, info
    out = subprocess.run([DEVIO, "cat", uri], capture_output=True, timeout=60, check=True).stdout
    assert out == bytes(data)
    part = subprocess.run([DEVIO, "cat", uri, "--offset", "4097", "--length", "3000000"],
                          capture_output=True, timeout=60, check=True).stdout
    assert part == bytes(data[4097:4097 + 3000000])
    new = os.urandom(3 * MiB + 123)
    subprocess.run([DEVIO, "write", uri, "--offset", "1000001"], input=new, capture_output=True,
                   timeout=60, check=True)
    data[1000001:1000001 + len(new)] = new
    assert read_file(img) == bytes(data)
    dst = scratch.path("copy")
    with open(dst, "wb") as f:
        f.truncate(8 * MiB)
    run_ok(DEVIO, "copy", uri, dst)
    assert read_file(dst) == bytes(data)
    assert s.stop() == 0, s.stderr()
    assert not os.path.exists(shm_path(name))


def test_one_slot(serve, scratch):
    """slots=1 (ImDisk's one request at a time) with a small buffer: a large
    read is split into pieces."""
    img = scratch.path("img")
    data = random_image(img, 4 * MiB)
    name = scratch.path("sock")  # an absolute path names the socket itself
    start_shm(serve, img, name, opts=",slots=1,buffer=64K")
    uri = "devio+shm://" + name
    assert "1 slots of 65536" in run_ok(DEVIO, "info", uri)
    out = subprocess.run([DEVIO, "cat", uri], capture_output=True, timeout=60, check=True).stdout
    assert out == data
    out = subprocess.run([DEVIO, "cat", uri, "--offset", "1M", "--length", "1M"], capture_output=True,
                         timeout=60, check=True).stdout
    assert out == data[MiB:2 * MiB]


def test_readonly_export(serve, scratch):
    img = scratch.path("img")
    data = random_image(img, MiB)
    name = shm_name()
    start_shm(serve, img, name, "-r")
    uri = "devio+shm://" + name
    assert "read-only" in run_ok(DEVIO, "info", uri) or "readonly" in run_ok(DEVIO, "info", uri)
    r = subprocess.run([DEVIO, "write", uri], input=b"x" * 4096, capture_output=True, timeout=60)
    assert r.returncode != 0
    assert read_file(img) == data


# ---- re-export to real NBD peers, requests in flight ----

def test_reexport_nbd_parallel(serve, scratch):
    if not shutil.which("qemu-img") or not shutil.which("nbdcopy"):
        pytest.skip("qemu-img/nbdcopy not installed")
    img = scratch.path("img")
    random_image(img, 32 * MiB)
    name = shm_name()
    start_shm(serve, img, name, opts=",slots=8,buffer=256K")
    sock = scratch.path("nbd.sock")
    r = serve("devio+shm://" + name, "--nbd", "unix:" + sock)
    r.wait_unix(sock)
    uri = f"nbd+unix:///?socket={sock}"
    # writes: nbdcopy with 16 requests in flight, from a fresh random source
    src = scratch.path("src")
    want = random_image(src, 32 * MiB)
    subprocess.run(["nbdcopy", "--requests=16", "--connections=1", src, uri], check=True, timeout=120)
    assert read_file(img) == want
    # reads: qemu-img with 8 coroutines, and nbdcopy
    out = scratch.path("out.raw")
    run_ok("qemu-img", "convert", "-m", "8", "-f", "raw", "-O", "raw", uri, out)
    assert read_file(out) == want
    out2 = scratch.path("out2.raw")
    subprocess.run(["nbdcopy", "--requests=32", uri, out2], check=True, timeout=120)
    assert read_file(out2) == want
    assert r.stop() == 0, r.stderr()


def test_attach_ext4_round_trip(serve, scratch):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0 or not shutil.which("debugfs"):
        pytest.skip("needs root, /dev/fuse and e2fsprogs")
    img = scratch.path("img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    name = shm_name()
    s = start_shm(serve, img, name)
    mnt, dev = attach(scratch, "devio+shm://" + name)
    run("mkfs.ext4", "-q", "-E", "nodiscard", dev)
    fsmnt = scratch.mkdir("fs")
    run("mount", dev, fsmnt)
    scratch.cleanups.append(lambda: lazy_umount(fsmnt))
    files = {f"f{i}": os.urandom(200_000 + i * 4099) for i in range(8)}
    for n, d in files.items():
        with open(os.path.join(fsmnt, n), "wb") as f:
            f.write(d)
    run("umount", fsmnt)
    run(DEVIO, "detach", mnt, timeout=60)
    wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")
    assert s.stop() == 0, s.stderr()
    run("e2fsck", "-fn", img)
    for n, d in files.items():
        got = subprocess.run(["debugfs", "-R", f"cat /{n}", img], capture_output=True, timeout=60).stdout
        assert got == d, n


# ---- a client killed mid-stream ----

def regions(pid):
    """How many shared-memory regions the server has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:devio-shm" in line for line in f)


def test_client_killed_mid_stream(serve, scratch):
    name = shm_name()
    s = start_shm(serve, "ram:1G", name)
    uri = "devio+shm://" + name
    for i in range(2):
        p = subprocess.Popen([DEVIO, "cat", uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: s.stderr().count("client connected") > i or p.poll() is not None, 10, "a client")
            time.sleep(0.1)
        finally:
            p.kill()
            p.wait()
    wait_for(lambda: s.stderr().count("session ended") >= 2, 10, "both sessions to end")
    # the regions are gone with them, the server is alive, and a new client is served
    assert s.proc.poll() is None
    assert regions(s.proc.pid) == 0
    new = os.urandom(MiB)
    subprocess.run([DEVIO, "write", uri, "--offset", "5M"], input=new, capture_output=True, timeout=60, check=True)
    out = subprocess.run([DEVIO, "cat", uri, "--offset", "5M", "--length", "1M"], capture_output=True,
                         timeout=60, check=True).stdout
    assert out == new
    assert s.stop() == 0, s.stderr()


# ---- an independent Python client, and a hostile one ----

HDR = 4096
CTL_SQ_TAIL, CTL_SQ_WAKE, CTL_CQ_TAIL, CTL_CQ_WAKE, CTL_RINGS = 64, 128, 192, 256, 512


class PyClient:
    """The client side of docs/shm.md: hello, memfd, doorbells, rings."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        msg, fds, _, _ = socket.recv_fds(self.sock, 128, 4)
        w = struct.unpack("<16Q", msg)
        assert w[0] == 0x4d48534f49564544 and w[1] == 1 and w[2] == 0, w
        self.nslots, self.data, self.size, self.file_size = w[3], w[4], w[5], w[6]
        assert len(fds) == 3
        self.memfd, self.req_efd, self.resp_efd = fds
        self.m = mmap.mmap(self.memfd, self.size)
        self.ctl = self.nslots * (HDR + self.data)
        self.cap = 1
        while self.cap < self.nslots:
            self.cap *= 2
        self.sq_tail = self.cq_head = 0
        self.put32(CTL_CQ_WAKE, 1)  # always ring us

    def close(self):
        self.m.close()
        for fd in (self.memfd, self.req_efd, self.resp_efd):
            os.close(fd)
        self.sock.close()

    def put32(self, off, v):
        struct.pack_into("<I", self.m, self.ctl + off, v)

    def get32(self, off):
        return struct.unpack_from("<I", self.m, self.ctl + off)[0]

    def slot(self, tag):
        return tag * (HDR + self.data)

    def header(self, tag, *words):
        struct.pack_into(f"<{len(words)}Q", self.m, self.slot(tag), *words)

    def words(self, tag, n):
        return struct.unpack_from(f"<{n}Q", self.m, self.slot(tag))

    def push(self, *tags):
        for t in tags:
            struct.pack_into("<I", self.m, self.ctl + CTL_RINGS + 4 * (self.sq_tail % self.cap), t)
            self.sq_tail = (self.sq_tail + 1) & 0xffffffff
        self.put32(CTL_SQ_TAIL, self.sq_tail)
        os.write(self.req_efd, struct.pack("<Q", 1))

    def reap(self, n, timeout=10):
        """The next n completed tags."""
        got = []
        end = time.monotonic() + timeout
        while len(got) < n:
            while self.cq_head != self.get32(CTL_CQ_TAIL) and len(got) < n:
                off = CTL_RINGS + 4 * (self.cap + self.cq_head % self.cap)
                got.append(self.get32(off))
                self.cq_head = (self.cq_head + 1) & 0xffffffff
            if len(got) < n:
                assert time.monotonic() < end, "no completion"
                select.select([self.resp_efd], [], [], 0.05)
        return got

    def request(self, tag, *words, n_answer=2):
        self.header(tag, *words)
        self.push(tag)
        assert self.reap(1) == [tag]
        return self.words(tag, n_answer)

    def dropped(self, timeout=10):
        """The server closed our socket."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if r:
                try:
                    return self.sock.recv(1) == b""
                except ConnectionResetError:
                    return True
        return False


def test_python_client_and_errors(serve, scratch):
    """Good requests, then bad lengths, offsets past the end, bad range
    arrays and unknown codes: each answered with an error in its slot."""
    img = scratch.path("img")
    data = random_image(img, MiB)
    name = shm_name()
    s = start_shm(serve, img, name, opts=",slots=4,buffer=64K")
    c = PyClient(shm_path(name))
    try:
        assert c.request(0, 1, n_answer=3) == (MiB, 1, 0x06)  # INFO: unmap + zero
        assert c.request(1, 2, 4096, 100) == (0, 100)  # READ
        assert c.m[c.slot(1) + HDR:c.slot(1) + HDR + 100] == data[4096:4196]
        c.m[c.slot(2) + HDR:c.slot(2) + HDR + 5] = b"hello"
        assert c.request(2, 3, 7, 5) == (0, 5)  # WRITE
        assert read_file(img)[7:12] == b"hello"
        assert c.request(3, 2, MiB - 10, 100) == (0, 10)  # short read at the end
        assert c.request(0, 2, 0, 64 * 1024 + 1)[0] == 7  # E2BIG: over the slot
        assert c.request(0, 2, MiB + 1, 1)[0] == 22  # EINVAL: past the end
        assert c.request(0, 3, MiB - 1, 2)[0] == 28  # ENOSPC
        assert c.request(0, 3, 2 ** 64 - 1, 2)[0] == 28  # offset + length overflows
        assert c.request(0, 6, 17)[0] == 22  # UNMAP array not a multiple of 16
        assert c.request(0, 7, 2 ** 40)[0] == 22  # ZERO array beyond the slot
        struct.pack_into("<2Q", c.m, c.slot(1) + HDR, 2 ** 63, 5)
        assert c.request(1, 7, 16)[0] == 22  # negative range start
        data = read_file(img)
        struct.pack_into("<4Q", c.m, c.slot(1) + HDR, 0, 4096, MiB - 1, 2)
        assert c.request(1, 7, 32)[0] == 22  # one of two ranges out of range: nothing runs
        assert read_file(img) == data
        assert c.request(2, 99)[0] == 19  # ENODEV
        # several requests in flight, one doorbell
        for t in range(4):
            c.header(t, 2, t * 4096, 4096)
        c.push(0, 1, 2, 3)
        assert sorted(c.reap(4)) == [0, 1, 2, 3]
        for t in range(4):
            assert c.words(t, 2) == (0, 4096)
    finally:
        c.close()
    assert s.proc.poll() is None
    assert "AddressSanitizer" not in s.stderr()


@pytest.mark.parametrize("attack", ["tag_out_of_range", "tail_ahead", "bad_headers", "garbage", "socket_bytes"])
def test_hostile_client_is_dropped_server_stays_up(serve, scratch, attack):
    name = shm_name()
    s = start_shm(serve, "ram:16M", name, opts=",slots=4,buffer=64K")
    uri = "devio+shm://" + name
    c = PyClient(shm_path(name))
    try:
        if attack == "tag_out_of_range":
            c.push(4)
        elif attack == "bad_headers":
            # random headers in valid slots: each is answered (mostly errors)
            for t in range(4):
                c.m[c.slot(t):c.slot(t) + 64] = os.urandom(64)
            c.push(0, 1, 2, 3)
            assert sorted(c.reap(4)) == [0, 1, 2, 3]
        elif attack == "tail_ahead":
            c.put32(CTL_SQ_TAIL, 1000)
            os.write(c.req_efd, struct.pack("<Q", 1))
        elif attack == "garbage":
            junk = os.urandom(c.size)
            c.m[:] = junk
            os.write(c.req_efd, struct.pack("<Q", 1))
        else:
            c.sock.send(b"x")
        if attack not in ("garbage", "bad_headers"):
            assert c.dropped(), "the server kept a client that broke the ring"
        else:
            c.dropped(2)  # random rings are dropped, or answered with errors
    finally:
        c.close()
    # the server is up and serves the next client
    assert s.proc.poll() is None
    assert "size: 16777216" in run_ok(DEVIO, "info", uri)
    assert s.stop() == 0, s.stderr()


def test_many_clients_own_regions_and_refusal(serve, scratch):
    """Each client has a region of its own; past 16 at once, a clear refusal."""
    name = shm_name()
    s = start_shm(serve, "ram:1M", name, opts=",slots=1,buffer=4K")
    clients = []
    try:
        for _ in range(16):
            clients.append(PyClient(shm_path(name)))
        assert clients[0].request(0, 2, 0, 8) == (0, 8)
        r = subprocess.run([DEVIO, "info", "devio+shm://" + name], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "refuses" in r.stderr, r.stderr
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: subprocess.run([DEVIO, "info", "devio+shm://" + name], capture_output=True,
                                    timeout=30).returncode == 0, 10, "a free region")
    assert s.stop() == 0, s.stderr()


# ---- ImDisk's command line ----

def test_imdisk_command_line(scratch):
    img = scratch.path("img")
    data = random_image(img, 2 * MiB)
    name = shm_name()
    log = open(scratch.path("log"), "w")
    scratch.cleanups.append(log.close)
    p = subprocess.Popen([DEVIO, f"shm:{name}", img], stdout=log, stderr=log, start_new_session=True)

    def stop():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    scratch.cleanups.append(stop)
    wait_for(lambda: os.path.exists(shm_path(name)) or p.poll() is not None, 10, "the socket")
    uri = "devio+shm://" + name
    assert "size: 2097152" in run_ok(DEVIO, "info", uri)
    out = subprocess.run([DEVIO, "cat", uri], capture_output=True, timeout=60, check=True).stdout
    assert out == data
    stop()
    assert p.returncode == 0
    assert not os.path.exists(shm_path(name))


def test_bad_names_refused(serve, scratch):
    for bad in ["shm:", "shm:a/b", "shm:..", "shm:x,slots=0", "shm:x,slots=2000", "shm:x,buffer=1000"]:
        r = subprocess.run([DEVIO, "serve", "ram:1M", "--devio", bad], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, bad
    r = subprocess.run([DEVIO, "info", "devio+shm://nobody-listens-here"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "cannot connect" in r.stderr


# ---- a hostile or vanishing server, for the client ----

class FakeServer:
    """One connection, handed a sealed region of 2 slots of 4 KiB; then
    `mode` decides what it does with the client's first request."""

    def __init__(self, path, mode):
        import fcntl
        import threading
        self.path, self.mode = path, mode
        self.nslots, self.data = 2, 4096
        self.ctl = self.nslots * (HDR + self.data)
        self.size = self.ctl + 4096
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.memfd = os.memfd_create("fake", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, self.size)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.m = mmap.mmap(self.memfd, self.size)
        self.req_efd, self.resp_efd = os.eventfd(0), os.eventfd(0)
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        self.lsock.settimeout(30)
        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        hello = [0x4d48534f49564544, 1, 0, self.nslots, self.data, self.size, 1 << 20, 1, 0x06, 0] + [0] * 6
        socket.send_fds(conn, [struct.pack("<16Q", *hello)], [self.memfd, self.req_efd, self.resp_efd])
        get32 = lambda off: struct.unpack_from("<I", self.m, self.ctl + off)[0]
        while not self.stop and get32(CTL_SQ_TAIL) == 0:
            time.sleep(0.01)
        tag = struct.unpack_from("<I", self.m, self.ctl + CTL_RINGS)[0]
        if self.mode == "die":
            conn.close()
            return
        if self.mode in ("bad_tag", "short"):
            if self.mode == "short":
                struct.pack_into("<2Q", self.m, tag * (HDR + self.data), 0, 1)
            cq = CTL_RINGS + 4 * 2  # the ring capacity is 2
            struct.pack_into("<I", self.m, self.ctl + cq, 99 if self.mode == "bad_tag" else tag)
            struct.pack_into("<I", self.m, self.ctl + CTL_CQ_TAIL, 1)
            os.write(self.resp_efd, struct.pack("<Q", 1))
        while not self.stop:  # "silent": hold the request
            time.sleep(0.05)
        conn.close()

    def close(self):
        self.stop = True
        self.thread.join(10)
        self.lsock.close()
        self.m.close()
        for fd in (self.memfd, self.req_efd, self.resp_efd):
            os.close(fd)


@pytest.mark.parametrize("mode,message", [("silent", "timed out"), ("die", "lost"),
                                          ("bad_tag", "not in flight"), ("short", "answered 1 of")])
def test_client_survives_bad_server(scratch, mode, message):
    path = scratch.path("fake.sock")
    srv = FakeServer(path, mode)
    scratch.cleanups.append(srv.close)
    env = dict(os.environ, DEVIO_REMOTE_TIMEOUT="2")
    start = time.monotonic()
    r = subprocess.run([DEVIO, "cat", "devio+shm://" + path, "--length", "4096"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert time.monotonic() - start < 50
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr


def test_second_server_on_a_name_refused(serve, scratch):
    """As ImDisk's NAME_Server mutex does: a name in use is not taken over."""
    name = shm_name()
    s = start_shm(serve, "ram:1M", name)
    r = subprocess.run([DEVIO, "serve", "ram:2M", "--devio", f"shm:{name}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "already listens" in r.stderr, r.stderr
    assert "size: 1048576" in run_ok(DEVIO, "info", "devio+shm://" + name)
    assert s.stop() == 0, s.stderr()


def test_chain_through_pool_and_submit(serve, scratch):
    """shm in front of a remote devio server (the core puts its requests on
    the worker pool) and shm in front of shm (the backend's own submit)."""
    img = scratch.path("img")
    data = bytearray(random_image(img, 4 * MiB))
    sock = scratch.path("stream.sock")
    serve(img, "--devio", "unix:" + sock).wait_unix(sock)
    a, b = shm_name(), shm_name()
    start_shm(serve, "devio+unix://" + sock, a)
    start_shm(serve, "devio+shm://" + a, b, opts=",slots=8,buffer=128K")
    uri = "devio+shm://" + b
    new = os.urandom(MiB + 4097)
    subprocess.run([DEVIO, "write", uri, "--offset", "12345"], input=new, capture_output=True, timeout=60,
                   check=True)
    data[12345:12345 + len(new)] = new
    out = subprocess.run([DEVIO, "cat", uri], capture_output=True, timeout=60, check=True).stdout
    assert out == bytes(data)
    assert read_file(img) == bytes(data)


def test_stop_with_a_client_connected(serve, scratch):
    name = shm_name()
    s = start_shm(serve, "ram:1M", name, opts=",slots=2,buffer=4K")
    c = PyClient(shm_path(name))
    try:
        assert c.request(0, 2, 0, 16) == (0, 16)
        assert regions(s.proc.pid) == 1
        assert s.stop() == 0, s.stderr()
        assert c.dropped()
    finally:
        c.close()
    assert not os.path.exists(shm_path(name))
