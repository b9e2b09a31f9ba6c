"""test_nbd.py - the --nbd front end against real NBD peers: nbdinfo,
qemu-io, qemu-img, nbdcopy, nbdsh (libnbd) and fio's nbd engine, plus raw
sockets for malformed handshakes and clients that vanish mid-flight."""
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from conftest import free_port

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x0003E889045565A9
REP_ACK = 1
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TOO_BIG = (1 << 31) + 9
MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-nbd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(*args, timeout=120, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def serve_unix(serve, tmp, source, *extra):
    sock = os.path.join(tmp, "nbd.sock")
    srv = serve(source, "--nbd", f"unix:{sock}", *extra)
    srv.wait_unix(sock)
    return srv, sock


def uri(sock, export=""):
    return f"nbd+unix:///{export}?socket={sock}"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def make_image(path, size, seed=1):
    """A file of size bytes: pseudo-random data with some zero stretches."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            n = min(64 * 1024, size - pos)
            if (pos // (64 * 1024)) % 3 == 1:
                f.write(bytes(n))
            else:
                f.write((rnd * (n // len(rnd) + 1))[:n])
            pos += n


def nbdsh(u, script):
    # nbdsh runs "python3 -m nbd": make that the system Python, which has libnbd
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    return run("nbdsh", "--base-allocation", "--connect", u, "-c", script, timeout=60, env=env)


# ---- nbdinfo ----

def test_nbdinfo_json_reports_size_and_flags(serve, tmp):
    _, sock = serve_unix(serve, tmp, "ram:64M")
    info = json.loads(run("nbdinfo", "--json", uri(sock)).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    e = info["exports"][0]
    assert e["export-size"] == 64 * MiB
    assert e["is_read_only"] is False
    assert e["can_trim"] is True and e["can_zero"] is True and e["can_df"] is True
    assert "base:allocation" in e["contexts"]
    assert e["block_size_minimum"] == 1 and e["block_size_maximum"] >= MiB


def test_nbdinfo_read_only_file(serve, tmp):
    img = os.path.join(tmp, "disk.img")
    make_image(img, 3 * MiB + 512)
    _, sock = serve_unix(serve, tmp, img, "-r")
    e = json.loads(run("nbdinfo", "--json", uri(sock)).stdout)["exports"][0]
    assert e["export-size"] == 3 * MiB + 512
    assert e["is_read_only"] is True
    assert e["can_trim"] is False and e["can_zero"] is False


def test_nbdinfo_list_named_exports(serve, tmp):
    img = os.path.join(tmp, "a.img")
    make_image(img, MiB)
    _, sock = serve_unix(serve, tmp, "ram:8M", "--export", "second=ram:2M", "--export", f"file={img}")
    info = json.loads(run("nbdinfo", "--json", "--list", uri(sock)).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in info["exports"]}
    assert sizes == {"": 8 * MiB, "second": 2 * MiB, "file": MiB}
    # each is reachable by its name; an unknown name is refused
    assert run("nbdinfo", "--size", uri(sock, "second")).stdout.strip() == str(2 * MiB)
    r = run("nbdinfo", "--size", uri(sock, "nosuch"), check=False)
    assert r.returncode != 0


def map_of(u):
    out = json.loads(run("nbdinfo", "--map", "--json", u).stdout)
    return [(m["offset"], m["length"], m["type"]) for m in out]


@pytest.mark.parametrize("kind", ["ram", "file"])
def test_map_shows_holes_after_trim(serve, tmp, kind):
    if kind == "ram":
        source = "ram:16M"
    else:
        source = os.path.join(tmp, "sparse.img")
        with open(source, "wb") as f:
            f.truncate(16 * MiB)
    _, sock = serve_unix(serve, tmp, source)
    u = uri(sock)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8M", u)
    before = map_of(u)
    assert before[0][0] == 0 and before[0][1] >= 8 * MiB and before[0][2] & 1 == 0  # data
    run("qemu-io", "-f", "raw", "-c", "discard 1M 4M", u)
    after = map_of(u)
    holes = [(o, n) for o, n, t in after if t & 1]
    # the trimmed range is reported as a hole now, and reads back as zeroes
    assert any(o <= 1 * MiB and o + n >= 5 * MiB for o, n in holes), after
    run("qemu-io", "-f", "raw", "-c", "read -P 0 1M 4M", "-c", "read -P 0x5a 0 1M",
        "-c", "read -P 0x5a 5M 3M", u)


# ---- qemu-io and qemu-img ----

def test_qemu_io_unaligned_and_end_boundaries(serve, tmp):
    size = 4 * MiB + 1536  # not a multiple of 4K
    img = os.path.join(tmp, "odd.img")
    with open(img, "wb") as f:
        f.truncate(size)
    _, sock = serve_unix(serve, tmp, img)
    u = uri(sock)
    end = size - 1000
    run("qemu-io", "-f", "raw",
        "-c", "write -P 0x11 1 4095",
        "-c", "write -P 0x22 4096 70001",
        "-c", f"write -P 0x33 {end} 1000",
        "-c", "write -z 100000 12345",
        "-c", "discard 2M 1M", u)
    r = run("qemu-io", "-f", "raw",
            "-c", "read -P 0 0 1",
            "-c", "read -P 0x11 1 4095",
            "-c", "read -P 0x22 4096 70001",
            "-c", "read -P 0 100000 12345",
            "-c", f"read -P 0x33 {end} 1000", u)
    assert "Pattern verification failed" not in r.stdout + r.stderr
    # reading or writing past the end fails cleanly
    r = run("qemu-io", "-f", "raw", "-c", f"read {size - 512} 1024", u, check=False)
    assert "error" in (r.stdout + r.stderr).lower() or r.returncode != 0
    with open(img, "rb") as f:
        data = f.read()
    assert data[1:4096] == b"\x11" * 4095
    assert data[4096:4096 + 70001] == b"\x22" * 70001
    assert data[end:] == b"\x33" * 1000


def test_qemu_img_convert_and_compare_both_ways(serve, tmp):
    src = os.path.join(tmp, "src.img")
    make_image(src, 6 * MiB + 4096, seed=7)
    _, sock = serve_unix(serve, tmp, "ram:8M")
    u = uri(sock)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, u)
    # the RAM disk is 8M; compare the first part, then the rest must be zero
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, u)  # larger target: zero tail allowed
    back = os.path.join(tmp, "back.img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", u, back)
    assert os.path.getsize(back) == 8 * MiB
    with open(back, "rb") as f:
        data = f.read()
    with open(src, "rb") as f:
        orig = f.read()
    assert data[:len(orig)] == orig and data[len(orig):] == bytes(len(data) - len(orig))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", u, back)


def test_nbdcopy_round_trip(serve, tmp):
    src = os.path.join(tmp, "src.img")
    make_image(src, 16 * MiB, seed=3)
    _, sock = serve_unix(serve, tmp, "ram:16M")
    run("nbdcopy", "--requests=32", "--connections=2", src, uri(sock))
    back = os.path.join(tmp, "back.img")
    run("nbdcopy", uri(sock), back)
    assert sha256(back) == sha256(src)


# ---- nbdsh edge cases ----

def test_nbdsh_out_of_range_and_over_max(serve, tmp):
    _, sock = serve_unix(serve, tmp, "ram:1M")
    nbdsh(uri(sock), """
import errno
h.set_strict_mode(0)   # let the server judge the requests
def fails(f, err):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == err, (e, err)
        return
    raise AssertionError("no error")
size = h.get_size()
fails(lambda: h.pread(4096, size - 512), errno.EINVAL)
fails(lambda: h.pread(1, size), errno.EINVAL)
fails(lambda: h.pwrite(b"x" * 4096, size - 512), errno.ENOSPC)
fails(lambda: h.zero(4096, size), errno.ENOSPC)
fails(lambda: h.trim(4096, 2**63), errno.EINVAL)
fails(lambda: h.block_status(1024, size, lambda *a: 0), errno.EINVAL)
mx = h.get_block_size(nbd.SIZE_MAXIMUM)
fails(lambda: h.pread(mx + 4096, 0), errno.EOVERFLOW)
fails(lambda: h.pwrite(b"y" * (mx + 4096), 0), errno.EOVERFLOW)
# the connection is still good after all of that
h.pwrite(b"z" * 1000, size - 1000)
assert h.pread(1000, size - 1000) == b"z" * 1000
assert h.pread(0, size) == b""
""")


def test_nbdsh_read_only_is_eperm(serve, tmp):
    _, sock = serve_unix(serve, tmp, "ram:1M", "-r")
    nbdsh(uri(sock), """
import errno
assert h.is_read_only()
h.set_strict_mode(0)
for f in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        f()
        raise AssertionError("write succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
assert h.pread(512, 0) == bytes(512)
""")


def test_nbdsh_flags_block_status_and_hole_chunks(serve, tmp):
    _, sock = serve_unix(serve, tmp, "ram:4M")
    nbdsh(uri(sock), """
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert not h.is_read_only() and h.can_trim() and h.can_zero() and h.can_df()
h.pwrite(b"\\xab" * 8192, 65536)
h.pwrite(b"\\xcd" * 100, 1 << 20)
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status, bytes(buf[:1])))
    return 0
