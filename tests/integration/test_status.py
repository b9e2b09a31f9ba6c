"""test_status.py - the inventory: `devio status [--json]` (every running
server with absolute sources, its stack, front ends, addresses,
connections, devices, pid and uptime; JSON valid for any path bytes),
`devio info URI` of a running server, `devio list URI` against nbdinfo,
and the NBD client's handshake timeout against a server that never
speaks."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading

import pytest

from conftest import DEVIO, free_port, wait_for

ODD = b"odd\xff\nname.img"  # not UTF-8, and a newline


@pytest.fixture
def scratch():
    d = tempfile.mkdtemp(prefix="devio-status-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def devio(*args, cwd=None, env=None, check=True):
    r = subprocess.run([DEVIO, *args], capture_output=True, timeout=60, cwd=cwd, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"devio {args} exited {r.returncode}:\n{r.stdout!r}\n{r.stderr!r}")
    return r


def status_json():
    return json.loads(devio("status", "--json").stdout)


def server_of(pid):
    """Its entry in `devio status --json` (None while it is not there yet)."""
    for s in status_json()["servers"]:
        if s["pid"] == pid:
            return s
    return None


def text_block(pid):
    """Its block of `devio status` text (servers are separated by blank lines)."""
    out = devio("status").stdout
    for block in out.split(b"\n\n"):
        if block.startswith(b"pid %d\n" % pid):
            return block
    raise AssertionError(f"pid {pid} not in:\n{out!r}")


def start(serve, *args, cwd):
    """A server started in cwd (its sources relative to it), once listed."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        s = serve(*args)
    finally:
        os.chdir(old)
    wait_for(lambda: s.proc.poll() is not None or server_of(s.proc.pid), 20, "the server in devio status")
    assert s.proc.poll() is None, s.stderr()
    return s


def test_status_lists_everything(serve, scratch):
    with open(os.path.join(scratch, "a b.img"), "wb") as f:
        f.truncate(4 << 20)
    odd = os.path.join(os.fsencode(scratch), ODD)
    with open(odd, "wb") as f:
        f.truncate(2 << 20)
    sock = os.path.join(scratch, "s.sock")
    port = free_port()
    s = start(serve, "a b.img", "--export", os.fsdecode(b"two=" + ODD), "--nbd", f"unix:{sock}",
              "--devio", f"tcp:127.0.0.1:{port}", cwd=scratch)
    j = server_of(s.proc.pid)
    assert j["uid"] == os.getuid() and j["uptime"] >= 0
    default, two = j["exports"]
    # sources absolute, whatever the server's directory was
    assert default["name"] == "" and default["source"] == os.path.join(scratch, "a b.img")
    assert default["size"] == 4 << 20 and default["format"] == "raw" and default["read_only"] is False
    assert [l["layer"] for l in default["stack"]] == ["file"]
    # a path that is no UTF-8: lossy text plus the exact bytes in hex
    assert two["name"] == "two" and bytes.fromhex(two["source_hex"]) == odd
    assert two["source"] == odd.decode("utf-8", errors="replace")
    fes = {f["type"]: f for f in j["frontends"]}
    assert fes["nbd"]["address"] == f"unix:{sock}" and fes["nbd"]["connections"] == 0
    assert fes["devio"]["address"] == f"tcp:127.0.0.1:{port}"
    # the text: the same, the odd path escaped, never raw bytes
    block = text_block(s.proc.pid)
    assert b"export '' " + os.fsencode(scratch) + b"/a b.img\n" in block
    assert b"export 'two' " + os.fsencode(scratch) + b"/odd\\xff\\nname.img\n" in block, block
    assert b"address unix:" + os.fsencode(sock) in block
    assert b"uptime " in block
    # devio info escapes the same way; its JSON has the exact bytes
    out = devio("info", odd).stdout
    assert b"source: " + os.fsencode(scratch) + b"/odd\\xff\\nname.img\n" in out, out
    assert bytes.fromhex(json.loads(devio("info", "--json", odd).stdout)["source_hex"]) == odd
    s.stop()
    wait_for(lambda: server_of(s.proc.pid) is None, 10, "the entry to go")


