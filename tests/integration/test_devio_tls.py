"""test_devio_tls.py - the devio protocol on a network (docs/security.md,
docs/devio-protocol.md "TLS"): `devio serve --devio tls:HOST:PORT` with
X.509 and PSK against our client (devio+tls:// for info, cat, copy, the
devio+tls:// backend re-exported over NBD to nbdinfo, qemu-img and fio,
its reconnection, `devio attach --fuse --loop`), the refusals (a plaintext client, a wrong PSK, an
unknown user, a client certificate from another CA, a server certificate
for another name) with the server still serving; the warning for
plaintext off loopback (not for tls: or loopback), and for TLS credentials
nothing uses (--devio tcp: alone); the dual-stack tcp:[::]
listener and --allow with v4-mapped peers; the shm control socket's
limits (a silent client dropped at the handshake deadline, an idle one
at --idle-timeout, --max-connections).

The PKI is test_tls.py's (certtool, psktool)."""
import json
import os
import shutil
import socket
import struct
import subprocess

import pytest

from conftest import DEVIO, free_port, run_ok, wait_for
from test_tls import pki, image, digest, fails  # noqa: F401  (pki, image: test_tls.py's fixtures)
from test_shm import PyClient, shm_path, shm_name, scratch  # noqa: F401  (scratch: a fixture)
from test_attach import write_read_detach

pytestmark = pytest.mark.skipif(not shutil.which("certtool") or not shutil.which("psktool"),
                                reason="certtool/psktool (gnutls-bin) not installed")

MiB = 1 << 20


def start_tls(serve, source, *tls, port=None):
    port = port or free_port()
    srv = serve(source, "--devio", f"tls:127.0.0.1:{port}", *tls)
    srv.wait_tcp(port)
    return srv, port


def x509(port, d, host="localhost"):
    return f"devio+tls://{host}:{port}/?tls-certificates={d}"


def psk(port, f, user="alice"):
    return f"devio+tls://{user}@localhost:{port}?tls-psk-file={f}"


