"""test_readme.py - README.md's examples run as written.  Every line of a
README code block that runs devio is found here: those that need no special
hardware are run (after the mechanical substitutions in SUBST: scratch
paths, free loopback ports, unique names) and checked to do what their
comment says; the others are listed in NOT_RUN with the reason.  A README
line in neither fails test_every_example_is_classified until it is added
to one."""
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess

import pytest

from conftest import DEVIO, ROOT, Server, free_port, run_ok, wait_for

README = os.path.join(ROOT, "README.md")
MiB = 1 << 20

# Lines that are not run, and why (they are covered elsewhere).
NOT_RUN = {
    "devio serve rbd:rbd/vm1 --ceph-conf /etc/ceph/ceph.conf --nbd unix:/run/vm1.sock":
        "needs a Ceph cluster (tests/integration/test_rbd.py starts one)",
    "devio serve disk.img --ublk": "needs the ublk_drv module (tests/vm guest scenarios)",
    "devio attach nbd://127.0.0.1 --nbd-device": "needs the nbd kernel module (tests/vm guest scenarios)",
    "devio attach nbd://10.0.0.5/disk --ublk --timeout 120":
        "needs the ublk_drv module (tests/vm/scenarios/reconnect.sh, reconnect-ublk; "
        "test_reconnect.py runs the same reconnection through --fuse)",
    "devio detach --handover /dev/ublkb0":
        "needs the ublk_drv module (tests/vm guest scenarios ublk-handover-ext4, ublk-handover-verify)",
    "systemctl start devio@vm1":
        "starts a unit of the machine's systemd (test_daemon.py runs the unit's command in a private /run)",
}

# The substitutions, applied in this order to a README line before it runs
# ({t}: the test's scratch directory; {devio_port}, {nbd_port}: free
# loopback ports; {shm}: a unique shared-memory name; {plugin}: the
# example plugin built next to devio).  The command word devio becomes
# the devio under test ($DEVIO).
SUBST = [
    ("/run/disk.sock", "{t}/disk.sock"),
    ("/tmp/s.sock", "{t}/s.sock"),
    ("/var/ram.img", "{t}/ram.img"),
    ("/run/disk.pid", "{t}/disk.pid"),
    ("/var/log/devio.log", "{t}/devio.log"),
    ("/mnt/", "{t}/mnt-"),
    ("changes.cow", "{t}/changes.cow"),
    ("copy.img", "{t}/copy.img"),
    ("disk.vhd", "{t}/disk.vhd"),
    ("disk.img", "{t}/disk.img"),
    ("10.0.0.5:9000", "127.0.0.1:{devio_port}"),
    ("127.0.0.1:9000", "127.0.0.1:{devio_port}"),
    ("tcp:9000", "tcp:{devio_port}"),
    ("tcp:10809", "tcp:{nbd_port}"),
    ("nbd://127.0.0.1", "nbd://127.0.0.1:{nbd_port}"),
    ("tcp:0.0.0.0:10809", "tcp:127.0.0.1:{nbd_port}"),  # loopback only
    ("tls:0.0.0.0:9000", "tls:127.0.0.1:{devio_port}"),  # loopback only
    ("keys.psk", "{t}/keys.psk"),
    ("@server/", "@127.0.0.1:{nbd_port}/"),
    ("@server:9000", "@127.0.0.1:{devio_port}"),
    ("shm:disk", "shm:{shm}"),
    ("shm://disk", "shm://{shm}"),
    ("plugin:./libx.so:ARGS", "plugin:{plugin}:16M"),
]


def examples():
    """(command, comment) of every README code-block line that runs devio."""
    out, block = [], False
    for line in open(README):
        if line.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        cmd, _, comment = line.strip().partition("   #")
        cmd = re.sub(r"\s+#.*$", "", cmd).strip()
        if re.search(r"(^|\s)devio(\s|@)", cmd):
            out.append((cmd, comment.strip(" #")))
    return out


