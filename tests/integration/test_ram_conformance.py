"""test_ram_conformance.py - the RAM disk over NBD keeps the protocol's
promises: a WRITE_ZEROES with NO_HOLE leaves the range provisioned (under
--ram-max a later write there succeeds, block status says data), a plain
zero still gives memory back, and FLUSH, FUA and CACHE are offered and work
(nbdcopy --flush, FUA writes, nbdinfo's can_* flags)."""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import vmrss

nbd = pytest.importorskip("nbd")

MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-ramconf-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def serve_ram(serve, tmp, *args):
    sock = os.path.join(tmp, "nbd.sock")
    s = serve(*args, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    return s, f"nbd+unix:///?socket={sock}"


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def block_status(h, off, length):
    """[(length, flags)] of base:allocation over [off, off+length)."""
    out = []

    def cb(meta, offset, entries, err):
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, off, cb)
    return out


def test_no_hole_zero_keeps_room_under_cap(serve, tmp):
    _, uri = serve_ram(serve, tmp, "ram:64M", "--ram-max", "8M")
    h = connect(uri)
    data = os.urandom(MiB)
    for i in range(8):  # fill the cap
        h.pwrite(data, i * MiB)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(data, 32 * MiB)
    assert e.value.errnum == 28  # ENOSPC: the cap is full
    h.zero(2 * MiB, MiB, flags=nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(MiB, 2 * MiB) == bytes(MiB)
    st = block_status(h, 2 * MiB, 2 * MiB)
    assert st and all(not (flags & nbd.STATE_HOLE) for _, flags in st), st
    h.pwrite(data, 2 * MiB)  # the range is still ours: no ENOSPC
    assert h.pread(MiB, 2 * MiB) == data
    # no room for never-written chunks: the zero itself is refused
    with pytest.raises(nbd.Error) as e:
        h.zero(40 * MiB, MiB, flags=nbd.CMD_FLAG_NO_HOLE)
    assert e.value.errnum == 28
    h.shutdown()


def test_plain_zero_still_frees_memory(serve, tmp):
    s, uri = serve_ram(serve, tmp, "ram:1G", "--ram-max", "128M")
    h = connect(uri)
    h.pread(MiB, 0)
    base = vmrss(s.proc.pid)
    data = os.urandom(MiB)
    for i in range(96):
        h.pwrite(data, i * MiB)
    grown = vmrss(s.proc.pid)
    assert grown - base >= 72 * MiB, (base, grown)
    h.zero(96 * MiB, 0)
    shrunk = vmrss(s.proc.pid)
    assert grown - shrunk >= 72 * MiB, (grown, shrunk)
    st = block_status(h, 0, 96 * MiB)
    assert all(flags & nbd.STATE_HOLE for _, flags in st), st
    # the freed room counts again under the cap
    for i in range(96):
        h.pwrite(data, 200 * MiB + i * MiB)
    h.shutdown()


def test_nbdinfo_shows_flush_fua_cache(serve, tmp):
    _, uri = serve_ram(serve, tmp, "ram:16M")
    r = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60, check=True)
    e = json.loads(r.stdout)["exports"][0]
    assert e["can_flush"] is True and e["can_fua"] is True and e["can_cache"] is True, e
    assert e["can_multi_conn"] is True


def test_fua_write_flush_and_cache(serve, tmp):
    _, uri = serve_ram(serve, tmp, "ram:16M")
    h = connect(uri)
    h.pwrite(b"\x5a" * 5000, 65000, flags=nbd.CMD_FLAG_FUA)
    h.flush()
    h.cache(MiB, 0)
    h.zero(100, 65100, flags=nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(5000, 65000) == b"\x5a" * 100 + bytes(100) + b"\x5a" * 4800
    h.shutdown()


def test_nbdcopy_flush_into_ram(serve, tmp):
    src = os.path.join(tmp, "src.img")
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MiB))
    _, uri = serve_ram(serve, tmp, "ram:8M")
    r = subprocess.run(["nbdcopy", "--flush", src, uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    h = connect(uri)
    with open(src, "rb") as f:
        assert h.pread(8 * MiB, 0) == f.read()
    h.shutdown()
