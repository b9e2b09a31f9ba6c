"""test_ram_memory.py - a RAM disk served over the devio protocol takes
memory as it is written and gives it back on UNMAP: the server process's
resident memory (VmRSS in /proc/PID/status) is measured around each step."""
import os
import shutil
import tempfile

import pytest

import devio_wire as w
from conftest import vmrss

MiB = 1 << 20
WRITTEN = 96 * MiB


@pytest.fixture
def ram_server(serve):
    d = tempfile.mkdtemp(prefix="devio-ram-")
    sock = os.path.join(d, "ram.sock")
    s = serve("ram:4G", "--devio", f"unix:{sock}")
    s.wait_unix(sock)
    yield s, sock
    shutil.rmtree(d, ignore_errors=True)


def test_rss_grows_on_writes_and_shrinks_on_unmap(ram_server):
    s, sock = ram_server
    pid = s.proc.pid
    chunk = os.urandom(MiB)
    with w.Client(path=sock) as c:
        size, _, flags = c.info()
        assert size == 4 << 30 and flags & w.FLAG_UNMAP
        c.read(0, MiB)  # the connection's buffer exists before the baseline
        base = vmrss(pid)
        # spread over the 4 GiB export: only written chunks become resident
        for i in range(WRITTEN // MiB):
            assert c.write(i * 40 * MiB % size + (i * MiB) % (40 * MiB), chunk) == (0, MiB)
        grown = vmrss(pid)
        assert grown - base >= WRITTEN * 3 // 4, (base, grown)
        # an untouched region still reads as zeroes and costs nothing
        assert c.read(size - MiB, MiB) == (0, bytes(MiB))
        assert vmrss(pid) - grown < 16 * MiB
        assert c.unmap([(0, size)]) == 0
        shrunk = vmrss(pid)
        assert grown - shrunk >= WRITTEN * 3 // 4, (grown, shrunk)
        assert c.read(0, MiB) == (0, bytes(MiB))


def test_zero_does_not_allocate(ram_server):
    s, sock = ram_server
    with w.Client(path=sock) as c:
        c.read(0, MiB)
        base = vmrss(s.proc.pid)
        assert c.zero([(0, 1 << 30)]) == 0
        assert vmrss(s.proc.pid) - base < 16 * MiB
        assert c.read(512 * MiB, 4096) == (0, bytes(4096))
