"""test_security.py - who may reach a served disk, and what one client may
cost the others (docs/security.md): --allow on TCP listeners (IPv4, IPv6,
v4-mapped), Unix sockets and status files 0600 whatever the umask, the
FUSE file's owner and mode, --user, the handshake deadline, the stall
timeout, the connection cap under 500 idle clients, and memory under a
client that never reads its replies."""
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time

import pytest

import devio_wire as w
from conftest import free_port, vmrss, wait_for

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
NBD_REQUEST_MAGIC = 0x25609513
NBD_CMD_READ = 0
MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-security-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nbdinfo_size(uri):
    r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    return int(r.stdout) if r.returncode == 0 else None


def tcp_from(src, port, dst="127.0.0.1", family=socket.AF_INET):
    """A TCP connection to dst:port from source address src (loopback)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((src, 0))
    s.connect((dst, port))
    return s


def greeted(s):
    """True if the server sends the NBD greeting, False if it closes at once."""
    got = b""
    try:
        while len(got) < 8:
            b = s.recv(8 - len(got))
            if not b:
                return False
            got += b
    except ConnectionResetError:
        return False
    return struct.unpack(">Q", got)[0] == NBDMAGIC


def at_eof(s, timeout):
    """True if the peer closes s within timeout (whatever it sent before)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def nbd_negotiate(s):
    """Fixed newstyle, NBD_OPT_EXPORT_NAME "": the transmission phase."""
    hdr = b""
    while len(hdr) < 18:
        hdr += s.recv(18 - len(hdr))
    assert struct.unpack(">QQ", hdr[:16]) == (NBDMAGIC, IHAVEOPT)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, 0))
    got = b""
    while len(got) < 10:
        b = s.recv(10 - len(got))
        assert b, "closed during negotiation"
        got += b
    return struct.unpack(">Q", got[:8])[0]


def nbd_read_req(handle, offset, length):
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, handle, offset, length)


# ---- --allow ----


def test_allow_refuses_peers_outside_the_prefix(serve):
    port, port2 = free_port(), free_port()  # port + 1 may be taken
    srv = serve("ram:1M", "--nbd", f"tcp:127.0.0.1:{port}", "--devio", f"tcp:127.0.0.1:{port2}",
                "--allow", "127.0.0.1/32")
    srv.wait_tcp(port)
    assert nbdinfo_size(f"nbd://127.0.0.1:{port}") == MiB
    s = tcp_from("127.0.0.2", port)
    assert not greeted(s)  # closed before a byte was read or sent
    s.close()
    # the devio stream front end: same listener, same check
    with w.Client(sock=tcp_from("127.0.0.1", port2)) as c:
        assert c.info()[0] == MiB
    with w.Client(sock=tcp_from("127.0.0.2", port2)) as c:
        assert c.at_eof()
    wait_for(lambda: srv.stderr().count("refusing 127.0.0.2: not in --allow") == 2, 10, "refusals logged")
    assert srv.stop() == 0


def test_allow_ipv6_and_v4_mapped(serve):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    srv = serve("ram:2M", "--nbd", f"tcp:[::1]:{port}", "--allow", "::1")
    wait_for(lambda: "serving 1 export" in srv.stderr() or srv.proc.poll() is not None, 10, "listening")
    assert srv.proc.poll() is None, srv.stderr()
    assert nbdinfo_size(f"nbd://[::1]:{port}") == 2 * MiB
    s = tcp_from("::1", port, "::1", socket.AF_INET6)
    assert greeted(s)
    s.close()
    # v4 peers are compared v4-mapped: a v6 entry ::ffff:a.b.c.d admits them
    port2 = free_port()
    srv2 = serve("ram:3M", "--nbd", f"tcp:127.0.0.1:{port2}", "--allow", "::ffff:127.0.0.2/128")
    srv2.wait_tcp(port2)
    s = tcp_from("127.0.0.2", port2)
    assert greeted(s)
    s.close()
    s = tcp_from("127.0.0.1", port2)
    assert not greeted(s)
    s.close()
    assert "refusing 127.0.0.1: not in --allow" in srv2.stderr()
    assert srv.stop() == 0 and srv2.stop() == 0