def test_status_shows_the_stack(serve, scratch):
    base = os.path.join(scratch, "base.img")
    with open(base, "wb") as f:
        f.truncate(8 << 20)
    sock = os.path.join(scratch, "s.sock")
    s = start(serve, "base.img", "--offset", "1M", "--size", "4M", "--cow", "ov.cow", "--nbd", f"unix:{sock}",
              cwd=scratch)
    e = server_of(s.proc.pid)["exports"][0]
    assert e["format"] == "cow over window over raw"
    assert [l["layer"] for l in e["stack"]] == ["cow", "window", "file"]
    assert os.path.join(scratch, "ov.cow") in e["stack"][0]["description"]  # the overlay, absolute
    assert "at offset 1048576" in e["stack"][1]["description"]
    assert e["size"] == 4 << 20


def test_status_counts_connections_and_devices(serve, scratch):
    nbd = pytest.importorskip("nbd")
    sock = os.path.join(scratch, "s.sock")
    s = start(serve, "ram:4M", "--nbd", f"unix:{sock}", cwd=scratch)
    h = nbd.NBD()
    h.connect_unix(sock)
    try:  # the status file is rewritten every second
        wait_for(lambda: server_of(s.proc.pid)["frontends"][0]["connections"] == 1, 15, "1 connection")
    finally:
        h.shutdown()
    wait_for(lambda: server_of(s.proc.pid)["frontends"][0]["served"] >= 1, 15, "1 served")


def test_status_names_fuse_mount_and_loop(serve, scratch):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    mnt = os.path.join(scratch, "mnt")
    os.mkdir(mnt)
    s = start(serve, "ram:4M", "--fuse", mnt, "--loop", cwd=scratch)
    fe = server_of(s.proc.pid)["frontends"][0]
    assert fe["type"] == "fuse" and fe["mount"] == mnt
    assert fe["device"].startswith("/dev/loop"), fe
    assert b"device " + fe["device"].encode() in text_block(s.proc.pid)


def test_status_of_another_user_is_not_shown(serve, scratch):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    sock = os.path.join(scratch, "s.sock")
    s = start(serve, "ram:1M", "--nbd", f"unix:{sock}", cwd=scratch)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", DEVIO, "status", "--json"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and ("Permission denied" in r.stderr or "error while loading" in r.stderr):
        pytest.skip(f"nobody cannot run {DEVIO}")
    assert r.returncode == 0, r.stderr
    assert s.proc.pid not in [x["pid"] for x in json.loads(r.stdout)["servers"]]
    assert server_of(s.proc.pid)  # root sees it