class Ctx:
    """One example's scratch directory, ports and the servers it started."""

    def __init__(self, tmp_path):
        self.t = str(tmp_path)
        self.devio_port, self.nbd_port = free_port(), free_port()
        self.shm = f"readme{os.getpid()}{os.path.basename(self.t)}"
        self.plugin = os.path.join(os.path.dirname(DEVIO), "plugins", "libdevio-memdisk.so")
        self.servers = []
        self.image = os.path.join(self.t, "disk.img")
        for d in ("d", "r", "s"):
            os.mkdir(f"{self.t}/mnt-{d}")
        make_disk(self.image)

    def subst(self, cmd):
        for a, b in SUBST:
            cmd = cmd.replace(a, b)
        cmd = cmd.format(**vars(self))
        return re.sub(r"(^|(?<=\s))devio(?=\s)", DEVIO, cmd)

    def argv(self, cmd):
        return shlex.split(self.subst(cmd))

    def serve(self, cmd):
        """Start a README serve line (substituted) as a server."""
        argv = self.argv(cmd)
        assert argv[:2] == [DEVIO, "serve"], argv
        s = Server(argv[2:])
        self.servers.append(s)
        return s

    def server_for(self, source, *frontend):
        """A server the example talks to (not itself a README line)."""
        s = Server([source, *frontend])
        self.servers.append(s)
        return s

    def run(self, cmd, timeout=120):
        r = subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"{cmd}\n -> {self.subst(cmd)}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert not sanitizer_report(r.stderr), r.stderr
        return r

    def stop_all(self):
        bad = []
        for s in reversed(self.servers):
            if s.proc.poll() is None:
                rc = s.stop()
                if rc != 0:
                    bad.append(f"{s.args}: exit {rc}\n{s.stderr()}")
            if sanitizer_report(s.stderr()):
                bad.append(f"{s.args}: sanitizer report\n{s.stderr()}")
        assert not bad, "\n".join(bad)


def sanitizer_report(text):
    return "AddressSanitizer" in text or "runtime error:" in text


def make_disk(path):
    """A 64 MiB image with random data and a GPT of five partitions."""
    with open(path, "wb") as f:
        f.write(os.urandom(64 * MiB))
    table = "label: gpt\n" + "".join("size=8MiB, type=L\n" for _ in range(5))
    subprocess.run(["sfdisk", "-q", path], input=table, text=True, check=True, capture_output=True)


def digest(path, off=0, length=None):
    with open(path, "rb") as f:
        f.seek(off)
        return hashlib.sha256(f.read(length) if length else f.read()).hexdigest()


def nbd_unix(sock):
    return f"nbd+unix:///?socket={sock}"


def nbd_size(uri):
    return int(run_ok("nbdinfo", "--size", uri).strip())


def read_device(dev, length):
    with open(dev, "rb") as f:
        return f.read(length)


# ---- one check per README line (some lines share one, as they go together) ----

def ex_serve_devio_tcp(c):
    s = c.serve("devio serve disk.img --devio tcp:9000")
    s.wait_tcp(c.devio_port)
    out = c.run("devio info devio://127.0.0.1:9000").stdout
    assert re.search(rf"^size: {64 * MiB}$", out, re.M), out


def ex_ram_1t(c):
    s = c.serve("devio serve ram:1T --nbd unix:/run/disk.sock")
    s.wait_unix(f"{c.t}/disk.sock")
    assert nbd_size(nbd_unix(f"{c.t}/disk.sock")) == 1 << 40