def cat(uri):
    r = subprocess.run([DEVIO, "cat", uri], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def reexport(serve, tmp_path, uri, *extra):
    sock = str(tmp_path / "re.sock")
    near = serve(uri, "--nbd", f"unix:{sock}", *extra)
    near.wait_unix(sock)
    return near, f"nbd+unix:///?socket={sock}"


# ---- round trips ----

def test_x509_info_cat_copy_and_reexport(serve, pki, image, tmp_path):
    good = pki["good"]
    srv, port = start_tls(serve, image, "--tls-certificates", good, "--tls-verify-peer")
    u = x509(port, good)
    out = run_ok(DEVIO, "info", u)
    assert "size: 4194304" in out and "TLS X.509" in out
    assert digest(cat(u)) == digest(image)
    new = os.urandom(4 * MiB)
    src = tmp_path / "new.img"
    src.write_bytes(new)
    run_ok(DEVIO, "copy", str(src), u)            # a write through TLS
    assert digest(image) == digest(new)
    back = str(tmp_path / "back.img")
    run_ok(DEVIO, "copy", u, back)               # read back through TLS
    assert digest(back) == digest(new)
    # the devio+tls:// backend, re-exported to independent NBD clients
    near, nu = reexport(serve, tmp_path, u)
    assert "export-size: 4194304" in run_ok("nbdinfo", nu)
    assert "identical" in run_ok("qemu-img", "compare", "-f", "raw", "-F", "raw", nu, str(src))
    assert srv.proc.poll() is None and near.proc.poll() is None
    log = srv.stderr()
    assert "TLS required before the first request (X.509" in log and "ImDisk clients cannot connect" in log


def test_psk_info_cat_copy_and_reexport(serve, pki, image, tmp_path):
    srv, port = start_tls(serve, image, "--tls-psk", pki["psk"])
    u = psk(port, pki["psk"])
    assert "TLS PSK" in run_ok(DEVIO, "info", u)
    assert digest(cat(u)) == digest(image)
    # the user name as a parameter instead of USER@
    assert "size: 4194304" in run_ok(DEVIO, "info", f"devio+tls://localhost:{port}?tls-psk-file={pki['psk']}"
                                                    "&tls-username=alice")
    near, nu = reexport(serve, tmp_path, u)
    copy = str(tmp_path / "copy.img")
    run_ok("qemu-img", "convert", "-f", "raw", "-O", "raw", nu, copy)
    assert digest(copy) == digest(image)
    assert srv.proc.poll() is None


def test_large_copy_and_fio_verify_through_tls(serve, pki, tmp_path):
    """64 MiB both ways through TLS, then fio verify through the devio+tls://
    backend (its pool of connections, requests in parallel) re-exported
    over NBD."""
    disk = str(tmp_path / "big.img")
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    srv, port = start_tls(serve, disk, "--tls-psk", pki["psk"])
    u = psk(port, pki["psk"])
    data = str(tmp_path / "data.img")
    with open(data, "wb") as f:
        f.write(os.urandom(64 * MiB))
    run_ok(DEVIO, "copy", data, u, timeout=300)
    assert digest(disk) == digest(data)
    out = str(tmp_path / "out.img")
    run_ok(DEVIO, "copy", u, out, timeout=300)
    assert digest(out) == digest(data)
    near, nu = reexport(serve, tmp_path, u)
    r = subprocess.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={nu}", "--rw=randwrite", "--bs=64k",
                        "--size=16M", "--iodepth=16", "--numjobs=2", "--offset_increment=32M",
                        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting",
                        "--verify_state_save=0", "--output-format=json"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 32 * MiB
    assert srv.proc.poll() is None and near.proc.poll() is None


def test_reexport_rides_out_a_tls_server_restart(serve, pki, image, tmp_path):
    """The devio+tls:// backend's reconnect path: every new connection
    runs the handshake again."""
    port = free_port()
    srv, _ = start_tls(serve, image, "--tls-psk", pki["psk"], port=port)
    near, nu = reexport(serve, tmp_path, psk(port, pki["psk"]), "--remote-timeout", "30")
    assert "export-size: 4194304" in run_ok("nbdinfo", nu)
    srv.stop()
    srv2, _ = start_tls(serve, image, "--tls-psk", pki["psk"], port=port)
    copy = str(tmp_path / "copy.img")
    run_ok("nbdcopy", nu, copy)
    assert digest(copy) == digest(image)
    assert near.proc.poll() is None
    assert "reconnected after" in near.stderr() and "client connected" in srv2.stderr()


def test_attach_fuse_loop_over_tls(serve, pki, scratch, tmp_path):
    """devio attach devio+tls:// --fuse --loop: 8 MiB written through the
    loop device and read back, then detached; the bytes are in the image."""
    disk = str(tmp_path / "att.img")
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    srv, port = start_tls(serve, disk, "--tls-psk", pki["psk"])
    write_read_detach(scratch, psk(port, pki["psk"]))
    with open(disk, "rb") as f:
        assert f.read(8 * MiB) != bytes(8 * MiB)
    assert srv.proc.poll() is None


# ---- refusals, the server serving on ----

def test_refusals_leave_the_server_serving(serve, pki, image):
    good = pki["good"]
    srv, port = start_tls(serve, image, "--tls-certificates", good, "--tls-verify-peer")
    fails(DEVIO, "info", f"devio://127.0.0.1:{port}")                 # plaintext devio client
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # raw INFO request, no TLS
        s.sendall(struct.pack("<Q", 1))
        back = s.recv(64)
        assert back == b"" or back[0] == 0x15, back  # a TLS alert or nothing, never INFO's answer
    fails(DEVIO, "info", x509(port, pki["other"]))                     # client cert from another CA
    fails(DEVIO, "info", x509(port, pki["expired"]))                   # expired client cert
    assert "size: 4194304" in run_ok(DEVIO, "info", x509(port, good))
    assert srv.proc.poll() is None
    # our client refuses a server certificate for another name
    wsrv, wport = start_tls(serve, image, "--tls-certificates", pki["wrongname"])
    err = fails(DEVIO, "info", x509(wport, good))
    assert "handshake failed" in err
    # PSK: a wrong key, an unknown user, then the right one
    psrv, pport = start_tls(serve, image, "--tls-psk", pki["psk"])
    fails(DEVIO, "info", psk(pport, pki["badpsk"]))
    fails(DEVIO, "info", psk(pport, pki["psk"], user="mallory"), says="no key for user")
    fails(DEVIO, "info", f"devio://127.0.0.1:{pport}")
    assert digest(cat(psk(pport, pki["psk"]))) == digest(image)
    assert psrv.proc.poll() is None
    assert "handshake failed" in psrv.stderr()


def test_bad_uris_and_missing_credentials(serve, pki, image, tmp_path):
    port = free_port()
    fails(DEVIO, "info", f"devio://127.0.0.1:{port}?tls-psk-file={pki['psk']}", says="belongs to devio+tls://")
    fails(DEVIO, "info", f"devio://alice@127.0.0.1:{port}", says="use devio+tls://")
    fails(DEVIO, "info", f"devio+tls://127.0.0.1:{port}?tls-psk-file=a&tls-certificates=b", says="exclude")
    fails(DEVIO, "info", f"devio+tls://127.0.0.1:{port}?tls-psk-file=%00", says="%00")
    fails(DEVIO, "info", f"devio+tls://127.0.0.1:{port}?tls-bogus=1", says="unknown query parameter")
    r = subprocess.run([DEVIO, "serve", image, "--devio", f"tls:127.0.0.1:{port}"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "--tls-certificates DIR or --tls-psk FILE" in r.stderr


def test_imdisk_command_line_never_offers_tls(image, pki):
    """ImDisk's own command line has no TLS: its options are refused there,
    and a tls: word is no TCP port (it would name a device)."""
    r = subprocess.run([DEVIO, "--tls-psk", pki["psk"], "9000", image], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    r = subprocess.run([DEVIO, "tls:9000", image], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "TLS required" not in r.stderr


# ---- the plaintext warning, dual stack ----

@pytest.mark.parametrize("scheme,host,warned", [
    ("tcp", "192.0.2.1", True),    # plaintext on a network address
    ("tls", "192.0.2.1", False),   # encrypted there
    ("tcp", "127.0.0.1", False),   # plaintext on loopback
])
def test_plaintext_off_loopback_is_warned_about(serve, tmp_path, pki, scheme, host, warned):
    """--devio tcp: on anything but loopback says the protocol is open
    to whoever reaches it, unencrypted, and that ImDisk clients cannot
    speak TLS; a tls: listener and a loopback one get no such warning.
    192.0.2.1 (TEST-NET-1) is on no interface, so the bind fails after
    the warning: nothing is exposed by the test."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    port = free_port()
    tls = ["--tls-psk", pki["psk"]] if scheme == "tls" else []
    srv = serve(str(img), "--devio", f"{scheme}:{host}:{port}", *tls)
    if host == "127.0.0.1":
        srv.wait_tcp(port)
        assert srv.stop() == 0
    else:
        wait_for(lambda: srv.proc.poll() is not None, 30, "the bind to fail")
        assert srv.proc.returncode != 0
    out = srv.stderr()
    for words in ("no encryption", "no authentication", "ImDisk clients cannot speak TLS", "unencrypted"):
        assert (words in out) == warned, out
    assert ("TLS required" in out) == (scheme == "tls"), out


@pytest.mark.parametrize("devio_addr,nbd,warned", [
    ("tcp", False, True),    # nothing uses the credentials
    ("tcp", True, False),    # --nbd does
    ("tls", False, False),   # --devio tls: does
])
def test_tls_credentials_nothing_uses_are_warned_about(serve, tmp_path, pki, devio_addr, nbd, warned):
    """--tls-psk with --devio tcp: alone has no effect: one warning line
    that says so; none where --nbd or a tls: address takes it."""
    port = free_port()
    sock = str(tmp_path / "nbd.sock")
    srv = serve("ram:1M", "--devio", f"{devio_addr}:127.0.0.1:{port}", "--tls-psk", pki["psk"],
                *(["--nbd", f"unix:{sock}"] if nbd else []))
    srv.wait_tcp(port)
    assert srv.stop() == 0
    warnings = [l for l in srv.stderr().splitlines() if "has no effect" in l]
    expect = [f"devio: warning: --tls-psk has no effect on --devio tcp:127.0.0.1:{port}, and no other front end "
              "here uses it"]
    assert warnings == (expect if warned else []), srv.stderr()


def have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 loopback")
def test_dual_stack_wildcard_and_allow_with_v4_mapped_peers(serve, image):
    """tcp:[::]:PORT takes IPv4 and IPv6 clients on one socket; --allow
    127.0.0.1 admits the v4 client (seen as ::ffff:127.0.0.1) and not ::1.
    The test binds the wildcard but only ever connects over loopback."""
    port = free_port()
    srv = serve(image, "--devio", f"tcp:[::]:{port}")
    srv.wait_tcp(port)
    assert "size: 4194304" in run_ok(DEVIO, "info", f"devio://127.0.0.1:{port}")
    assert "size: 4194304" in run_ok(DEVIO, "info", f"devio://[::1]:{port}")
    srv.stop()
    port = free_port()
    srv = serve(image, "--devio", f"tcp:[::]:{port}", "--allow", "127.0.0.1")
    srv.wait_tcp(port)
    assert "size: 4194304" in run_ok(DEVIO, "info", f"devio://127.0.0.1:{port}")
    fails(DEVIO, "info", f"devio://[::1]:{port}")
    assert "refusing ::1: not in --allow" in srv.stderr()
    srv.stop()
    # NBD on the same listener code, an independent client over both families
    port = free_port()
    srv = serve(image, "--nbd", f"tcp:*:{port}", "--allow", "::1", "--allow", "127.0.0.0/8")
    srv.wait_tcp(port)
    assert "export-size: 4194304" in run_ok("nbdinfo", f"nbd://127.0.0.1:{port}")
    assert "export-size: 4194304" in run_ok("nbdinfo", f"nbd://[::1]:{port}")
    srv.stop()
    port = free_port()
    srv = serve(image, "--nbd", f"tcp:*:{port}", "--allow", "::1")
    srv.wait_tcp(port)
    fails("nbdinfo", f"nbd://127.0.0.1:{port}")
    assert "refusing 127.0.0.1: not in --allow" in srv.stderr()   # v4-mapped, logged as IPv4


# ---- the shm control socket's limits ----

def test_shm_silent_client_dropped_at_the_handshake_deadline(serve, tmp_path):
    sock = str(tmp_path / "s.sock")
    srv = serve("ram:1M", "--devio", f"shm:{sock}", "--handshake-timeout", "1")
    srv.wait_unix(sock)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    try:
        s.connect(sock)
        assert len(s.recv(4096)) == 128          # the hello, then nothing from us
        assert s.recv(16) == b""                 # dropped: EOF
    finally:
        s.close()
    assert "no request within 1 s" in srv.stderr()
    assert "size: 1048576" in run_ok(DEVIO, "info", f"devio+shm://{sock}")  # ours sends one at once
    assert srv.proc.poll() is None


def test_shm_idle_timeout_and_max_connections(serve):
    name = shm_name()
    path = shm_path(name)
    srv = serve("ram:1M", "--devio", f"shm:{name},slots=1,buffer=4K", "--idle-timeout", "1",
                "--max-connections", "1")
    srv.wait_unix(path)
    c = PyClient(path)
    try:
        assert c.request(0, 2, 0, 8) == (0, 8)   # a first request, then idle
        r = subprocess.run([DEVIO, "info", "devio+shm://" + name], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "refuses" in r.stderr, r.stderr   # the one connection is taken
        wait_for(lambda: "idle for 1 s" in srv.stderr(), 30, "the idle client dropped")
    finally:
        c.close()
    wait_for(lambda: subprocess.run([DEVIO, "info", "devio+shm://" + name], capture_output=True,
                                    timeout=30).returncode == 0, 10, "a free region")
    assert srv.proc.poll() is None
