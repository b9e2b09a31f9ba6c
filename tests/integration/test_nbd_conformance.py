"""test_nbd_conformance.py - NBD protocol corners checked with a raw-socket
client written from the spec (NetworkBlockDevice/nbd doc/proto.md), with
nbdkit's memory plugin as a control where the same expectation holds for
a reference server: a failed NBD_OPT_SET_META_CONTEXT clears the earlier
selection, unknown options of any length get NBD_REP_ERR_UNSUP, clients
that used NBD_OPT_EXPORT_NAME can move 64 MiB per request, requests over
the bound get an error and the connection stays in step, and a refused
request is logged once with its command, offset, length and reason."""
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from conftest import wait_for
from test_nbd import (REP_ACK, REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNSUP, Raw, raw_request,
                      raw_simple_reply, run, serve_unix, still_serving, uri)

MiB = 1 << 20
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNKNOWN = (1 << 31) + 6
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 7, 8
OPT_SET_META_CONTEXT = 10
CMD_READ, CMD_WRITE, CMD_BLOCK_STATUS = 0, 1, 7
STRUCTURED_MAGIC = 0x668E33EF
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
EINVAL, EPERM, ENOSPC, EOVERFLOW = 22, 1, 28, 75


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-nbdc-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def unix_accepts(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(path)
            return True
    except OSError:
        return False


@pytest.fixture
def nbdkit(tmp):
    """nbdkit(size) starts nbdkit's memory plugin on a Unix socket."""
    procs = []

    def start(size="1M"):
        sock = os.path.join(tmp, f"nbdkit{len(procs)}.sock")
        p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", size], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        # the socket file appears at bind(), before listen(): wait for a connection
        wait_for(lambda: unix_accepts(sock) or p.poll() is not None, 10, sock)
        assert p.poll() is None, "nbdkit exited"
        return sock

    yield start
    for p in procs:
        p.terminate()  # it waits for its clients (a devio backend may still be one)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def server_sock(server, serve, nbdkit, tmp, size="1M", *extra):
    """The Unix socket of a devio RAM disk or (control) an nbdkit memory disk."""
    if server == "nbdkit":
        return nbdkit(size)
    return serve_unix(serve, tmp, f"ram:{size}", *extra)[1]


def recv_exact(s, n):
    """n bytes from s, received in place (no quadratic concatenation)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def newstyle(sock):
    """A raw client past the greeting, NO_ZEROES agreed."""
    r = Raw(sock)
    r.s.sendall(struct.pack(">I", 3))
    return r


def meta_data(export, queries):
    data = struct.pack(">I", len(export)) + export + struct.pack(">I", len(queries))
    for q in queries:
        data += struct.pack(">I", len(q)) + q
    return data


def replies_until_final(r):
    """Every reply to one option, up to its final one (ACK or an error)."""
    out = []
    while True:
        opt, typ, data = r.reply()
        out.append((typ, data))
        if typ == REP_ACK or typ & (1 << 31):
            return out


def go(r, export=b"", infos=()):
    """NBD_OPT_GO asking for the given NBD_INFO types; the replies."""
    r.option(OPT_GO, struct.pack(">I", len(export)) + export + struct.pack(">H", len(infos)) +
             b"".join(struct.pack(">H", i) for i in infos))
    got = replies_until_final(r)
    assert got[-1][0] == REP_ACK, got
    return got


def structured_chunk(r):
    magic, flags, typ, cookie, length = struct.unpack(">IHHQI", recv_exact(r.s, 20))
    assert magic == STRUCTURED_MAGIC
    return flags, typ, cookie, recv_exact(r.s, length)


# ---- 5. a failed NBD_OPT_SET_META_CONTEXT clears the earlier selection ----

FAILING_SETS = {
    # export name unknown: NBD_REP_ERR_UNKNOWN (nbdkit: any error)
    "unknown-export": meta_data(b"nosuch", [b"base:allocation"]),
    # a query length past the end of the option: NBD_REP_ERR_INVALID
    "malformed": struct.pack(">II", 0, 1) + struct.pack(">I", 100) + b"base:allocation",
    # more data than the server reads: refused as too big
    "too-big": meta_data(b"", [b"base:allocation", b"x-pad:" + b"p" * (100 << 10)]),
    # a successful SET that selects nothing also replaces the selection
    "no-queries": meta_data(b"", []),
}


@pytest.mark.parametrize("server", ["devio", "nbdkit"])
@pytest.mark.parametrize("second", [None] + sorted(FAILING_SETS))
def test_set_meta_context_replaces_selection_even_when_it_fails(serve, nbdkit, tmp, server, second):
    if server == "nbdkit" and second == "too-big":
        pytest.skip("nbdkit 1.32 answers base:allocation, then ERR_INVALID for the long query, "
                    "and keeps base:allocation selected")
    sock = server_sock(server, serve, nbdkit, tmp)
    r = newstyle(sock)
    try:
        r.option(OPT_STRUCTURED_REPLY)
        assert r.reply()[1] == REP_ACK
        r.option(OPT_SET_META_CONTEXT, meta_data(b"", [b"base:allocation"]))
        got = replies_until_final(r)
        assert [t for t, _ in got] == [REP_META_CONTEXT, REP_ACK], got
        if second:
            r.option(OPT_SET_META_CONTEXT, FAILING_SETS[second])
            got = replies_until_final(r)
            if server == "devio":
                want = {"unknown-export": REP_ERR_UNKNOWN, "malformed": REP_ERR_INVALID,
                        "too-big": REP_ERR_TOO_BIG, "no-queries": REP_ACK}[second]
                assert got[-1][0] == want, hex(got[-1][0])
        # what is selected is what the last SET answered without error, and
        # only if it named the export chosen (nbdkit accepts SET for an
        # export it does not have; GO of "" then has no context)
        selected = got[-1][0] == REP_ACK and got[0][0] == REP_META_CONTEXT
        allowed = selected and second != "unknown-export"
        assert allowed == (second is None)
        go(r)
        raw_request(r, CMD_BLOCK_STATUS, 42, 0, 4096)
        flags, typ, cookie, data = structured_chunk(r)
        assert cookie == 42 and flags & 1
        if allowed:
            ctx_id = struct.unpack(">I", got[0][1][:4])[0]
            assert typ == REPLY_TYPE_BLOCK_STATUS and struct.unpack(">I", data[:4])[0] == ctx_id
        else:
            # no context selected: BLOCK_STATUS is not allowed
            assert typ == REPLY_TYPE_ERROR, (typ, data)
            assert struct.unpack(">I", data[:4])[0] == EINVAL
        # the connection is still in step
        raw_request(r, CMD_READ, 43, 0, 512)
        flags, typ, cookie, data = structured_chunk(r)
        assert cookie == 43 and typ in (1, 2)  # OFFSET_DATA or OFFSET_HOLE
    finally:
        r.close()


@pytest.mark.parametrize("server", ["devio", "nbdkit"])
def test_set_meta_context_before_structured_replies_selects_nothing(serve, nbdkit, tmp, server):
    sock = server_sock(server, serve, nbdkit, tmp)
    r = newstyle(sock)
    try:
        r.option(OPT_SET_META_CONTEXT, meta_data(b"", [b"base:allocation"]))
        assert replies_until_final(r)[-1][0] == REP_ERR_INVALID
        r.option(OPT_STRUCTURED_REPLY)
        assert r.reply()[1] == REP_ACK
        go(r)
        raw_request(r, CMD_BLOCK_STATUS, 7, 0, 4096)
        flags, typ, cookie, data = structured_chunk(r)
        assert cookie == 7 and typ == REPLY_TYPE_ERROR
        assert struct.unpack(">I", data[:4])[0] == EINVAL
    finally:
        r.close()


# ---- 6. unknown options get NBD_REP_ERR_UNSUP whatever their length ----

@pytest.mark.parametrize("server", ["devio", "nbdkit"])
@pytest.mark.parametrize("size", [100 << 10, MiB, 40 * MiB])
def test_unknown_option_with_large_data_is_unsup(serve, nbdkit, tmp, server, size):
    if server == "nbdkit" and size > MiB:
        pytest.skip("nbdkit 1.32 drops a client whose option is longer than it reads")
    sock = server_sock(server, serve, nbdkit, tmp)
    r = newstyle(sock)
    try:
        r.option(0x7777, b"\xa5" * size)
        opt, typ, _ = r.reply()
        assert (opt, typ) == (0x7777, REP_ERR_UNSUP)
        r.option(OPT_LIST)  # the next option is understood
        got = replies_until_final(r)
        assert got[-1][0] == REP_ACK and got[0][0] == REP_SERVER
        go(r)
        raw_request(r, CMD_READ, 1, 0, 512)
        assert raw_simple_reply(r, 1) == 0
        assert recv_exact(r.s, 512) == bytes(512)
    finally:
        r.close()


def test_known_option_too_big_stays_in_step_and_absurd_one_closes(serve, tmp):
    """Options we implement may still be refused as too big (consumed, so
    the next option is understood); beyond the bound the client is dropped
    and the server carries on."""
    srv, sock = serve_unix(serve, tmp, "ram:1M")
    r = newstyle(sock)
    try:
        r.option(OPT_GO, b"\0" * (200 << 10))
        assert r.reply()[1] == REP_ERR_TOO_BIG
        r.option(OPT_LIST)
        assert replies_until_final(r)[-1][0] == REP_ACK
    finally:
        r.close()
    r = newstyle(sock)
    try:
        r.option(OPT_GO, length=64 * MiB)
        assert r.closed()
    finally:
        r.close()
    assert still_serving(sock) == str(MiB)
    assert "option 7 with 67108864 bytes of data" in srv.stderr()


# ---- 7. 64 MiB requests from clients that never learned the maximum ----

def export_name(sock, export=b""):
    """A raw client in transmission through NBD_OPT_EXPORT_NAME (simple
    replies, no block size information)."""
    r = newstyle(sock)
    r.option(OPT_EXPORT_NAME, export)
    size, flags = struct.unpack(">QH", recv_exact(r.s, 10))
    return r, size


def big_round_trip(r, offset, length, seed):
    data = (bytes([seed]) + os.urandom(4095)) * (length // 4096)
    raw_request(r, CMD_WRITE, 100 + seed, offset, length, data)
    assert raw_simple_reply(r, 100 + seed) == 0
    raw_request(r, CMD_READ, 200 + seed, offset, length)
    assert raw_simple_reply(r, 200 + seed) == 0
    assert recv_exact(r.s, length) == data


@pytest.mark.parametrize("source", ["ram", "file", "nbd-remote", "nbdkit"])
def test_export_name_client_64mib_write_and_read(serve, nbdkit, tmp, source):
    if source == "nbdkit":
        sock = nbdkit("80M")
    elif source == "ram":
        sock = serve_unix(serve, tmp, "ram:80M")[1]
    elif source == "file":
        img = os.path.join(tmp, "disk.img")
        with open(img, "wb") as f:
            f.truncate(80 * MiB)
        sock = serve_unix(serve, tmp, img)[1]
    else:
        # a remote NBD server as the backend: its 32 MiB maximum (max_io)
        # makes the front end split 64 MiB requests in pieces
        far = nbdkit("80M")
        sock = serve_unix(serve, tmp, f"nbd+unix:///?socket={far}")[1]
    r, size = export_name(sock)
    try:
        assert size == 80 * MiB
        big_round_trip(r, 4096, 64 * MiB, 1)
        big_round_trip(r, 16 * MiB - 512, 64 * MiB, 2)  # unaligned to any piece
    finally:
        r.close()


def test_split_requests_pipelined_with_small_ones(serve, nbdkit, tmp):
    """Several 64 MiB requests to a backend that takes 32 MiB at once, in
    flight together with small ones: all answered, by content."""
    far = nbdkit("160M")
    sock = serve_unix(serve, tmp, f"nbd+unix:///?socket={far}")[1]
    r, _ = export_name(sock)
    try:
        a, b = os.urandom(4096) * (16 << 10), os.urandom(4096) * (16 << 10)
        r.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, len(a)) + a +
                    struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 2, 150 * MiB, 4096) +
                    struct.pack(">IHHQQI", 0x25609513, 1, CMD_WRITE, 3, 80 * MiB, len(b)) + b +  # FUA
                    struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, 4, 150 * MiB, 4096))
        for cookie in range(1, 5):
            magic, err, got = struct.unpack(">IIQ", recv_exact(r.s, 16))
            assert magic == 0x67446698 and err == 0 and got in (1, 2, 3, 4)
            if got in (2, 4):
                assert recv_exact(r.s, 4096) == bytes(4096)
        raw_request(r, CMD_READ, 5, 0, len(a))
        raw_request(r, CMD_READ, 6, 80 * MiB, len(b))
        for cookie, want in ((5, a), (6, b)):
            assert raw_simple_reply(r, cookie) == 0
            assert recv_exact(r.s, len(want)) == want
    finally:
        r.close()


@pytest.mark.parametrize("server", ["devio", "nbdkit"])
def test_libnbd_64mib_pwrite_pread(serve, nbdkit, tmp, server):
    sock = server_sock(server, serve, nbdkit, tmp, "80M")
    script = """
import hashlib, nbd, os, sys
h = nbd.NBD()
h.set_request_block_size(False)  # GO without NBD_INFO_BLOCK_SIZE: no maximum promised
h.set_strict_mode(0)             # the server, not libnbd, judges the length
h.connect_uri(sys.argv[1])
data = os.urandom(64 << 20)
h.pwrite(data, 8 << 20)
assert hashlib.sha256(h.pread(64 << 20, 8 << 20)).digest() == hashlib.sha256(data).digest()
h.shutdown()
"""
    run("/usr/bin/python3", "-c", script, uri(sock), timeout=120)


INFO_BLOCK_SIZE = 3


def test_advertised_maximum_binds_the_clients_that_asked_for_it(serve, tmp):
    """NBD_INFO_BLOCK_SIZE says 32 MiB and a client that asked for it in GO
    (promising to keep to it) is held to it; one that did not ask is served
    64 MiB like an NBD_OPT_EXPORT_NAME client."""
    srv, sock = serve_unix(serve, tmp, "ram:80M")
    assert '"block_size_maximum": 33554432' in run("nbdinfo", "--json", uri(sock)).stdout
    for asked in (True, False):
        r = newstyle(sock)
        try:
            got = go(r, infos=(INFO_BLOCK_SIZE,) if asked else ())
            sizes = [d for t, d in got if t == REP_INFO and d[:2] == struct.pack(">H", INFO_BLOCK_SIZE)]
            assert [struct.unpack(">HIII", d)[1:] for d in sizes] == [(1, 4096, 32 * MiB)]
            big_round_trip(r, 0, 32 * MiB, 3)
            raw_request(r, CMD_READ, 9, 0, 32 * MiB + 4096)
            if asked:
                assert raw_simple_reply(r, 9) == EOVERFLOW
            else:
                assert raw_simple_reply(r, 9) == 0
                recv_exact(r.s, 32 * MiB + 4096)
                big_round_trip(r, 4096, 64 * MiB, 4)
        finally:
            r.close()
    wait_for(lambda: "over the 32 MiB maximum block size the client asked for" in srv.stderr(), 5, "log")


@pytest.mark.parametrize("server", ["devio", "nbdkit"])
def test_over_limit_requests_get_an_error_and_stay_in_step(serve, nbdkit, tmp, server):
    sock = server_sock(server, serve, nbdkit, tmp, "80M")
    r, _ = export_name(sock)
    try:
        over = 64 * MiB + 4096
        raw_request(r, CMD_READ, 1, 0, over)
        err = raw_simple_reply(r, 1)
        assert err != 0
        if server == "devio":
            assert err == EOVERFLOW
        raw_request(r, CMD_WRITE, 2, 0, over, b"\x11" * over)  # its payload is read and dropped
        err = raw_simple_reply(r, 2)
        assert err != 0
        if server == "devio":
            assert err == EOVERFLOW
        raw_request(r, CMD_READ, 3, 0, 4096)
        assert raw_simple_reply(r, 3) == 0
        assert recv_exact(r.s, 4096) == bytes(4096)
    finally:
        r.close()


def test_write_beyond_the_discard_bound_closes_cleanly(serve, tmp):
    srv, sock = serve_unix(serve, tmp, "ram:1M")
    r, _ = export_name(sock)
    try:
        raw_request(r, CMD_WRITE, 1, 0, 512 * MiB, b"\0" * 4096)
        assert r.closed()
    finally:
        r.close()
    assert still_serving(sock) == str(MiB)
    log = srv.stderr()
    assert re.search(r"NBD_CMD_WRITE offset 0 length 536870912 refused: length 0x20000000 over the "
                     r"64 MiB maximum, and more than the 256 MiB .*; closing", log), log


# ---- 8. a refused request is logged once, with its cause ----

def refusal_lines(log):
    return [line for line in log.splitlines() if " refused with " in line]


REFUSALS = [
    # (export args, command, flags, offset, length, payload, wire error, log text)
    ((), 9, 0, 0, 0, b"", EINVAL, "NBD_CMD 9 offset 0 length 0 refused with EINVAL: NBD_CMD 9 unknown"),
    ((), CMD_WRITE, 0, MiB - 512, 4096, b"w" * 4096, ENOSPC,
     "NBD_CMD_WRITE offset 1048064 length 4096 refused with ENOSPC: "
     "offset+length past the end of the 1048576-byte export"),
    ((), CMD_READ, 0, 2 * MiB, 512, b"", EINVAL,
     "NBD_CMD_READ offset 2097152 length 512 refused with EINVAL: "
     "offset+length past the end of the 1048576-byte export"),
    (("-r",), CMD_WRITE, 0, 0, 512, b"r" * 512, EPERM,
     "NBD_CMD_WRITE offset 0 length 512 refused with EPERM: write to a read-only export"),
    ((), CMD_READ, 0, 0, 64 * MiB + 1, b"", EOVERFLOW,
     "NBD_CMD_READ offset 0 length 67108865 refused with EOVERFLOW: "
     "length 0x4000001 over the 64 MiB maximum"),
    ((), CMD_BLOCK_STATUS, 0, 0, 4096, b"", EINVAL,
     "NBD_CMD_BLOCK_STATUS offset 0 length 4096 refused with EINVAL: "
     "structured replies not negotiated"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c[-1].split(":")[-1].strip()[:24])
def test_refused_request_logged_once_with_its_cause(serve, tmp, case):
    extra, cmd, flags, offset, length, payload, wire, text = case
    srv, sock = serve_unix(serve, tmp, "ram:1M", *extra)
    r, _ = export_name(sock)
    try:
        raw_request(r, cmd, 5, offset, length, payload, flags)
        assert raw_simple_reply(r, 5) == wire
        raw_request(r, CMD_READ, 6, 0, 512)  # still in step
        assert raw_simple_reply(r, 6) == 0
        recv_exact(r.s, 512)
    finally:
        r.close()
    wait_for(lambda: refusal_lines(srv.stderr()), 5, "the log line")
    lines = refusal_lines(srv.stderr())
    assert len(lines) == 1, lines
    assert text in lines[0], lines
    assert "export '' (1048576 bytes)" in lines[0], lines
    assert srv.stderr().count(f"offset {offset} length {length}") == 1, srv.stderr()


def test_refusal_message_reaches_a_structured_client(serve, tmp):
    _, sock = serve_unix(serve, tmp, "ram:1M")
    r = newstyle(sock)
    try:
        r.option(OPT_STRUCTURED_REPLY)
        assert r.reply()[1] == REP_ACK
        go(r)
        raw_request(r, 9, 1, 0, 0)
        flags, typ, cookie, data = structured_chunk(r)
        assert typ == REPLY_TYPE_ERROR and cookie == 1
        err, mlen = struct.unpack(">IH", data[:6])
        assert err == EINVAL
        assert b"NBD_CMD 9 unknown" in data[6:6 + mlen], data
    finally:
        r.close()


def test_refusal_logging_is_bounded_per_connection(serve, tmp):
    srv, sock = serve_unix(serve, tmp, "ram:1M")
    r, _ = export_name(sock)
    try:
        r.s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 9, i, i, 0) for i in range(500)))
        for i in range(500):
            assert raw_simple_reply(r, i) == EINVAL
    finally:
        r.close()
    wait_for(lambda: "500 requests refused" in srv.stderr(), 5, "the summary")
    log = srv.stderr()
    assert len(refusal_lines(log)) <= 10, log
    assert re.search(r"500 requests refused on this connection, \d+ of them not logged", log), log