def test_allow_rejects_bad_entries(serve):
    for bad in ("10.0.0.1/33", "10.0.0.1/8", "::1/129", "nothost", "10.0.0.0/x"):
        srv = serve("ram:1M", "--nbd", "tcp:127.0.0.1:0", "--allow", bad)
        assert srv.proc.wait(timeout=20) == 2, bad
        assert "--allow" in srv.stderr()


# ---- files: sockets, status, FUSE ----


def test_sockets_and_status_file_are_0600_under_umask_000(serve, tmp):
    nsock, dsock, gsock = (os.path.join(tmp, n) for n in ("n.sock", "d.sock", "g.sock"))
    old = os.umask(0)
    try:
        srv = serve("ram:1M", "--nbd", f"unix:{nsock}", "--devio", f"unix:{dsock}")
        srv2 = serve("ram:1M", "--nbd", f"unix:{gsock}", "--socket-mode", "0660", "--socket-group", "nogroup")
        srv.wait_unix(nsock)
        srv.wait_unix(dsock)
        srv2.wait_unix(gsock)
    finally:
        os.umask(old)
    for p in (nsock, dsock):
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid(), (p, oct(st.st_mode))
    st = os.stat(gsock)
    import grp
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam("nogroup").gr_gid
    status = f"/run/devio/{srv.proc.pid}.status"
    wait_for(lambda: os.path.exists(status), 10, "status file")
    assert stat.S_IMODE(os.stat(status).st_mode) == 0o600
    assert nbdinfo_size(f"nbd+unix:///?socket={nsock}") == MiB
    # another user cannot connect: the socket is the server user's alone
    r = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "nbdinfo",
                        "--size", f"nbd+unix:///?socket={nsock}"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "ermission denied" in r.stderr
    assert srv.stop() == 0 and srv2.stop() == 0


def as_nobody(*cmd):
    return subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"] + list(cmd),
                          capture_output=True, text=True, timeout=30)


def fuse_up(serve, tmp, img, *extra):
    mnt = os.path.join(tmp, "mnt")
    os.makedirs(mnt, exist_ok=True)
    srv = serve(img, "--fuse", mnt, *extra)
    disk = os.path.join(mnt, "disk")
    wait_for(lambda: f"{mnt}/disk" in srv.stderr() or srv.proc.poll() is not None, 30, "fuse ready")
    assert srv.proc.poll() is None, srv.stderr()
    return srv, disk


def test_fuse_file_keeps_the_image_owner_and_mode(serve, tmp):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    img = os.path.join(tmp, "secret.img")
    with open(img, "wb") as f:
        f.write(b"s" * MiB)
    os.chmod(img, 0o600)
    srv, disk = fuse_up(serve, tmp, img)
    try:
        st = os.stat(disk)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        with open(disk, "rb") as f:
            assert f.read(4) == b"ssss"
        r = as_nobody("cat", disk)  # no allow_other: others do not pass the mount
        assert r.returncode != 0 and "ermission denied" in r.stderr
    finally:
        assert srv.stop() == 0
    # asked for: other users pass the mount, and the mode decides
    srv, disk = fuse_up(serve, tmp, img, "--allow-other")
    try:
        assert as_nobody("cat", disk).returncode != 0  # still 0600
    finally:
        assert srv.stop() == 0
    srv, disk = fuse_up(serve, tmp, img, "--allow-other", "--fuse-mode", "0644")
    try:
        assert stat.S_IMODE(os.stat(disk).st_mode) == 0o644
        r = as_nobody("head", "-c", "4", disk)
        assert r.returncode == 0 and r.stdout == "ssss"
    finally:
        assert srv.stop() == 0


# ---- --user ----