def test_a_users_server_is_in_its_runtime_dir(scratch):
    """A server of another user than root publishes in $XDG_RUNTIME_DIR/devio:
    its user sees it, root sees it too (every /run/user/UID/devio)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    uid = 65534
    xdg = f"/run/user/{uid}"
    if os.path.exists(xdg):
        pytest.skip(f"{xdg} exists already: not ours to use")
    os.chown(scratch, uid, uid)
    sock = os.path.join(scratch, "s.sock")
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    env = dict(os.environ, XDG_RUNTIME_DIR=xdg)
    os.makedirs(xdg, mode=0o700)
    proc = None
    try:
        os.chown(xdg, uid, uid)
        proc = subprocess.Popen(as_user + [DEVIO, "serve", "ram:1M", "--nbd", f"unix:{sock}"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listed_for_user():
            r = subprocess.run(as_user + [DEVIO, "status", "--json"], env=env, capture_output=True, text=True,
                               timeout=60)
            return [s for s in json.loads(r.stdout)["servers"] if s["pid"] == proc.pid]

        wait_for(lambda: proc.poll() is not None or listed_for_user(), 20, "the user's server in its status")
        assert proc.poll() is None, proc.stderr.read()
        assert listed_for_user()[0]["uid"] == uid
        assert os.path.exists(f"{xdg}/devio/{proc.pid}.json")
        assert server_of(proc.pid)["uid"] == uid  # root sees every user's
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=20)
        shutil.rmtree(xdg, ignore_errors=True)


def test_info_of_a_running_server(serve, scratch):
    sock = os.path.join(scratch, "s.sock")
    port = free_port()
    s = start(serve, "ram:2M", "--nbd", f"unix:{sock}", "--devio", f"tcp:127.0.0.1:{port}", cwd=scratch)
    for uri in (f"nbd+unix:///?socket={sock}", f"devio://localhost:{port}"):
        out = devio("info", uri).stdout
        assert b"server (devio status):\npid %d\n" % s.proc.pid in out, out
        j = json.loads(devio("info", "--json", uri).stdout)
        assert j["server"]["pid"] == s.proc.pid and j["size"] == 2 << 20
    # an NBD server that is not devio's: no server section
    if shutil.which("nbdkit"):
        ksock = os.path.join(scratch, "k.sock")
        k = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "memory", "1M"], stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.exists(ksock), 10, ksock)
            j = json.loads(devio("info", "--json", f"nbd+unix:///?socket={ksock}").stdout)
            assert "server" not in j and j["size"] == 1 << 20
        finally:
            k.terminate()
            k.wait(timeout=20)


@pytest.mark.parametrize("fe,scheme", [("--nbd", "nbd"), ("--devio", "devio")])
def test_port_zero_shows_the_port_picked(serve, scratch, fe, scheme):
    s = start(serve, "ram:1M", fe, "tcp:127.0.0.1:0", cwd=scratch)
    addr = server_of(s.proc.pid)["frontends"][0]["address"]
    host, port = addr.rsplit(":", 1)
    assert host == "tcp:127.0.0.1" and 0 < int(port) < 65536, addr
    # the port works, and info finds this server behind it
    j = json.loads(devio("info", "--json", f"{scheme}://127.0.0.1:{port}").stdout)
    assert j["server"]["pid"] == s.proc.pid


def test_list_matches_nbdinfo(serve, scratch):
    sock = os.path.join(scratch, "s.sock")
    start(serve, "ram:1M", "--export", "disk2=ram:2M", "--export", "third=ram:1M", "--nbd", f"unix:{sock}",
          cwd=scratch)
    uri = f"nbd+unix:///?socket={sock}"
    ours = json.loads(devio("list", "--json", uri).stdout)
    assert ours["protocol"] == "nbd"
    names = [e["name"] for e in ours["exports"]]
    assert names == ["", "disk2", "third"]
    if shutil.which("nbdinfo"):
        theirs = json.loads(subprocess.run(["nbdinfo", "--list", "--json", uri], capture_output=True, text=True,
                                           timeout=60, check=True).stdout)
        assert sorted(e["export-name"] for e in theirs["exports"]) == sorted(names)
    text = devio("list", uri).stdout.decode()
    assert "export '' (the default export)\n" in text and "export 'disk2'\n" in text


def test_list_shows_descriptions_of_other_servers(scratch):
    if not shutil.which("nbdkit"):
        pytest.skip("no nbdkit")
    ksock = os.path.join(scratch, "k.sock")
    for mode in ("explicit", "error", "empty"):
        ksock = os.path.join(scratch, f"{mode}.sock")
        k = subprocess.Popen(["nbdkit", "-f", "-U", ksock, "--filter=exportname", "memory", "1M",
                              f"exportname-list={mode}", "exportname=alpha", "exportname=beta",
                              "exportdesc=fixed:a description\nwith a newline"], stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.exists(ksock), 10, ksock)
            uri = f"nbd+unix:///?socket={ksock}"
            if mode == "error":  # a server that refuses to list: said once, exit 1
                r = devio("list", uri, check=False)
                assert r.returncode == 1 and b"does not list its exports" in r.stderr, r.stderr
                assert r.stderr.count(b"error:") == 1, r.stderr
                continue
            if mode == "empty":
                assert devio("list", uri).stdout.decode() == f"{uri}: no exports listed\n"
                assert json.loads(devio("list", "--json", uri).stdout)["exports"] == []
                continue
            j = json.loads(devio("list", "--json", uri).stdout)
            assert [e["name"] for e in j["exports"]] == ["alpha", "beta"]
            assert j["exports"][0]["description"] == "a description\nwith a newline"
            assert "  description: a description\\nwith a newline\n" in devio("list", uri).stdout.decode()
        finally:
            k.terminate()
            k.wait(timeout=20)


def test_list_of_a_devio_server_says_one_export(serve, scratch):
    sock = os.path.join(scratch, "d.sock")
    start(serve, "ram:1M", "--devio", f"unix:{sock}", cwd=scratch)
    uri = f"devio+unix://{sock}"
    out = devio("list", uri).stdout.decode()
    assert "one export" in out and "no export names" in out
    j = json.loads(devio("list", "--json", uri).stdout)
    assert j["protocol"] == "devio" and j["exports"] == [{"name": "", "description": ""}]


def test_list_refuses_what_is_no_server(scratch):
    r = devio("list", os.path.join(scratch, "x.img"), check=False)
    assert r.returncode == 2 and b"is no server URI" in r.stderr


class Mute:
    """Accepts connections and never says a word."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.conns = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            while True:
                self.conns.append(self.sock.accept()[0])
        except OSError:
            pass

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(timeout=10)


