"""test_listener.py - lib/listener.c, the accept loop both socket front
ends share: the NBD connection cap (refusals logged rate-limited), the
pause instead of a log spin when accept() runs out of descriptors, and a
Unix socket removed at stop only while it is still this server's."""
import os
import resource
import shutil
import socket
import struct
import tempfile
import time

import pytest

import devio_wire as w
from conftest import wait_for

NBDMAGIC = 0x4E42444D41474943
NBD_MAX_CONNS = 128  # frontends/nbd.c


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-listener-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nbd_greeted(path):
    """Connect; True if the server greets, False if it closes at once."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    got = b""
    while len(got) < 8:
        b = s.recv(8 - len(got))
        if not b:
            s.close()
            return False, None
        got += b
    assert struct.unpack(">Q", got)[0] == NBDMAGIC
    return True, s


def refusals_logged(srv):
    return srv.stderr().count("refusing a client")


def test_nbd_connection_cap_and_rate_limited_refusals(serve, tmp):
    sock = os.path.join(tmp, "nbd.sock")
    # held clients never negotiate: no handshake deadline here (test_security.py has it)
    srv = serve("ram:1M", "--nbd", f"unix:{sock}", "--handshake-timeout", "0")
    srv.wait_unix(sock)
    held = []
    try:
        for _ in range(NBD_MAX_CONNS):
            ok, s = nbd_greeted(sock)
            assert ok
            held.append(s)
        for _ in range(20):  # over the cap: closed without a greeting
            ok, _ = nbd_greeted(sock)
            assert not ok
        # the 1st, 2nd, 4th, 8th and 16th refusal are told, not all 20
        wait_for(lambda: refusals_logged(srv) >= 5, 10, "refusals logged")
        assert refusals_logged(srv) == 5
        assert "20 refused" not in srv.stderr()
        held.pop().close()
        greeted = None
        for _ in range(200):  # the slot is free once that session has ended
            ok, s = nbd_greeted(sock)
            if ok:
                greeted = s
                break
            time.sleep(0.05)
        assert greeted is not None
        greeted.close()
    finally:
        for s in held:
            s.close()
    assert srv.stop() == 0


def accept_failures_logged(srv):
    return srv.stderr().count("accept:")


def test_out_of_descriptors_pauses_without_a_log_spin(serve, tmp):
    path = os.path.join(tmp, "devio.sock")
    srv = serve("ram:1M", "--devio", f"unix:{path}")
    srv.wait_unix(path)
    pid = srv.proc.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    # room for two more sockets; the third accept() fails with EMFILE
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2, hard))
    clients = []
    try:
        for _ in range(5):
            clients.append(w.Client(path=path))
        wait_for(lambda: accept_failures_logged(srv) >= 2, 20, "accept failures logged")
        time.sleep(2)  # a spinning loop would log thousands of lines meanwhile
        # 1st, 2nd, 4th, 8th ... failure: a pause of 200 ms between tries
        # keeps that well under 8 lines (8 would take 128 failures)
        assert accept_failures_logged(srv) < 8
        assert "Too many open files" in srv.stderr()
        assert clients[0].info()[0] == 1 << 20
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert clients[-1].info()[0] == 1 << 20  # served once descriptors are back
    finally:
        for c in clients:
            c.close()
    assert srv.proc.poll() is None
    assert srv.stop() == 0


def test_unix_socket_of_a_newer_server_is_left_alone(serve, tmp):
    path = os.path.join(tmp, "devio.sock")
    old = serve("ram:1M", "--devio", f"unix:{path}")
    old.wait_unix(path)
    # a live socket is never taken over (test_shared_state.py); once the
    # file is removed behind the old server's back, a new server makes its own
    os.unlink(path)
    new = serve("ram:2M", "--devio", f"unix:{path}")
    new.wait_unix(path)
    assert new.proc.poll() is None
    assert old.stop() == 0
    assert os.path.exists(path)  # the old server did not remove the new one's socket
    with w.Client(path=path) as c:
        assert c.info()[0] == 2 << 20
    assert new.stop() == 0
    assert not os.path.exists(path)