h.pread_structured(4 * 65536, 0, chunk)
holes = [c for c in chunks if c[2] == nbd.READ_HOLE]
data = [c for c in chunks if c[2] == nbd.READ_DATA]
assert holes and data, chunks
assert sum(c[1] for c in chunks) == 4 * 65536
assert any(o <= 65536 and o + n >= 65536 + 8192 and b == b"\\xab" for o, n, s, b in data), chunks
# DF: one data chunk with the zeroes present
chunks.clear()
h.pread_structured(4 * 65536, 0, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA and chunks[0][1] == 4 * 65536
# RAM reads go out from the disk's memory in place: more runs of data and
# holes than one reply takes (every other 64 KiB chunk of 2.5 MiB written),
# and DF over written data
base = 3 << 19
for k in range(20):
    h.pwrite(bytes([k + 1]) * 65536, base + 2 * k * 65536)
want = b"".join(bytes([k + 1]) * 65536 + bytes(65536) for k in range(20))
assert h.pread(40 * 65536, base) == want
chunks.clear()
h.pread_structured(40 * 65536, base, chunk)
assert sum(c[1] for c in chunks) == 40 * 65536
chunks.clear()
h.pread_structured(65536 - 7, base + 7, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(base + 7, 65536 - 7, nbd.READ_DATA, b"\x01")], chunks
# block status: data at 64K..72K, hole,zero around it; REQ_ONE gives one extent
ext = []
h.block_status(2 << 20, 0, lambda ctx, off, e, err: ext.append((ctx, list(e))) or 0)
ctx, e = ext[0]
assert ctx == "base:allocation"
pairs = list(zip(e[0::2], e[1::2]))
assert sum(n for n, f in pairs) <= 2 << 20
pos = 0
for n, f in pairs:
    if pos <= 65536 < pos + n:
        assert f & 1 == 0, pairs  # allocated
    pos += n
assert pairs[0][1] & 3 == 3, pairs  # starts with a hole that reads as zeroes
ext.clear()
h.block_status(2 << 20, 0, lambda ctx, off, e, err: ext.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
assert len(ext[0]) == 2
h.zero(8192, 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 65536) == bytes(8192)
h.trim(4096, 1 << 20)
h.flush() if h.can_flush() else None
""")


def test_simple_replies_without_structured(serve, tmp):
    """A client that never asks for structured replies gets simple ones."""
    _, sock = serve_unix(serve, tmp, "ram:1M")
    script = """
import nbd, sys
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
h.pwrite(b"q" * 3000, 5)
assert h.pread(3000, 5) == b"q" * 3000
h.set_strict_mode(0)
try:
    h.pread(10, 1 << 20)
    raise AssertionError("read past the end worked")
except nbd.Error as e:
    assert e.errnum == 22
assert h.pread(10, 0) == bytes(5) + b"q" * 5
h.shutdown()
"""
    run("/usr/bin/python3", "-c", script, uri(sock))


# ---- fio ----

def test_fio_verify_two_connections_qd32(serve, tmp):
    if run("fio", "--enghelp", check=False).stdout.find("nbd") < 0:
        pytest.skip("fio without the nbd engine")
    _, sock = serve_unix(serve, tmp, "ram:64M")
    r = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri(sock)}", "--rw=randwrite",
            "--bs=4k", "--size=16M", "--iodepth=32", "--numjobs=2", "--offset_increment=32M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting",
            "--verify_state_save=0", "--output-format=json", timeout=300, cwd=tmp)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 2 * 16 * MiB
    assert job["read"]["io_bytes"] == 2 * 16 * MiB  # the verify pass read it all back


def test_tcp_listener(serve, tmp):
    port = free_port()
    srv = serve("ram:2M", "--nbd", f"tcp:127.0.0.1:{port}")
    srv.wait_tcp(port)
    u = f"nbd://127.0.0.1:{port}/"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", u)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x77 0 1M", u)


# ---- bad input on raw sockets ----

class Raw:
    def __init__(self, sock_path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(sock_path)
        magic, opts, flags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opts == IHAVEOPT and flags & 1

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            b = self.s.recv(n - len(buf))
            if not b:
                raise EOFError
            buf += b
        return buf

    def option(self, opt, data=b"", length=None):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data)

    def reply(self):
        magic, opt, typ, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPMAGIC
        return opt, typ, self.recv(length)

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.s.close()


def still_serving(sock):
    return run("nbdinfo", "--size", uri(sock)).stdout.strip()


def test_handshake_bad_input(serve, tmp):
    srv, sock = serve_unix(serve, tmp, "ram:1M")
    r = Raw(sock)
    try:
        r.s.sendall(struct.pack(">I", 3))  # fixed newstyle + no zeroes
        r.option(0x7777, b"abc")                       # unknown option
        assert r.reply()[1] == REP_ERR_UNSUP
        r.option(5)                                    # STARTTLS: refused, no TLS here
        assert r.reply()[1] == REP_ERR_UNSUP
        r.option(3, b"x")                              # LIST with data is invalid
        assert r.reply()[1] == REP_ERR_INVALID
        r.option(7, struct.pack(">I", 100) + b"short")  # GO with a lying name length
        assert r.reply()[1] == REP_ERR_INVALID
        r.option(10, b"\0\0\0\0\0\0\0\0")              # SET_META_CONTEXT before structured
        assert r.reply()[1] == REP_ERR_INVALID
        r.option(6, b"\x00" * 300000)                  # oversized: consumed and refused
        assert r.reply()[1] == REP_ERR_TOO_BIG
        r.option(3)                                    # still negotiating fine
        opt, typ, data = r.reply()
        assert typ == 2 and data == b"\0\0\0\0"
        assert r.reply()[1] == REP_ACK
        r.option(2)                                    # ABORT gets an ACK
        assert r.reply()[1] == REP_ACK
        assert r.closed()
    finally:
        r.close()
    # absurd option length: the server drops that client
    r = Raw(sock)
    try:
        r.s.sendall(struct.pack(">I", 1))
        r.option(6, length=0xFFFFFFF0)
        assert r.closed()
    finally:
        r.close()
    # unknown client flags and a bad option magic: dropped
    for hello in (struct.pack(">I", 0x80), struct.pack(">I", 1) + b"\0" * 16):
        r = Raw(sock)
        try:
            r.s.sendall(hello)
            assert r.closed()
        finally:
            r.close()
    assert still_serving(sock) == str(MiB)
    assert srv.proc.poll() is None


def test_client_vanishing_with_requests_in_flight(serve, tmp):
    srv, sock = serve_unix(serve, tmp, "ram:64M")
    for _ in range(3):
        r = Raw(sock)
        r.s.sendall(struct.pack(">I", 3))
        r.option(7, struct.pack(">IH", 0, 0))  # GO, default export
        while True:
            opt, typ, data = r.reply()
            if typ == REP_ACK:
                break
        reqs = b""
        for i in range(200):
            reqs += struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 32) * MiB, MiB)  # 1M reads
        for i in range(20):  # writes announced, payload cut short
            reqs += struct.pack(">IHHQQI", 0x25609513, 0, 1, 1000 + i, i * 4096, 4096) + b"w" * 4096
        reqs += struct.pack(">IHHQQI", 0x25609513, 0, 1, 9999, 0, 65536) + b"partial"
        r.s.sendall(reqs)
        r.close()
    # a bad request magic drops that client only
    r = Raw(sock)
    r.s.sendall(struct.pack(">I", 3))
    r.option(1, b"")  # EXPORT_NAME ""
    size, flags = struct.unpack(">QH", r.recv(10))
    assert size == 64 * MiB and flags & 1
    r.s.sendall(b"\xde\xad" * 14)
    assert r.closed()
    r.close()
    assert still_serving(sock) == str(64 * MiB)
    # away from the first 80 KiB, where the vanished clients' writes may
    # still be landing (nothing orders them against another connection's)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 48M 64k", "-c", "read -P 0x42 48M 64k", uri(sock))
    assert srv.proc.poll() is None


def raw_transmission(sock):
    """A raw client past a GO for the default export (simple replies)."""
    r = Raw(sock)
    r.s.sendall(struct.pack(">I", 3))
    r.option(7, struct.pack(">IH", 0, 0))
    while r.reply()[1] != REP_ACK:
        pass
    return r


def raw_request(r, typ, cookie, offset, length, payload=b"", flags=0):
    r.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, offset, length) + payload)


def raw_simple_reply(r, cookie):
    magic, err, got = struct.unpack(">IIQ", r.recv(16))
    assert (magic, got) == (0x67446698, cookie)
    return err


def test_write_paused_mid_payload_holds_nothing(serve, tmp):
    """Writes to the RAM disk over a Unix socket are received in place; a
    client that stops halfway through a payload must not keep the range
    locked (another client's TRIM of it finishes), and what it sends
    afterwards lands."""
    srv, sock = serve_unix(serve, tmp, "ram:4M")
    payload = bytes(range(256)) * 1024  # 256 KiB
    r = raw_transmission(sock)
    try:
        for cookie, trim in ((77, True), (78, False)):
            raw_request(r, 1, cookie, MiB, len(payload), payload[:100000])
            time.sleep(0.3)
            if trim:
                # the writer is stalled; trimming its range must not hang
                nbdsh(uri(sock), f"h.trim({2 * MiB}, 0)")
            r.s.sendall(payload[100000:])
            assert raw_simple_reply(r, cookie) == 0
            # overlapping a TRIM in flight, only the part sent after it is certain
            start = 100000 if trim else 0
            nbdsh(uri(sock), f"""
import hashlib
got = hashlib.sha256(h.pread({len(payload) - start}, {MiB + start})).hexdigest()
assert got == "{hashlib.sha256(payload[start:]).hexdigest()}", "{cookie}"
""")
    finally:
        r.close()
    assert srv.proc.poll() is None


def test_spliced_file_writes_pause_fail_and_stay_in_step(serve, tmp):
    """Large writes to a file are spliced socket -> pipe -> page cache.  A
    payload that pauses halfway lands whole (with FUA); one the file system
    has no room for is answered ENOSPC with the rest of its payload read
    and thrown away, so the next request on the connection is understood."""
    small = os.path.join(tmp, "small")
    os.mkdir(small)
    run("mount", "-t", "tmpfs", "-o", "size=2M", "devio-test", small)
    try:
        img = os.path.join(small, "disk.img")
        with open(img, "wb") as f:
            f.truncate(16 * MiB)  # sparse: more than the file system holds
        srv, sock = serve_unix(serve, tmp, img)
        payload = bytes(range(256)) * 1024  # 256 KiB
        r = raw_transmission(sock)
        try:
            raw_request(r, 1, 1, MiB, len(payload), payload[:100000], flags=1)  # FUA
            time.sleep(0.3)
            r.s.sendall(payload[100000:])
            assert raw_simple_reply(r, 1) == 0
            big = b"\x5a" * (4 * MiB)
            raw_request(r, 1, 2, 8 * MiB, len(big), big)
            assert raw_simple_reply(r, 2) == 28  # NBD_ENOSPC
            raw_request(r, 0, 3, MiB, len(payload))
            assert raw_simple_reply(r, 3) == 0
            assert r.recv(len(payload)) == payload
        finally:
            r.close()
        assert srv.proc.poll() is None
        srv.stop()
        assert "from a pipe: No space left on device" in srv.stderr()
    finally:
        run("umount", "-l", small, check=False)


def test_spliced_file_reads_both_reply_kinds(serve, tmp):
    """Large reads of a fully written file on tmpfs are spliced page cache
    -> pipe -> socket: with simple and structured replies, at an unaligned
    offset, interleaved with small reads and a write, all by content."""
    fd, img = tempfile.mkstemp(prefix="devio-splice-", dir="/dev/shm")
    os.close(fd)
    try:
        make_image(img, 4 * MiB, seed=7)
        with open(img, "rb") as f:
            data = f.read()
        srv, sock = serve_unix(serve, tmp, img)
        r = raw_transmission(sock)
        try:
            raw_request(r, 0, 1, 4096 + 100, MiB - 8192)  # 255 pages: fits the pipe
            raw_request(r, 0, 2, 10, 512)
            assert raw_simple_reply(r, 1) == 0
            assert r.recv(MiB - 8192) == data[4196:4196 + MiB - 8192]
            assert raw_simple_reply(r, 2) == 0
            assert r.recv(512) == data[10:522]
        finally:
            r.close()
        digest = hashlib.sha256(data[3 * MiB - 7:4 * MiB - 7]).hexdigest()
        nbdsh(uri(sock), f"""
import hashlib
h.pwrite(b"\\xee" * 8192, {2 * MiB})
assert h.pread({MiB}, {2 * MiB - 4096})[4096:12288] == b"\\xee" * 8192
assert hashlib.sha256(h.pread({MiB}, {3 * MiB - 7})).hexdigest() == "{digest}"
""")
        assert srv.proc.poll() is None
    finally:
        os.unlink(img)


@pytest.mark.parametrize("how", ["ram-pool", "devio-remote"])
def test_worker_pool_paths(serve, tmp, how):
    """Synchronous backends on the worker pool: a RAM disk with --threads 3,
    and a remote devio server (pooled by default) re-exported over NBD."""
    if how == "ram-pool":
        _, sock = serve_unix(serve, tmp, "ram:32M", "--threads", "3")
    else:
        dsock = os.path.join(tmp, "devio.sock")
        serve("ram:32M", "--devio", f"unix:{dsock}").wait_unix(dsock)
        _, sock = serve_unix(serve, tmp, f"devio+unix://{dsock}")
    r = run("fio", "--name=pool", "--ioengine=nbd", f"--uri={uri(sock)}", "--rw=randrw", "--bs=4k",
            "--size=8M", "--iodepth=32", "--numjobs=2", "--offset_increment=16M", "--verify=crc32c",
            "--verify_fatal=1", "--verify_state_save=0", "--group_reporting", "--output-format=json",
            timeout=300, cwd=tmp)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0
    run("qemu-io", "-f", "raw", "-c", "write -P 0x61 30M 2M", "-c", "read -P 0x61 30M 2M", uri(sock))


@pytest.mark.parametrize("source", ["file", "ram"])
def test_client_that_never_reads_replies_blocks_only_itself(serve, tmp, source):
    """A client floods reads and never reads the replies: its socket fills,
    but the backend's completion thread and other clients carry on."""
    if source == "file":
        source = os.path.join(tmp, "disk.img")
        make_image(source, 64 * MiB)
    else:
        source = "ram:64M"
    srv, sock = serve_unix(serve, tmp, source)
    r = Raw(sock)
    try:
        r.s.sendall(struct.pack(">I", 3))
        r.option(7, struct.pack(">IH", 0, 0))
        while r.reply()[1] != REP_ACK:
            pass
        # fewer requests than slots: the reader goes back to recv and the
        # completions find nobody sending, with the socket about to fill
        reqs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 60) * MiB, MiB) for i in range(40))
        r.s.sendall(reqs)
        time.sleep(0.5)
        # another client reads and writes the same export meanwhile
        run("qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 1M", "-c", "read -P 0x7e 0 1M", uri(sock), timeout=60)
        assert still_serving(sock) == str(64 * MiB)
    finally:
        r.close()
    assert srv.proc.poll() is None


@pytest.mark.parametrize("source", ["file", "ram"])
def test_stop_with_traffic_in_flight(serve, tmp, source):
    """SIGTERM while two clients have requests in flight: the server answers
    or drops them, joins every thread and exits 0 by itself."""
    if source == "file":
        source = os.path.join(tmp, "disk.img")
        make_image(source, 32 * MiB)
    else:
        source = "ram:32M"
    srv, sock = serve_unix(serve, tmp, source)
    fio = subprocess.Popen(["fio", "--name=stop", "--ioengine=nbd", f"--uri={uri(sock)}", "--rw=randrw",
                            "--bs=64k", "--size=16M", "--iodepth=32", "--numjobs=2", "--time_based",
                            "--runtime=30", "--verify_state_save=0"],
                           cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        time.sleep(1.5)
        assert srv.proc.poll() is None
        assert srv.stop(timeout=15) == 0  # not killed after the bound: it exited by itself
        fio.wait(timeout=30)  # its connections were closed under it
    finally:
        if fio.poll() is None:
            os.killpg(fio.pid, signal.SIGKILL)
            fio.wait()
    assert not os.path.exists(sock)  # the listener cleaned up its socket