@pytest.mark.parametrize("cmd", ["info", "list", "cat"])
def test_handshake_times_out_on_a_mute_server(scratch, cmd):
    path = os.path.join(scratch, "mute.sock")
    m = Mute(path)
    try:
        env = dict(os.environ, DEVIO_REMOTE_TIMEOUT="1")
        r = devio(cmd, f"nbd+unix:///?socket={path}", env=env, check=False)
        assert r.returncode == 1, r.stderr
        assert b"stalled (no answer within 1 s)" in r.stderr, r.stderr
    finally:
        m.close()


def test_copy_onto_itself_through_a_server_is_refused(serve, scratch):
    """`devio status` knows which file a local server serves: copying that
    file into the server (or back out of it onto the file) is refused."""
    img = os.path.join(scratch, "img.raw")
    other = os.path.join(scratch, "other.raw")
    for path, byte in ((img, b"A"), (other, b"B")):
        with open(path, "wb") as f:
            f.write(byte * (1 << 20))
    alias = os.path.join(scratch, "alias.raw")
    os.symlink(img, alias)
    nsock, dsock = os.path.join(scratch, "n.sock"), os.path.join(scratch, "d.sock")
    start(serve, "img.raw", "--export", "o=other.raw", "--nbd", f"unix:{nsock}", "--devio", f"unix:{dsock}",
          cwd=scratch)
    for cmd, src, dst in (("copy", alias, f"nbd+unix:///?socket={nsock}"),
                          ("copy", f"devio+unix://{dsock}", img),
                          ("convert", f"nbd+unix:///o?socket={nsock}", other)):
        r = devio(cmd, src, dst, check=False)
        assert r.returncode == 1 and b"same file" in r.stderr, (cmd, src, dst, r.stderr)
    with open(img, "rb") as f:
        assert f.read() == b"A" * (1 << 20)
    # another export of the same server is another file: copied
    devio("copy", f"nbd+unix:///o?socket={nsock}", f"nbd+unix:///?socket={nsock}")
    with open(img, "rb") as f:
        assert f.read() == b"B" * (1 << 20)
