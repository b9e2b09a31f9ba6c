"""test_nbd_remote.py - the NBD client backend (nbd://, nbd+unix://):
devio info/copy against a devio NBD server and against nbdkit and
qemu-nbd, a devio server re-exporting another NBD server with many
requests in flight, and what happens when the far server goes away."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest

from conftest import DEVIO, free_port, wait_for

MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-nbdr-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(*args, timeout=120, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def random_file(path, size, seed):
    block = hashlib.sha512(str(seed).encode()).digest() * 2048  # 128 KiB
    with open(path, "wb") as f:
        for pos in range(0, size, len(block)):
            f.write(block[:min(len(block), size - pos)])


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_info_and_copy_through_devio_server(serve, tmp):
    sock = os.path.join(tmp, "a.sock")
    serve("ram:8M", "--export", "small=ram:1M", "--nbd", f"unix:{sock}").wait_unix(sock)
    out = run(DEVIO, "info", f"nbd+unix:///small?socket={sock}").stdout
    assert "size: 1048576" in out
    src = os.path.join(tmp, "src.bin")
    random_file(src, 5 * MiB + 512, 1)
    run(DEVIO, "copy", src, f"nbd+unix:///?socket={sock}")
    back = os.path.join(tmp, "back.bin")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={sock}", back)
    with open(back, "rb") as f, open(src, "rb") as g:
        a, b = f.read(), g.read()
    assert a[:len(b)] == b and a[len(b):] == bytes(len(a) - len(b))
    r = run(DEVIO, "info", f"nbd+unix:///nosuch?socket={sock}", check=False)
    assert r.returncode != 0


@pytest.mark.parametrize("peer", ["nbdkit", "qemu-nbd"])
def test_copy_from_other_servers(tmp, peer):
    img = os.path.join(tmp, "peer.img")
    random_file(img, 3 * MiB, 2)
    port = free_port()
    if peer == "nbdkit":
        cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", img]
    else:
        cmd = ["qemu-nbd", "-t", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", "disk", img]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        export = "disk" if peer == "qemu-nbd" else ""
        u = f"nbd://127.0.0.1:{port}/{export}"
        wait_for(lambda: run("nbdinfo", "--size", u, check=False).returncode == 0, 10, peer)
        out = os.path.join(tmp, "out.img")
        with open(out, "wb") as f:  # copy writes into an existing image
            f.truncate(3 * MiB)
        run(DEVIO, "copy", u, out)
        assert digest(out) == digest(img)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=10)


def test_reexport_with_requests_in_flight(serve, tmp):
    a = os.path.join(tmp, "a.sock")
    b = os.path.join(tmp, "b.sock")
    serve("ram:64M", "--nbd", f"unix:{a}").wait_unix(a)
    serve(f"nbd+unix:///?socket={a}", "--nbd", f"unix:{b}").wait_unix(b)
    info = json.loads(run("nbdinfo", "--json", f"nbd+unix:///?socket={b}").stdout)["exports"][0]
    assert info["export-size"] == 64 * MiB and info["can_trim"] and info["can_zero"]
    ub = f"nbd+unix:///?socket={b}"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1000 3M", "-c", "write -z 4M 1M",
        "-c", "discard 8M 1M", ub)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 1000 3M", "-c", "read -P 0 4M 1M",
        f"nbd+unix:///?socket={a}")
    # holes travel through: structured replies and base:allocation end to end
    m = json.loads(run("nbdinfo", "--map", "--json", ub).stdout)
    assert m[0]["offset"] == 0 and m[0]["type"] & 1 == 0  # data written at 1000
    assert any(e["type"] & 1 and e["offset"] <= 8 * MiB < e["offset"] + e["length"] for e in m), m
    assert "extents" in run(DEVIO, "info", ub).stdout
    r = run("fio", "--name=chain", "--ioengine=nbd", f"--uri={ub}", "--rw=randwrite", "--bs=4k",
            "--size=8M", "--iodepth=32", "--numjobs=2", "--offset_increment=16M", "--verify=crc32c",
            "--verify_fatal=1", "--verify_state_save=0", "--group_reporting", "--output-format=json",
            timeout=300)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 2 * 8 * MiB


def test_far_server_going_away(serve, tmp):
    a = os.path.join(tmp, "a.sock")
    b = os.path.join(tmp, "b.sock")
    far = serve("ram:8M", "--nbd", f"unix:{a}")
    far.wait_unix(a)
    near = serve(f"nbd+unix:///?socket={a}", "--nbd", f"unix:{b}")
    near.wait_unix(b)
    ub = f"nbd+unix:///?socket={b}"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", ub)
    far.stop(signal.SIGKILL)
    r = run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", ub, check=False)
    assert "error" in (r.stdout + r.stderr).lower() or r.returncode != 0
    # the near server is still up and says so
    assert run("nbdinfo", "--size", ub).stdout.strip() == str(8 * MiB)
    assert near.proc.poll() is None


def test_copy_larger_than_server_maximum(serve, tmp):
    """64 MiB blocks: the client splits them at the server's 32 MiB maximum."""
    sock = os.path.join(tmp, "a.sock")
    serve("ram:48M", "--nbd", f"unix:{sock}").wait_unix(sock)
    u = f"nbd+unix:///?socket={sock}"
    info = json.loads(run("nbdinfo", "--json", u).stdout)["exports"][0]
    assert info["block_size_maximum"] < 64 * MiB
    src = os.path.join(tmp, "src.bin")
    random_file(src, 40 * MiB, 5)
    run(DEVIO, "copy", src, u, "--block-size", "64M")
    back = os.path.join(tmp, "back.bin")
    with open(back, "wb") as f:
        f.truncate(48 * MiB)
    run(DEVIO, "copy", u, back, "--block-size", "64M")
    with open(back, "rb") as f, open(src, "rb") as g:
        a, b = f.read(), g.read()
    assert a[:len(b)] == b and a[len(b):] == bytes(8 * MiB)


