"""test_tls.py - NBD over TLS (docs/nbd.md "TLS"): `devio serve --nbd ...
--tls require` against independent clients (nbdinfo, nbdcopy, qemu-img with
tls-creds-x509/-psk, Python's ssl after a raw STARTTLS) over X.509 and PSK;
the refusals (a plaintext client, a wrong PSK, a client certificate from
another CA, an expired certificate, options before STARTTLS), each with the
server still serving others; our client (nbds://) against nbdkit, qemu-nbd
and our server, refusing a server certificate for another name.

Certificates are made here with certtool into a temporary directory (one
PKI for the module), PSK files with psktool."""
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess

import pytest

from conftest import DEVIO, free_port, run_ok, wait_for, port_open

pytestmark = pytest.mark.skipif(not shutil.which("certtool") or not shutil.which("psktool"),
                                reason="certtool/psktool (gnutls-bin) not installed")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR = 1, 2, 3, 5, 6, 7, 8
REP_ACK, REP_SERVER = 1, 2
REP_ERR_TLS_REQD = (1 << 31) | 5
MiB = 1 << 20


def certtool(*args):
    run_ok("certtool", *args)


def template(d, name, text):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def make_ca(d, cn):
    os.makedirs(d, exist_ok=True)
    certtool("--generate-privkey", "--key-type", "ecdsa", "--outfile", f"{d}/ca-key.pem")
    t = template(d, "ca.info", f"cn = {cn}\nca\ncert_signing_key\nexpiration_days = 3\n")
    certtool("--generate-self-signed", "--load-privkey", f"{d}/ca-key.pem", "--template", t,
             "--outfile", f"{d}/ca-cert.pem")


def make_cert(ca, d, prefix, info):
    """d/PREFIX-cert.pem and d/PREFIX-key.pem signed by the CA in ca; d gets
    that CA's ca-cert.pem."""
    os.makedirs(d, exist_ok=True)
    if os.path.abspath(ca) != os.path.abspath(d):
        shutil.copy(f"{ca}/ca-cert.pem", f"{d}/ca-cert.pem")
    certtool("--generate-privkey", "--key-type", "ecdsa", "--outfile", f"{d}/{prefix}-key.pem")
    t = template(d, f"{prefix}.info", info)
    certtool("--generate-certificate", "--load-ca-certificate", f"{ca}/ca-cert.pem",
             "--load-ca-privkey", f"{ca}/ca-key.pem", "--load-privkey", f"{d}/{prefix}-key.pem",
             "--template", t, "--outfile", f"{d}/{prefix}-cert.pem")


SERVER = "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n" \
         "encryption_key\nsigning_key\nexpiration_days = 3\n"
CLIENT = "cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 3\n"
EXPIRED = 'activation_date = "2020-01-01 00:00:00"\nexpiration_date = "2021-01-01 00:00:00"\n'


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """good: CA, server and client certificates (the layout nbdkit and qemu
    use: one directory); other: a client certificate from another CA;
    expired: the good CA's server and client certificates, long expired;
    wrongname: a server certificate for another host; psk: alice's key;
    badpsk: another key for alice."""
    base = str(tmp_path_factory.mktemp("pki"))
    p = {k: os.path.join(base, k) for k in ("good", "other", "expired", "wrongname")}
    make_ca(p["good"], "devio test CA")
    make_cert(p["good"], p["good"], "server", SERVER)
    make_cert(p["good"], p["good"], "client", CLIENT)
    make_ca(os.path.join(base, "otherca"), "another CA")
    make_cert(os.path.join(base, "otherca"), p["other"], "client", CLIENT)
    shutil.copy(f"{p['good']}/ca-cert.pem", f"{p['other']}/ca-cert.pem")  # trusts our server
    make_cert(p["good"], p["expired"], "server", SERVER.replace("expiration_days = 3\n", EXPIRED))
    make_cert(p["good"], p["expired"], "client", CLIENT.replace("expiration_days = 3\n", EXPIRED))
    make_cert(p["good"], p["wrongname"], "server",
              "cn = elsewhere\ndns_name = elsewhere.example\ntls_www_server\nencryption_key\n"
              "signing_key\nexpiration_days = 3\n")
    for k in ("psk", "badpsk"):
        d = os.path.join(base, k)
        os.makedirs(d)
        run_ok("psktool", "-u", "alice", "-p", f"{d}/keys.psk")
        p[k] = f"{d}/keys.psk"
    p["base"] = base
    return p


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    return path