def ex_ram_image(c):
    s = c.serve("devio serve ram:4G,image=/var/ram.img --nbd tcp:10809")
    s.wait_tcp(c.nbd_port)
    uri = f"nbd://127.0.0.1:{c.nbd_port}"
    assert nbd_size(uri) == 4 << 30
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", uri)
    assert s.stop() == 0
    # kept in the file: another open of the same RAM disk reads it back
    with open(f"{c.t}/ram.img", "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\xab" * 65536


def ex_partition(c):
    s = c.serve("devio serve disk.img --partition 5 --nbd tcp:10809")
    s.wait_tcp(c.nbd_port)
    start = json.loads(run_ok("sfdisk", "-J", c.image))["partitiontable"]["partitions"][4]["start"] * 512
    uri = f"nbd://127.0.0.1:{c.nbd_port}"
    assert nbd_size(uri) == 8 * MiB
    got = subprocess.run([DEVIO, "cat", uri, "--length", "65536"], capture_output=True, check=True).stdout
    with open(c.image, "rb") as f:
        f.seek(start)
        assert got == f.read(65536)


def ex_info(c):
    s = c.server_for(c.image, "--devio", f"tcp:{c.devio_port}")
    s.wait_tcp(c.devio_port)
    out = c.run("devio info devio://127.0.0.1:9000").stdout
    assert re.search(rf"^size: {64 * MiB}$", out, re.M) and "format: raw" in out, out


def ex_copy(c):
    target = f"{c.t}/target.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    s = c.server_for(target, "--devio", f"tcp:{c.devio_port}")
    s.wait_tcp(c.devio_port)
    c.run("devio copy disk.img devio://127.0.0.1:9000")
    assert s.stop() == 0
    assert digest(target) == digest(c.image)


def ex_cow(c):
    before = digest(c.image)
    s = c.serve("devio serve disk.img --cow changes.cow --nbd tcp:10809")
    s.wait_tcp(c.nbd_port)
    uri = f"nbd://127.0.0.1:{c.nbd_port}"
    run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", uri)
    run_ok("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", uri)
    assert s.stop() == 0
    assert digest(c.image) == before, "disk.img was written"
    assert os.path.getsize(f"{c.t}/changes.cow") > 0


def ex_convert_nbd(c):
    s = c.server_for(c.image, "--nbd", f"tcp:{c.nbd_port}")
    s.wait_tcp(c.nbd_port)
    c.run("devio convert -p nbd://127.0.0.1/ copy.img")
    assert digest(f"{c.t}/copy.img") == digest(c.image)


def ex_convert_vhd(c):
    c.run("devio convert -O vhd disk.img disk.vhd")
    assert '"format": "vpc"' in run_ok("qemu-img", "info", "--output=json", f"{c.t}/disk.vhd")
    run_ok("qemu-img", "compare", "-f", "raw", "-F", "vpc", c.image, f"{c.t}/disk.vhd")


def ex_fuse_loop(c):
    s = c.serve("devio serve disk.img --fuse /mnt/d --loop")
    wait_for(lambda: "/dev/loop" in s.stderr() or s.proc.poll() is not None, 30, "the loop device")
    loop = re.search(r"(/dev/loop\d+)", s.stderr()).group(1)
    assert os.path.exists(f"{c.t}/mnt-d/disk")
    assert read_device(loop, MiB) == open(c.image, "rb").read(MiB)
    assert s.stop() == 0
    assert not os.path.ismount(f"{c.t}/mnt-d")


def ex_attach_detach(c):
    s = c.server_for(c.image, "--devio", f"tcp:{c.devio_port}")
    s.wait_tcp(c.devio_port)
    try:
        out = c.run("devio attach devio://10.0.0.5:9000 --fuse /mnt/r --loop -d").stdout
        loop = re.search(r"(/dev/loop\d+)", out).group(1)
        assert read_device(loop, MiB) == open(c.image, "rb").read(MiB)
    finally:
        if os.path.ismount(f"{c.t}/mnt-r"):
            c.run("devio detach /mnt/r")
    assert not os.path.ismount(f"{c.t}/mnt-r")


def ex_status(c):
    s = c.server_for(c.image, "--nbd", f"unix:{c.t}/st.sock")
    s.wait_unix(f"{c.t}/st.sock")
    out = c.run("devio status").stdout
    assert f"pid {s.proc.pid}\n" in out and c.image in out and f"unix:{c.t}/st.sock" in out, out


def ex_fork_pidfile(c):
    c.run("devio serve disk.img --nbd tcp:10809 --fork --pidfile /run/disk.pid --log /var/log/devio.log")
    pid = int(open(f"{c.t}/disk.pid").read())
    try:
        assert nbd_size(f"nbd://127.0.0.1:{c.nbd_port}") == 64 * MiB
        assert os.path.exists(f"{c.t}/devio.log")
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the forked server to exit")
    assert not os.path.exists(f"{c.t}/disk.pid")


def ex_run(c):
    out = c.run("devio serve disk.img --nbd unix:/tmp/s.sock --run 'qemu-img info \"$uri\"'").stdout
    assert "virtual size: 64 MiB" in out, out
    assert not os.path.exists(f"{c.t}/s.sock")  # stopped when the command exited


def ex_socket_activate(c):
    argv = c.argv("systemd-socket-activate -l /run/disk.sock devio serve disk.img --nbd systemd")
    log = open(f"{c.t}/sa.log", "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(f"{c.t}/disk.sock") or p.poll() is not None, 10, "the socket")
        assert nbd_size(nbd_unix(f"{c.t}/disk.sock")) == 64 * MiB
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    assert p.returncode == 0, open(f"{c.t}/sa.log").read()


def ex_imdisk(c):
    """ImDisk's line listens on every interface: run it, and its client, in
    a private network namespace that has only loopback.  Sector 0 holds a
    (GPT's protective) MBR, so, as ImDisk's devio does, partition 1 is
    served: 8 MiB."""
    script = ('ip link set lo up; "$1" 9000 "$2" & pid=$!; '
              'for i in $(seq 100); do "$1" info devio://127.0.0.1:9000 >"$3" 2>&1 && break; sleep 0.1; done; '
              'kill $pid; wait $pid; st=$?; cat "$3"; exit $st')
    argv = c.argv("devio 9000 disk.img")
    assert argv == [DEVIO, "9000", c.image]
    r = subprocess.run(["unshare", "-n", "sh", "-c", script, "sh", DEVIO, c.image, f"{c.t}/info.out"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.search(rf"^size: {8 * MiB}$", r.stdout, re.M), r.stdout + r.stderr


def ex_shm(c):
    s = c.serve("devio serve disk.img --devio shm:disk")
    wait_for(lambda: f"shm:{c.shm}: listening" in s.stderr() or s.proc.poll() is not None, 20, "shm")
    assert s.proc.poll() is None, s.stderr()
    try:
        out = c.run("devio attach devio+shm://disk --fuse /mnt/s --loop -d").stdout
        loop = re.search(r"(/dev/loop\d+)", out).group(1)
        assert read_device(loop, MiB) == open(c.image, "rb").read(MiB)
    finally:
        if os.path.ismount(f"{c.t}/mnt-s"):
            c.run("devio detach /mnt/s")


def ex_plugin(c):
    assert os.path.exists(c.plugin), f"{c.plugin}: the example plugin is not built"
    s = c.serve("devio serve plugin:./libx.so:ARGS --nbd tcp:10809")
    s.wait_tcp(c.nbd_port)
    assert nbd_size(f"nbd://127.0.0.1:{c.nbd_port}") == 16 * MiB


def ex_list(c):
    s = c.server_for(c.image, "--nbd", f"tcp:{c.nbd_port}", "--export", f"second={c.image}")
    s.wait_tcp(c.nbd_port)
    out = c.run("devio list nbd://127.0.0.1").stdout
    listed = re.findall(r"^export '([^']*)'", out, re.M)
    theirs = json.loads(run_ok("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{c.nbd_port}"))
    assert sorted(listed) == sorted(e["export-name"] for e in theirs["exports"]) == ["", "second"], out


def ex_tls_psk(c):
    """The PSK file as the comment makes it, the server on loopback, its
    client by the README's URI; a client without TLS is refused."""
    run_ok("psktool", "-u", "alice", "-p", f"{c.t}/keys.psk")
    s = c.serve("devio serve disk.img --nbd tcp:0.0.0.0:10809 --tls-psk keys.psk")
    s.wait_tcp(c.nbd_port)
    out = c.run("devio info 'nbds://alice@server/?tls-psk-file=keys.psk'").stdout
    assert re.search(rf"^size: {64 * MiB}$", out, re.M), out
    plain = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{c.nbd_port}"], capture_output=True,
                           text=True, timeout=30)
    assert plain.returncode != 0, plain.stdout


def ex_devio_tls(c):
    """The devio protocol over TLS with the README's PSK file: the copy
    through devio+tls:// is the image; a plaintext devio:// client is
    refused."""
    run_ok("psktool", "-u", "alice", "-p", f"{c.t}/keys.psk")
    s = c.serve("devio serve disk.img --devio tls:0.0.0.0:9000 --tls-psk keys.psk")
    s.wait_tcp(c.devio_port)
    c.run("devio copy 'devio+tls://alice@server:9000?tls-psk-file=keys.psk' copy.img")
    assert digest(f"{c.t}/copy.img") == digest(c.image)
    plain = subprocess.run([DEVIO, "info", f"devio://127.0.0.1:{c.devio_port}"], capture_output=True, text=True,
                           timeout=30)
    assert plain.returncode != 0, plain.stdout


def ex_allow_user(c):
    """tcp:* listens on every interface: run it in a private network
    namespace that has only loopback.  The server drops root for a user
    (nobody: the README's devio user need not exist here) once it listens,
    and refuses 127.0.0.1, which is not in --allow, before the greeting.
    Port 10809 as written: the namespace has nothing else."""
    argv = c.argv("devio serve disk.img --nbd tcp:*:10809 --allow 10.0.5.0/24 --user devio")
    assert argv[-2:] == ["--user", "devio"]
    argv[-1] = "nobody"
    script = ('ip link set lo up; "$@" >"$OUT" 2>&1 & pid=$!; '
              r'for i in $(seq 200); do grep -q "^Uid:\s*65534\s" /proc/$pid/status 2>/dev/null && break; '
              'sleep 0.05; done; grep "^Uid:" /proc/$pid/status; '
              'nbdinfo --size "nbd://127.0.0.1:$PORT" && echo "ADMITTED"; '
              'kill $pid; wait $pid; echo "exit $?"')
    env = dict(os.environ, OUT=f"{c.t}/allow.log", PORT="10809")  # the namespace's own port
    r = subprocess.run(["unshare", "-n", "sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                       timeout=60, env=env)
    log = open(f"{c.t}/allow.log").read()
    assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", r.stdout, re.M), r.stdout + r.stderr + log
    assert "ADMITTED" not in r.stdout and "exit 0" in r.stdout, r.stdout + r.stderr + log
    assert "refusing 127.0.0.1: not in --allow" in log, log
    assert not sanitizer_report(log), log


RUN = {
    "devio serve disk.img --devio tcp:9000": ex_serve_devio_tcp,
    "devio serve ram:1T --nbd unix:/run/disk.sock": ex_ram_1t,
    "devio serve ram:4G,image=/var/ram.img --nbd tcp:10809": ex_ram_image,
    "devio serve disk.img --partition 5 --nbd tcp:10809": ex_partition,
    "devio info devio://127.0.0.1:9000": ex_info,
    "devio copy disk.img devio://127.0.0.1:9000": ex_copy,
    "devio serve disk.img --cow changes.cow --nbd tcp:10809": ex_cow,
    "devio convert -p nbd://127.0.0.1/ copy.img": ex_convert_nbd,
    "devio convert -O vhd disk.img disk.vhd": ex_convert_vhd,
    "devio serve disk.img --fuse /mnt/d --loop": ex_fuse_loop,
    "devio attach devio://10.0.0.5:9000 --fuse /mnt/r --loop -d": ex_attach_detach,
    "devio detach /mnt/r": ex_attach_detach,
    "devio status": ex_status,
    "devio serve disk.img --nbd tcp:10809 --fork --pidfile /run/disk.pid --log /var/log/devio.log": ex_fork_pidfile,
    "devio serve disk.img --nbd unix:/tmp/s.sock --run 'qemu-img info \"$uri\"'": ex_run,
    "systemd-socket-activate -l /run/disk.sock devio serve disk.img --nbd systemd": ex_socket_activate,
    "devio 9000 disk.img": ex_imdisk,
    "devio serve disk.img --devio shm:disk": ex_shm,
    "devio attach devio+shm://disk --fuse /mnt/s --loop -d": ex_shm,
    "devio serve plugin:./libx.so:ARGS --nbd tcp:10809": ex_plugin,
    "devio list nbd://127.0.0.1": ex_list,
    "devio serve disk.img --nbd tcp:0.0.0.0:10809 --tls-psk keys.psk": ex_tls_psk,
    "devio info 'nbds://alice@server/?tls-psk-file=keys.psk'": ex_tls_psk,
    "devio serve disk.img --nbd tcp:*:10809 --allow 10.0.5.0/24 --user devio": ex_allow_user,
    "devio serve disk.img --devio tls:0.0.0.0:9000 --tls-psk keys.psk": ex_devio_tls,
    "devio copy 'devio+tls://alice@server:9000?tls-psk-file=keys.psk' copy.img": ex_devio_tls,
}


def test_every_example_is_classified():
    cmds = [cmd for cmd, _ in examples()]
    assert len(cmds) >= 20, cmds
    new = [c for c in cmds if c not in RUN and c not in NOT_RUN]
    assert not new, "README lines neither run nor listed in NOT_RUN (test_readme.py): " + repr(new)
    gone = [c for c in list(RUN) + list(NOT_RUN) if c not in cmds]
    assert not gone, f"test_readme.py lists lines README.md no longer has: {gone!r}"


def _checks():
    """Each check once, named by the README lines it runs."""
    seen = {}
    for cmd, fn in RUN.items():
        seen.setdefault(fn, []).append(cmd)
    return [pytest.param(fn, id=" + ".join(cmds)[:90]) for fn, cmds in seen.items()]


@pytest.mark.parametrize("check", _checks())
def test_example_runs(check, tmp_path):
    c = Ctx(tmp_path)
    try:
        check(c)
    finally:
        c.stop_all()