def early_answering_server(path, size, ready):
    """A hostile NBD server on a Unix socket that acknowledges every WRITE
    before it reads the payload (and only then reads it, slowly)."""
    import socket
    import struct
    import time
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)
    ready.set()
    ls.settimeout(30)
    c, _ = ls.accept()
    ls.close()
    c.settimeout(30)

    def recv(n):
        b = b""
        while len(b) < n:
            got = c.recv(n - len(b))
            if not got:
                raise EOFError
            b += got
        return b

    def opt_reply(opt, typ, data=b""):
        c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, typ, len(data)) + data)

    try:
        c.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))  # fixed newstyle, no zeroes
        recv(4)
        while True:
            _, opt, ln = struct.unpack(">QII", recv(16))
            recv(ln)
            if opt == 7:  # GO: the export, then ACK
                opt_reply(opt, 3, struct.pack(">HQH", 0, size, 1 | 4 | 8))  # HAS_FLAGS|FLUSH|FUA
                opt_reply(opt, 1)
                break
            opt_reply(opt, 0x80000001)  # ERR_UNSUP: no structured replies, no meta contexts
        while True:
            _, _, typ, cookie, _, ln = struct.unpack(">IHHQQI", recv(28))
            if typ == 2:  # DISC
                break
            c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + (bytes(ln) if typ == 0 else b""))
            if typ == 1:  # WRITE: answered already; now take the payload, slowly
                time.sleep(0.2)
                recv(ln)
    except (EOFError, OSError):
        pass
    finally:
        c.close()


def test_reply_before_the_payload_is_sent(serve, tmp):
    """A far server may answer a WRITE before taking its payload: the
    request is completed (and the near server frees its 3 MiB buffer) only
    once the payload is out, so the sanitizer build sees no use after free
    and the near server stays up."""
    import threading
    import time
    a = os.path.join(tmp, "hostile.sock")
    b = os.path.join(tmp, "b.sock")
    ready = threading.Event()
    t = threading.Thread(target=early_answering_server, args=(a, 64 * MiB, ready), daemon=True)
    t.start()
    assert ready.wait(10)
    near = serve(f"nbd+unix:///?socket={a}", "--nbd", f"unix:{b}")
    near.wait_unix(b)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x5b 3M 3M",
        f"nbd+unix:///?socket={b}", timeout=60)
    time.sleep(1)  # the hostile server takes the payloads meanwhile
    assert near.proc.poll() is None
    near.stop()
    t.join(30)


@pytest.mark.parametrize("uri,message", [
    ("nbds://127.0.0.1/?tls-type=x509", "unknown query parameter 'tls-type'"),
    ("nbds+unix:///?socket=/nonexistent&tls-psk-file=", "tls-psk-file= without a value"),
    ("nbd://127.0.0.1/?tls-certificates=/tmp", "belongs to nbds://"),
    ("nbd+vsock://2:10809/", "unsupported (no vsock in this build)"),
    ("nbd+foo:///x", "unknown scheme"),
    ("nbd://127.0.0.1/?socket=/tmp/s", "socket= belongs to nbd+unix"),
    ("nbd+unix:///?socket=/tmp/s&timeout=3", "unknown query parameter 'timeout'"),
    ("nbd+unix:///?socket=%00abstract", "%00"),
    ("nbd://127.0.0.1/a%zz", "bad percent-encoding"),
])
def test_bad_uris_are_errors_never_file_names(tmp, uri, message):
    """Each says which rule it broke; none is opened as a file (the
    directory holds no file of that name, so a file open would say so)."""
    r = subprocess.run([DEVIO, "info", uri], capture_output=True, text=True, timeout=30, cwd=tmp)
    assert r.returncode != 0
    assert message in r.stderr
    assert "No such file" not in r.stderr
    a = subprocess.run([DEVIO, "attach", uri, "--nbd-device"], capture_output=True, text=True, timeout=30)
    assert a.returncode == 2
    assert message in a.stderr  # the same parser, the same words


def test_stalled_handshake_times_out(tmp):
    """A server that accepts and never greets: the open fails after
    DEVIO_REMOTE_TIMEOUT, saying so, instead of hanging."""
    import socket
    path = os.path.join(tmp, "mute.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ls.bind(path)
        ls.listen(1)
        env = dict(os.environ, DEVIO_REMOTE_TIMEOUT="1")
        r = subprocess.run([DEVIO, "info", f"nbd+unix:///?socket={path}"], capture_output=True, text=True,
                           timeout=60, env=env)
        assert r.returncode != 0
        assert "the server stalled (no answer within 1 s)" in r.stderr
    finally:
        ls.close()
