"""test_nbd_attach.py - `devio attach ... --nbd-device` on the host, up to
the kernel: the user-space NBD handshake against real servers (nbdkit,
devio's own NBD front end) and against hostile ones, and the command
line's refusals.  The host kernel has no nbd module, so a good handshake
ends at the netlink step with a clear error; the whole attach/detach runs
in the guest (tests/vm, scenario kernel-nbd)."""
import os
import socket
import struct
import subprocess
import tempfile
import threading

import pytest

from conftest import DEVIO, free_port, wait_for, port_open

pytestmark = pytest.mark.skipif(os.path.exists("/sys/module/nbd"),
                                reason="nbd module loaded: these tests would attach a real device")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9


def attach(*args, timeout=30):
    return subprocess.run([DEVIO, "attach", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def nbdkit_memory():
    port = free_port()
    proc = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "-p", str(port),
                             "-i", "127.0.0.1", "memory", "64M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 10, "nbdkit")
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_handshake_with_nbdkit_reaches_the_kernel_step(nbdkit_memory):
    r = attach(f"nbd://127.0.0.1:{nbdkit_memory}", "--nbd-device", "--connections", "2")
    assert r.returncode == 1
    assert f"export of {64 << 20} bytes" in r.stderr
    assert "2 connections negotiated" in r.stderr
    assert 'netlink family "nbd"' in r.stderr


def test_handshake_with_devio_nbd_server_over_unix_socket(serve):
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "nbd.sock")
        s = serve("ram:32M", "--nbd", f"unix:{sock}")
        s.wait_unix(sock)
        r = attach(f"nbd+unix:///?socket={sock}", "--nbd-device", "/dev/nbd5")
        assert r.returncode == 1
        assert f"export of {32 << 20} bytes" in r.stderr
        assert 'netlink family "nbd"' in r.stderr
        assert s.proc.poll() is None


def test_unknown_export_is_refused_with_the_servers_message(serve):
    port = free_port()
    s = serve("ram:1M", "--nbd", f"tcp:127.0.0.1:{port}")
    s.wait_tcp(port)
    r = attach(f"nbd://127.0.0.1:{port}/no-such-export", "--nbd-device")
    assert r.returncode == 1
    assert "refused the export" in r.stderr


def test_percent_encoded_export_name(serve):
    port = free_port()
    s = serve("ram:1M", "--export", "my disk=ram:2M", "--nbd", f"tcp:127.0.0.1:{port}")
    s.wait_tcp(port)
    r = attach(f"nbd://127.0.0.1:{port}/my%20disk", "--nbd-device", "--connections", "1")
    assert r.returncode == 1
    assert f"export of {2 << 20} bytes" in r.stderr
    assert 'netlink family "nbd"' in r.stderr


class HostileServer:
    """Greets like an NBD server, then answers NBD_OPT_GO with `reply`."""

    def __init__(self, greeting, reply=b"", hang_up=True):
        self.hang_up = hang_up
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.greeting, self.reply = greeting, reply
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.sock.settimeout(20)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                conn.sendall(self.greeting)
                conn.recv(4)                 # client flags
                conn.recv(65536)             # the option
                conn.sendall(self.reply)
                if not self.hang_up:
                    # stall until the client gives up: keep reading whatever
                    # is left of its option (it may arrive in pieces) so
                    # closing never resets the connection under the client
                    while conn.recv(65536):
                        pass
            except OSError:
                pass

    def close(self):
        self.sock.close()
        self.thread.join(timeout=25)


GOOD_GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)


def test_stalled_server_times_out():
    srv = HostileServer(GOOD_GREETING, struct.pack(">QI", REPLY_MAGIC, 7), hang_up=False)
    try:
        r = attach(f"nbd://127.0.0.1:{srv.port}", "--nbd-device", "--timeout", "1")
        assert r.returncode == 1
        assert "stalled" in r.stderr
    finally:
        srv.close()


@pytest.mark.parametrize("greeting,reply,message", [
    # oldstyle/garbage greeting
    (struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 0), b"", "not a fixed-newstyle NBD server"),
    # a reply claiming 4 GiB of payload: refused, never allocated
    (GOOD_GREETING, struct.pack(">QIII", REPLY_MAGIC, 7, 3, 0xFFFFFFFF), "bad option reply"),
    # wrong reply magic
    (GOOD_GREETING, struct.pack(">QIII", 0x1234, 7, 1, 0), "bad option reply"),
    # ACK without ever describing the export
    (GOOD_GREETING, struct.pack(">QIII", REPLY_MAGIC, 7, 1, 0), "sent no export size"),
    # an error reply with a message
    (GOOD_GREETING, struct.pack(">QIII", REPLY_MAGIC, 7, 0x80000006, 4) + b"nope", "refused the export"),
    # the server hangs up mid-reply
    (GOOD_GREETING, struct.pack(">QI", REPLY_MAGIC, 7), "handshake"),
])
def test_hostile_servers_are_refused(greeting, reply, message):
    srv = HostileServer(greeting, reply)
    try:
        r = attach(f"nbd://127.0.0.1:{srv.port}", "--nbd-device")
        assert r.returncode == 1
        assert message in r.stderr
        assert "netlink" not in r.stderr
    finally:
        srv.close()


@pytest.mark.parametrize("args,message", [
    (["http://example/", "--nbd-device"], "not an NBD URI"),
    (["nbd+unix:///export", "--nbd-device"], "not an NBD URI"),
    (["nbd://127.0.0.1:1/a%00b", "--nbd-device"], "not an NBD URI"),
    (["nbd://127.0.0.1:1", "--nbd-device", "/dev/nbdX"], "--nbd-device"),
    (["nbd://127.0.0.1:1", "--nbd-device", "--connections", "99"], "--connections"),
])
def test_bad_command_lines(args, message):
    r = attach(*args)
    assert r.returncode == 2
    assert message in r.stderr


def test_detach_wants_an_nbd_device():
    r = subprocess.run([DEVIO, "detach", "/dev/nbdX"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