def proc_ids(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError(key)


def test_user_drops_root_and_still_serves(serve, tmp):
    import pwd
    nobody = pwd.getpwnam("nobody")
    img = os.path.join(tmp, "d.img")
    with open(img, "wb") as f:
        f.write(b"u" * MiB)
    os.chmod(img, 0o600)  # opened as root before the drop
    sock = os.path.join(tmp, "n.sock")
    srv = serve(img, "--nbd", f"unix:{sock}", "--user", "nobody")
    srv.wait_unix(sock)
    wait_for(lambda: "running as user nobody" in srv.stderr() or srv.proc.poll() is not None, 10, "drop")
    assert srv.proc.poll() is None, srv.stderr()
    pid = srv.proc.pid
    assert proc_ids(pid, "Uid") == [nobody.pw_uid] * 4
    assert proc_ids(pid, "Gid") == [nobody.pw_gid] * 4
    with open(f"/proc/{pid}/status") as f:
        caps = {l.split(":")[0]: l.split()[1] for l in f if l.startswith("Cap")}
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", "-c", "read -P 0x42 0 4k",
                        f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    assert srv.stop() == 0
    with open(img, "rb") as f:
        assert f.read(4) == b"BBBB"


def test_user_refuses_fuse(serve, tmp):
    srv = serve("ram:1M", "--fuse", tmp, "--user", "nobody")
    assert srv.proc.wait(timeout=20) == 1
    assert "--user: not with --fuse" in srv.stderr()
    srv = serve("ram:1M", "--nbd", "tcp:127.0.0.1:0", "--user", "no-such-user-here")
    assert srv.proc.wait(timeout=20) == 2
    assert "no user 'no-such-user-here'" in srv.stderr()


# ---- limits per client ----


def test_handshake_never_and_slowloris_are_dropped(serve):
    port, port2 = free_port(), free_port()
    srv = serve("ram:1M", "--nbd", f"tcp:127.0.0.1:{port}", "--devio", f"tcp:127.0.0.1:{port2}",
                "--handshake-timeout", "1", "--stall-timeout", "2")
    srv.wait_tcp(port)
    never = tcp_from("127.0.0.1", port)
    assert greeted(never)
    never_devio = tcp_from("127.0.0.1", port2)
    slow = tcp_from("127.0.0.1", port)
    assert nbd_negotiate(slow) == MiB
    slow.sendall(nbd_read_req(1, 0, 4096)[:14])  # half a request header, then nothing
    idle = tcp_from("127.0.0.1", port)
    assert nbd_negotiate(idle) == MiB  # negotiated and idle: a client, kept
    slow_devio = w.Client(sock=tcp_from("127.0.0.1", port2))
    assert slow_devio.info()[0] == MiB
    slow_devio.send(b"\x02\x00\x00")  # a third of a request code
    assert at_eof(never, 15) and at_eof(never_devio, 15)
    assert at_eof(slow, 15) and slow_devio.at_eof(15)
    out = srv.stderr()
    assert "no handshake within 1 s" in out
    assert "stuck in the middle of a request for 2 s" in out
    # the idle client outlived the stall timeout and is still served
    idle.sendall(nbd_read_req(7, 0, 512))
    reply = b""
    idle.settimeout(10)
    while len(reply) < 16 + 512:
        b = idle.recv(65536)
        assert b
        reply += b
    assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 7)
    for s in (never, never_devio, slow, idle):
        s.close()
    slow_devio.close()
    assert srv.stop() == 0


def test_idle_timeout_when_asked(serve, tmp):
    sock = os.path.join(tmp, "d.sock")
    srv = serve("ram:1M", "--devio", f"unix:{sock}", "--idle-timeout", "1")
    srv.wait_unix(sock)
    with w.Client(path=sock) as c:
        assert c.info()[0] == MiB
        assert c.at_eof(15)
    assert "idle for 1 s" in srv.stderr()
    assert srv.stop() == 0