def start(serve, image, *tls, port=None):
    port = port or free_port()
    srv = serve(image, "--nbd", f"tcp:127.0.0.1:{port}", *tls)
    srv.wait_tcp(port)
    return srv, port


def digest(path_or_bytes):
    import hashlib
    if isinstance(path_or_bytes, bytes):
        return hashlib.sha256(path_or_bytes).hexdigest()
    with open(path_or_bytes, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fails(*args, says=None):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, f"{args} succeeded:\n{r.stdout}"
    if says:
        assert says in r.stderr, r.stderr
    return r.stderr


def x509_uri(port, d, host="localhost"):
    return f"nbds://{host}:{port}/?tls-certificates={d}"


def psk_uri(port, f):
    return f"nbds://alice@localhost:{port}/?tls-psk-file={f}"


def qemu_img_info(port, obj):
    out = run_ok("qemu-img", "info", "--output=json", "--object", obj, "--image-opts",
                 f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0")
    return out


# ---- independent clients against our server ----

def test_x509_nbdinfo_nbdcopy_qemu_img_and_ours(serve, pki, image, tmp_path):
    good = pki["good"]
    srv, port = start(serve, image, "--tls", "require", "--tls-certificates", good, "--tls-verify-peer")
    u = x509_uri(port, good)
    out = run_ok("nbdinfo", u)
    assert "with TLS" in out and "export-size: 4194304" in out
    copy = str(tmp_path / "copy.img")
    run_ok("nbdcopy", u, copy)
    assert digest(copy) == digest(image)
    # a write through TLS, read back through TLS by another client
    new = os.urandom(4 * MiB)
    src = str(tmp_path / "new.img")
    with open(src, "wb") as f:
        f.write(new)
    run_ok("nbdcopy", src, u)
    assert digest(image) == digest(new)
    info = qemu_img_info(port, f"tls-creds-x509,id=tls0,endpoint=client,dir={good}")
    assert '"virtual-size": 4194304' in info
    assert "identical" in run_ok(
        "qemu-img", "compare", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={good}", "--image-opts",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0",
        f"driver=raw,file.driver=file,file.filename={src}")
    # ours: info, cat, copy
    assert "size: 4194304" in run_ok(DEVIO, "info", u)
    r = subprocess.run([DEVIO, "cat", u], capture_output=True, timeout=60)
    assert r.returncode == 0 and digest(r.stdout) == digest(new)
    assert srv.proc.poll() is None


def test_psk_nbdinfo_nbdcopy_qemu_img_and_ours(serve, pki, image, tmp_path):
    srv, port = start(serve, image, "--tls-psk", pki["psk"])  # credentials alone: require
    u = psk_uri(port, pki["psk"])
    assert "with TLS" in run_ok("nbdinfo", u)
    copy = str(tmp_path / "copy.img")
    run_ok("nbdcopy", u, copy)
    assert digest(copy) == digest(image)
    info = qemu_img_info(port, f"tls-creds-psk,id=tls0,endpoint=client,dir={os.path.dirname(pki['psk'])},"
                               "username=alice")
    assert '"virtual-size": 4194304' in info
    r = subprocess.run([DEVIO, "cat", u], capture_output=True, timeout=60)
    assert r.returncode == 0 and digest(r.stdout) == digest(image)
    # a plaintext client is refused (ERR_TLS_REQD), and says so
    fails(DEVIO, "info", f"nbd://127.0.0.1:{port}/", says="the server requires TLS")
    assert srv.proc.poll() is None


# ---- refusals, the server serving on ----

def test_refusals_leave_the_server_serving(serve, pki, image):
    good = pki["good"]
    srv, port = start(serve, image, "--tls", "require", "--tls-certificates", good, "--tls-verify-peer")
    fails("nbdinfo", f"nbd://127.0.0.1:{port}/")                      # plaintext
    fails("nbdinfo", x509_uri(port, pki["other"]))                     # client cert from another CA
    fails("nbdinfo", x509_uri(port, pki["expired"]))                   # expired client cert
    fails(DEVIO, "info", x509_uri(port, pki["other"]))                 # ours, with the foreign cert
    fails("qemu-img", "info", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki['other']}",
          "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0")
    assert "with TLS" in run_ok("nbdinfo", x509_uri(port, good))
    assert srv.proc.poll() is None
    # a wrong PSK, then the right one
    psrv, pport = start(serve, image, "--tls", "require", "--tls-psk", pki["psk"])
    fails("nbdinfo", psk_uri(pport, pki["badpsk"]))
    fails(DEVIO, "info", psk_uri(pport, pki["badpsk"]))
    fails(DEVIO, "info", f"nbds://mallory@localhost:{pport}/?tls-psk-file={pki['psk']}", says="no key for user")
    assert "with TLS" in run_ok("nbdinfo", psk_uri(pport, pki["psk"]))
    assert psrv.proc.poll() is None


class Raw:
    """A client speaking the handshake by hand (the downgrade attempts)."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        magic, opts, flags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opts == IHAVEOPT and flags & 1
        self.s.sendall(struct.pack(">I", 3))

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            b = self.s.recv(n - len(buf))
            if not b:
                raise EOFError
            buf += b
        return buf

    def option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self):
        magic, opt, typ, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPMAGIC
        return opt, typ, self.recv(length)


def go_data(name=b""):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def test_downgrade_options_before_starttls_get_tls_reqd(serve, pki, image):
    """Under require nothing about the exports leaks before TLS: LIST,
    INFO, GO, STRUCTURED_REPLY get ERR_TLS_REQD; EXPORT_NAME ends the
    connection.  Then STARTTLS with Python's ssl (OpenSSL) works, and the
    export is there after it."""
    good = pki["good"]
    srv, port = start(serve, image, "--tls", "require", "--tls-certificates", good)
    r = Raw(port)
    for opt, data in ((OPT_LIST, b""), (OPT_INFO, go_data()), (OPT_GO, go_data()), (OPT_SR, b""),
                      (0x7777, b"abc")):
        r.option(opt, data)
        o, typ, msg = r.reply()
        assert (o, typ) == (opt, REP_ERR_TLS_REQD), (opt, typ, msg)
        assert b"4194304" not in msg
    r.option(OPT_EXPORT_NAME, b"")
    with pytest.raises((EOFError, ConnectionResetError)):
        r.recv(1)
    r.s.close()
    # nbdsh's own downgrade: option mode without TLS, asking for the list
    out = subprocess.run(["nbdsh", "-c", "h.set_opt_mode(True)", "-c", f"h.connect_tcp('127.0.0.1', '{port}')",
                          "-c", "h.opt_list(lambda n, d: print('LEAK', n))"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "LEAK" not in out.stdout
    # STARTTLS, then the handshake with OpenSSL, then LIST answers
    r = Raw(port)
    r.option(OPT_STARTTLS)
    assert r.reply()[:2] == (OPT_STARTTLS, REP_ACK)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(f"{good}/ca-cert.pem")
    r.s = ctx.wrap_socket(r.s, server_hostname="localhost")
    r.option(OPT_LIST)
    opt, typ, data = r.reply()
    assert (opt, typ) == (OPT_LIST, REP_SERVER) and data == struct.pack(">I", 0)
    assert r.reply()[:2] == (OPT_LIST, REP_ACK)
    r.option(OPT_STARTTLS)                                   # twice: refused, connection stays
    assert r.reply()[1] & (1 << 31)
    r.option(OPT_ABORT)
    r.s.close()
    assert srv.proc.poll() is None
    assert "with TLS" in run_ok("nbdinfo", x509_uri(port, good))


def test_garbage_after_starttls_and_a_vanishing_client(serve, pki, image):
    """After the ACK: bytes that are no ClientHello, a client that hangs
    up mid-handshake, one that hangs up after TLS without close_notify:
    each ends only its own connection."""
    srv, port = start(serve, image, "--tls", "require", "--tls-certificates", pki["good"])
    r = Raw(port)
    r.option(OPT_STARTTLS)
    assert r.reply()[:2] == (OPT_STARTTLS, REP_ACK)
    r.s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 20)
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            r.recv(1)
    r.s.close()
    r = Raw(port)
    r.option(OPT_STARTTLS)
    assert r.reply()[:2] == (OPT_STARTTLS, REP_ACK)
    r.s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    r.s.close()
    r = Raw(port)
    r.option(OPT_STARTTLS)
    assert r.reply()[:2] == (OPT_STARTTLS, REP_ACK)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(f"{pki['good']}/ca-cert.pem")
    t = ctx.wrap_socket(r.s, server_hostname="localhost")
    t.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + go_data())
    t.close()
    assert "with TLS" in run_ok("nbdinfo", x509_uri(port, pki["good"]))
    assert srv.proc.poll() is None
    assert "handshake failed" in srv.stderr()


def test_tls_on_serves_both(serve, pki, image):
    srv, port = start(serve, image, "--tls", "on", "--tls-certificates", pki["good"])
    assert "without TLS" in run_ok("nbdinfo", f"nbd://127.0.0.1:{port}/")
    assert "with TLS" in run_ok("nbdinfo", x509_uri(port, pki["good"]))
    # without credentials: refused at start, saying why
    bad = subprocess.run([DEVIO, "serve", image, "--nbd", f"tcp:127.0.0.1:{free_port()}", "--tls", "require"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "--tls-certificates" in bad.stderr


def test_bad_psk_file_refused_at_start(serve, tmp_path, image):
    f = tmp_path / "bad.psk"
    f.write_text("# keys\nalice:00ff\nbob:0g\n")
    os.chmod(f, 0o600)
    r = subprocess.run([DEVIO, "serve", image, "--nbd", f"tcp:127.0.0.1:{free_port()}", "--tls-psk", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "line 3" in r.stderr


# ---- our client against other servers, and the server's name ----

def test_our_client_against_nbdkit_and_qemu_nbd(pki, tmp_path, image):
    good = pki["good"]
    procs = []
    try:
        kport, qport, pport = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(kport), "--tls=require",
                                       f"--tls-certificates={good}", "file", image],
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(pport), "--tls=require",
                                       f"--tls-psk={pki['psk']}", "file", image], stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(qport), "--object",
                                       f"tls-creds-x509,id=tls0,endpoint=server,dir={good},verify-peer=off",
                                       "--tls-creds", "tls0", "-t", image], stderr=subprocess.DEVNULL))
        for p in (kport, qport, pport):
            wait_for(lambda: port_open(p), 20, f"port {p}")
        want = digest(image)
        for u in (x509_uri(kport, good), x509_uri(qport, good), psk_uri(pport, pki["psk"])):
            r = subprocess.run([DEVIO, "cat", u], capture_output=True, timeout=60)
            assert r.returncode == 0, (u, r.stderr)
            assert digest(r.stdout) == want
        # plain nbd:// to a TLS-only server: refused with a hint
        fails(DEVIO, "info", f"nbd://127.0.0.1:{kport}/", says="nbds://")
        # the CA is not the server's: refused
        fails(DEVIO, "info", x509_uri(kport, pki["other"] + "/../otherca"))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_our_client_refuses_a_certificate_for_another_name(serve, pki, image, tmp_path):
    srv, port = start(serve, image, "--tls", "require", "--tls-certificates", pki["wrongname"])
    err = fails(DEVIO, "info", x509_uri(port, pki["good"]))
    assert "handshake failed" in err and "name" in err
    fails("nbdinfo", x509_uri(port, pki["good"]))                      # libnbd agrees
    # an expired server certificate: refused too
    srv2, port2 = start(serve, image, "--tls", "require", "--tls-certificates", pki["expired"])
    err = fails(DEVIO, "info", x509_uri(port2, pki["good"]))
    assert "expired" in err
    # the kernel's nbd client cannot do TLS: attach says so
    r = subprocess.run([DEVIO, "attach", x509_uri(port, pki["good"]), "--nbd-device"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "TLS" in r.stderr
    assert srv.proc.poll() is None


def test_serve_an_nbds_source_over_unix(serve, pki, image, tmp_path):
    """The nbd:// backend over TLS re-exported on a Unix socket."""
    good = pki["good"]
    srv, port = start(serve, image, "--tls", "require", "--tls-certificates", good)
    sock = str(tmp_path / "re.sock")
    front = serve(x509_uri(port, good), "--nbd", f"unix:{sock}")
    front.wait_unix(sock)
    copy = str(tmp_path / "copy.img")
    run_ok("nbdcopy", f"nbd+unix:///?socket={sock}", copy)
    assert digest(copy) == digest(image)


@pytest.mark.parametrize("source,listen", [("ram:64M", "unix"), ("file", "tcp")])
def test_fio_verify_through_tls_two_connections_qd32(serve, pki, tmp_path, source, listen):
    """Data integrity through TLS with the reader and the sender on one
    session at once: the RAM disk (requests run on the reader, in-place
    writes over a Unix socket) and a file (io_uring completions, the
    sender thread), 1 MiB and 4 KiB writes at QD32 on two connections,
    then sizes from 512 bytes to 72 KiB in steps of 512 (replies packed
    into 16 KiB records end mid-reply, and large ones start mid-record),
    every block read back and checked.  fio's nbd engine (libnbd) takes
    the CA from $HOME/.pki/libnbd (it refuses tls-certificates= in a URI)."""
    home = tmp_path / "home"
    os.makedirs(home / ".pki")
    shutil.copytree(pki["good"], home / ".pki" / "libnbd")
    if source == "file":
        source = str(tmp_path / "disk.img")
        with open(source, "wb") as f:
            f.truncate(64 * MiB)
    if listen == "unix":
        sock = str(tmp_path / "tls.sock")
        srv = serve(source, "--nbd", f"unix:{sock}", "--tls", "require", "--tls-certificates", pki["good"])
        srv.wait_unix(sock)
        u = f"nbds+unix:///?socket={sock}"
    else:
        srv, port = start(serve, source, "--tls", "require", "--tls-certificates", pki["good"])
        u = f"nbds://localhost:{port}/"
    env = dict(os.environ, HOME=str(home))
    for bs, size in (("4k-4k", "8M"), ("1m-1m", "24M"), ("512-72k", "8M")):
        r = subprocess.run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={u}", "--rw=randwrite", f"--bsrange={bs}",
                            f"--size={size}", "--iodepth=32", "--numjobs=2", "--offset_increment=32M",
                            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting",
                            "--verify_state_save=0", "--output-format=json"],
                           capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
        want = 2 * int(size[:-1]) * MiB
        assert job["error"] == 0 and job["write"]["io_bytes"] == want and job["read"]["io_bytes"] == want, bs
    assert srv.proc.poll() is None


def test_list_over_tls_as_nbdinfo_lists(serve, pki, image):
    """devio list nbds://: STARTTLS first (the server requires it), then
    NBD_OPT_LIST: the same names as nbdinfo --list; a wrong key is refused."""
    port = free_port()
    srv = serve(image, "--export", f"two={image}", "--nbd", f"tcp:127.0.0.1:{port}",
                "--tls", "require", "--tls-psk", pki["psk"])
    srv.wait_tcp(port)
    ours = json.loads(run_ok(DEVIO, "list", "--json", psk_uri(port, pki["psk"])))
    theirs = json.loads(run_ok("nbdinfo", "--list", "--json", psk_uri(port, pki["psk"])))
    names = sorted(e["name"] for e in ours["exports"])
    assert names == ["", "two"] == sorted(e["export-name"] for e in theirs["exports"])
    fails(DEVIO, "list", psk_uri(port, pki["badpsk"]))
    assert srv.proc.poll() is None