def test_500_idle_connections_leave_room_after_the_handshake_deadline(serve, tmp):
    nsock, dsock = os.path.join(tmp, "n.sock"), os.path.join(tmp, "d.sock")
    srv = serve("ram:1M", "--nbd", f"unix:{nsock}", "--devio", f"unix:{dsock}", "--handshake-timeout", "2")
    srv.wait_unix(nsock)
    srv.wait_unix(dsock)
    held = []
    try:
        for i in range(500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.settimeout(None)  # blocking: waits while the backlog is full (the server accepts on)
            s.connect(nsock if i % 2 == 0 else dsock)
        # the caps (128 NBD, 64 devio) are full of clients that say nothing; the
        # rest were closed at once.  Within the deadline new clients get in again.
        wait_for(lambda: nbdinfo_size(f"nbd+unix:///?socket={nsock}") == MiB, 30, "NBD client served")

        def devio_ok():
            try:
                with w.Client(path=dsock, timeout=5) as c:
                    return c.info()[0] == MiB
            except (OSError, w.ProtocolError):
                return False
        wait_for(devio_ok, 30, "devio client served")
        out = srv.stderr()
        assert "refusing a client" in out and "no handshake within 2 s" in out
        assert out.count("refusing a client") < 40  # rate-limited: 1st, 2nd, 4th ... per listener
    finally:
        for s in held:
            s.close()
    assert srv.stop() == 0


def test_memory_bounded_under_a_client_that_never_reads(serve, tmp):
    img = os.path.join(tmp, "big.img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    port = free_port()
    srv = serve(img, "--nbd", f"tcp:127.0.0.1:{port}", "--stall-timeout", "4")
    srv.wait_tcp(port)
    pid = srv.proc.pid
    assert nbdinfo_size(f"nbd://127.0.0.1:{port}") == 64 * MiB
    base = vmrss(pid)
    hog = tcp_from("127.0.0.1", port)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert nbd_negotiate(hog) == 64 * MiB
    reqs = b"".join(nbd_read_req(i, 0, 32 * MiB) for i in range(10000))
    hog.settimeout(30)
    hog.sendall(reqs)  # 280 KB of requests for 320 GB of replies, never read
    time.sleep(1)
    peak = vmrss(pid)
    # others are served meanwhile
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x17 1M 64k", "-c", "read -P 0x17 1M 64k",
                        f"nbd://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    peak = max(peak, vmrss(pid))
    # 64 MiB of reply buffers per connection at most (plus socket buffers and
    # the sanitizers' bookkeeping), where 64 unread 32 MiB replies were 2 GiB
    assert peak - base < 200 * MiB, (base, peak)
    # not taking its replies: dropped by --stall-timeout (reading them here
    # would make it a client again), and `devio status` counts it gone
    status = f"/run/devio/{pid}.status"

    def conns(n):
        return os.path.exists(status) and f" {n} connection{'' if n == 1 else 's'}," in open(status).read()
    wait_for(lambda: conns(1), 30, "the hog alone connected")
    wait_for(lambda: conns(0), 30, "hog dropped")
    hog.close()
    assert nbdinfo_size(f"nbd://127.0.0.1:{port}") == 64 * MiB
    assert srv.stop() == 0


def test_out_of_descriptors_spares_served_clients_and_other_front_ends(serve, tmp):
    import resource
    nsock, dsock = os.path.join(tmp, "n.sock"), os.path.join(tmp, "d.sock")
    srv = serve("ram:1M", "--nbd", f"unix:{nsock}", "--devio", f"unix:{dsock}")
    srv.wait_unix(nsock)
    srv.wait_unix(dsock)
    pid = srv.proc.pid
    served = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    served.settimeout(10)
    served.connect(nsock)
    assert nbd_negotiate(served) == MiB
    time.sleep(0.5)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), hard))
    waiting = []
    try:
        for path in (dsock, nsock, dsock, nsock):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.append(s)
            s.connect(path)  # queued in the backlog: accept() fails with EMFILE
        wait_for(lambda: srv.stderr().count("Too many open files") >= 2, 20, "EMFILE logged")
        time.sleep(1)
        assert srv.stderr().count("accept:") < 12  # paused, not spinning
        served.sendall(nbd_read_req(5, 0, 4096))  # the client being served goes on
        got = b""
        while len(got) < 16 + 4096:
            b = served.recv(65536)
            assert b
            got += b
        assert struct.unpack(">IIQ", got[:16]) == (0x67446698, 0, 5)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        for s in waiting:
            s.close()
        served.close()
    assert nbdinfo_size(f"nbd+unix:///?socket={nsock}") == MiB  # both front ends accept again
    with w.Client(path=dsock) as c:
        assert c.info()[0] == MiB
    assert srv.proc.poll() is None and srv.stop() == 0
