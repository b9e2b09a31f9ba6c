"""test_daemon.py - devio run as a service, the way nbdkit and qemu-nbd are:
--fork returns once ready (and tells a failure with the child's own
message), --pidfile, --exit-with-parent, --run (captive), --log targets and
SIGHUP reopening the log file, socket activation under
systemd-socket-activate, and the shipped systemd units checked by
systemd-analyze verify."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import DEVIO, ROOT, free_port, run_ok, wait_for

MiB = 1 << 20


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="devio-daemon-")
    pids = []
    yield d, pids
    for pid in pids:  # servers that outlived a failed test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(d, ignore_errors=True)


def devio(*args, timeout=120, **kw):
    return subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=timeout, **kw)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def read_pid(path):
    with open(path) as f:
        return int(f.read().strip())


def stop_pid(pid):
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 30, f"pid {pid} exits")


def nbd_size(uri):
    return int(run_ok("nbdinfo", "--size", uri).strip())


# ---- --fork, --pidfile ----

def test_fork_returns_ready_and_writes_pidfile(tmp):
    d, pids = tmp
    sock, pidfile, log = (os.path.join(d, n) for n in ("s.sock", "pid", "log"))
    r = devio("serve", "ram:8M", "--nbd", f"unix:{sock}", "--fork", "--pidfile", pidfile, "--log", log)
    assert r.returncode == 0, r.stderr
    pid = read_pid(pidfile)
    pids.append(pid)
    # ready means ready: no waiting for the socket
    assert nbd_size(f"nbd+unix:///?socket={sock}") == 8 * MiB
    assert f"pid {pid}\n" in devio("status").stdout
    stop_pid(pid)
    assert not os.path.exists(pidfile) and not os.path.exists(sock)
    with open(log) as f:
        assert "signal 15: stopping" in f.read()


def test_fork_failure_reaches_the_parent(tmp):
    d, _ = tmp
    missing = os.path.join(d, "missing.img")
    r = devio("serve", missing, "--nbd", f"unix:{d}/s.sock", "--fork", "--pidfile", f"{d}/pid")
    assert r.returncode == 1
    assert missing in r.stderr and "No such file or directory" in r.stderr, r.stderr
    assert not os.path.exists(f"{d}/pid")


def test_attach_d_failure_says_why(tmp):
    """attach -d: the child's real error, not only 'did not become ready'."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    d, _ = tmp
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    r = devio("attach", f"nbd+unix:///?socket={d}/none.sock", "--fuse", mnt, "-d")
    assert r.returncode != 0
    assert f"{d}/none.sock" in r.stderr and "did not become ready" not in r.stderr, r.stderr


def test_attach_d_logs_to_its_file(tmp):
    """attach -d --log FILE: the server's messages after it is ready are kept."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    d, pids = tmp
    sock, mnt, log, pidfile = (os.path.join(d, n) for n in ("s.sock", "mnt", "log", "pid"))
    os.mkdir(mnt)
    srv = subprocess.Popen([DEVIO, "serve", "ram:8M", "--nbd", f"unix:{sock}"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock), 10, sock)
        r = devio("attach", f"nbd+unix:///?socket={sock}", "--fuse", mnt, "-d", "--log", log, "--pidfile", pidfile)
        assert r.returncode == 0, r.stderr
        pid = read_pid(pidfile)
        pids.append(pid)
        assert r.stdout.strip() == os.path.join(mnt, "disk")
        r = devio("detach", mnt)
        assert r.returncode == 0, r.stderr
        assert not alive(pid)
        with open(log) as f:
            text = f.read()
        assert "serving" in text and "signal 15: stopping" in text, text
    finally:
        srv.terminate()
        srv.wait(timeout=30)
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_fork_and_run_do_not_mix(tmp):
    d, _ = tmp
    r = devio("serve", "ram:1M", "--nbd", f"unix:{d}/s.sock", "--fork", "--run", "true")
    assert r.returncode == 2 and "--run" in r.stderr


# ---- --run ----

def test_run_is_captive_with_the_uris(tmp):
    d, _ = tmp
    sock = os.path.join(d, "s.sock")
    port = free_port()
    cmd = 'echo "uri=$uri"; echo "devio=$devio"; nbdinfo --size "$nbd"; devio_info=$("$DEVIO_BIN" info "$devio") || exit 9; exit 3'
    r = devio("serve", "ram:8M", "--nbd", f"unix:{sock}", "--devio", f"tcp:{port}", "--run", cmd,
              env=dict(os.environ, DEVIO_BIN=DEVIO))
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"uri=nbd+unix:///?socket={sock}\n" in r.stdout
    assert f"devio=devio://127.0.0.1:{port}\n" in r.stdout
    assert f"{8 * MiB}\n" in r.stdout
    assert not os.path.exists(sock)  # stopped after the command


@pytest.mark.skipif(not shutil.which("psktool"), reason="psktool (gnutls-bin) not installed")
def test_run_gets_a_tls_devio_uri(tmp):
    """--devio tls: gives $devio as devio+tls:// (credentials are the
    command's to add): a client reaches the server through it."""
    d, _ = tmp
    psk = os.path.join(d, "keys.psk")
    run_ok("psktool", "-u", "alice", "-p", psk)
    port = free_port()
    cmd = 'echo "devio=$devio"; "$DEVIO_BIN" info "$devio?tls-psk-file=$PSK&tls-username=alice" || exit 9'
    r = devio("serve", "ram:8M", "--devio", f"tls:127.0.0.1:{port}", "--tls-psk", psk, "--run", cmd,
              env=dict(os.environ, DEVIO_BIN=DEVIO, PSK=psk))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"devio=devio+tls://127.0.0.1:{port}\n" in r.stdout
    assert str(8 * MiB) in r.stdout


def test_run_gets_the_fuse_device(tmp):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    d, _ = tmp
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    r = devio("serve", "ram:8M", "--fuse", mnt, "--run", 'test -f "$device" && echo "device=$device"')
    assert r.returncode == 0, r.stderr
    assert f"device={mnt}/disk\n" in r.stdout


# ---- --exit-with-parent ----

def test_exit_with_parent(tmp):
    d, pids = tmp
    sock, pidfile = os.path.join(d, "s.sock"), os.path.join(d, "pid")
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, time
        subprocess.Popen([{DEVIO!r}, "serve", "ram:1M", "--nbd", "unix:{sock}", "--exit-with-parent",
                          "--pidfile", "{pidfile}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(600)
        """)])
    try:
        wait_for(lambda: os.path.exists(pidfile), 30, "pidfile")
        pid = read_pid(pidfile)
        pids.append(pid)
        assert alive(pid)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(pid), 30, "server exits with its parent")
        assert not os.path.exists(sock)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# ---- --log ----

def test_log_file_is_reopened_on_sighup(tmp):
    d, pids = tmp
    sock, pidfile, log = (os.path.join(d, n) for n in ("s.sock", "pid", "log"))
    r = devio("serve", "ram:1M", "--nbd", f"unix:{sock}", "--fork", "--pidfile", pidfile, "--log", log)
    assert r.returncode == 0, r.stderr
    pid = read_pid(pidfile)
    pids.append(pid)
    os.rename(log, log + ".1")  # what logrotate does
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: os.path.exists(log), 10, "log reopened")
    assert alive(pid)  # SIGHUP does not stop the server
    stop_pid(pid)
    with open(log + ".1") as f:
        assert "serving" in f.read()
    with open(log) as f:
        text = f.read()
    assert f"log {log} reopened" in text and "signal 15: stopping" in text


NAMESPACE_LOG = r"""
import os, socket, subprocess, sys
target, devio, where = sys.argv[1:4]
# a private mount namespace: a tmpfs over where the socket lives, nothing
# changes for the rest of the machine
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "devio-test", where], check=True)
path = where + ("/systemd/journal/socket" if target == "journal" else "/log")
os.makedirs(os.path.dirname(path), exist_ok=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(30)
r = subprocess.run([devio, "serve", "ram:1M", "--devio", "unix:/tmp/devio-ns-log-%d.sock" % os.getpid(),
                    "--log", target, "--run", "true"], capture_output=True, text=True, timeout=60)
got = []
s.settimeout(0.5)
try:
    while True:
        got.append(s.recv(65536).decode(errors="replace"))
except socket.timeout:
    pass
print(r.returncode, r.stderr.strip().replace("\n", " | "))
print("\n--\n".join(got))
"""


@pytest.mark.parametrize("target,where", [("journal", "/run"), ("syslog", "/dev")])
def test_log_to_journal_and_syslog(tmp, target, where):
    d, _ = tmp
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    script = os.path.join(d, "ns.py")
    with open(script, "w") as f:
        f.write(NAMESPACE_LOG)
    out = run_ok("unshare", "--mount", sys.executable, script, target, DEVIO, where)
    first = out.split("\n", 1)[0]
    assert first.startswith("0 "), out
    assert "--run: the command exited with status 0" not in first  # went to the log, not stderr
    if target == "journal":
        assert "SYSLOG_IDENTIFIER=devio\n" in out and "MESSAGE=--run: the command exited with status 0" in out, out
        assert "PRIORITY=6" in out
    else:
        assert "devio[" in out and "--run: the command exited with status 0" in out, out


# ---- socket activation ----

def socket_activate(args, *serve_args):
    """systemd-socket-activate ARGS devio serve ram:8M SERVE_ARGS"""
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.skip("no systemd-socket-activate (Debian package systemd)")
    env = {k: v for k, v in os.environ.items() if k.startswith(("ASAN", "UBSAN", "LSAN"))}
    cmd = [tool, *args] + [f"-E{k}" for k in env] + [DEVIO, "serve", "ram:8M", *serve_args]
    log = tempfile.TemporaryFile()
    return subprocess.Popen(cmd, stdout=log, stderr=log, env=dict(os.environ), start_new_session=True), log


def stop_activated(p, log):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log.seek(0)
    return p.returncode, log.read().decode(errors="replace")


def test_socket_activation_nbd_unix(tmp):
    d, _ = tmp
    sock = os.path.join(d, "act.sock")
    p, log = socket_activate(["-l", sock], "--nbd", "systemd")
    try:
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 10, "listening socket")
        uri = f"nbd+unix:///?socket={sock}"
        assert nbd_size(uri) == 8 * MiB
        run_ok("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", uri)
        run_ok("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k", uri)
        assert f"pid {p.pid}\n" in devio("status").stdout  # the tool exec'ed devio
    finally:
        rc, out = stop_activated(p, log)
    assert rc == 0, out
    assert os.path.exists(sock)  # systemd's socket, not devio's to remove


def test_socket_activation_named_sockets(tmp):
    d, _ = tmp
    nbd_sock, devio_sock = os.path.join(d, "nbd.sock"), os.path.join(d, "devio.sock")
    port = free_port()
    p, log = socket_activate(["-l", devio_sock, "-l", f"127.0.0.1:{port}", "--fdname=devio:nbd"],
                             "--nbd", "systemd:nbd", "--devio", "systemd:devio")
    try:
        wait_for(lambda: os.path.exists(devio_sock) or p.poll() is not None, 10, "listening socket")
        assert nbd_size(f"nbd://127.0.0.1:{port}") == 8 * MiB
        info = run_ok(DEVIO, "info", f"devio+unix://{devio_sock}")
        assert str(8 * MiB) in info
    finally:
        rc, out = stop_activated(p, log)
    assert rc == 0, out


def test_socket_activation_with_fork(tmp):
    """Type=forking with a socket unit: the forked child takes over the
    sockets handed to its parent (LISTEN_PID named the parent)."""
    d, pids = tmp
    sock, pidfile = os.path.join(d, "act.sock"), os.path.join(d, "pid")
    p, log = socket_activate(["-l", sock], "--nbd", "systemd", "--fork", "--pidfile", pidfile)
    try:
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 10, "listening socket")
        assert nbd_size(f"nbd+unix:///?socket={sock}") == 8 * MiB  # the first connection starts devio
        assert p.wait(timeout=30) == 0  # the parent returned once the child was ready
        pid = read_pid(pidfile)
        pids.append(pid)
        assert pid != p.pid and alive(pid)
        assert nbd_size(f"nbd+unix:///?socket={sock}") == 8 * MiB
        stop_pid(pid)
    finally:
        rc, out = stop_activated(p, log)
    assert rc == 0, out


def test_socket_activation_without_sockets_fails(tmp):
    d, _ = tmp
    r = devio("serve", "ram:1M", "--nbd", "systemd")
    assert r.returncode == 1 and "not socket-activated" in r.stderr, r.stderr


# ---- the systemd units ----

def test_systemd_units_verify(tmp):
    d, _ = tmp
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    src = os.path.join(ROOT, "systemd")
    units = []
    for name in sorted(os.listdir(src)):
        if not name.endswith((".service.in", ".socket", ".service")):
            continue
        with open(os.path.join(src, name)) as f:
            text = f.read().replace("@bindir@", os.path.dirname(DEVIO))
        assert "@" not in text.replace("%i", "").replace("devio@", "").replace("-recover@", "")
        out = name[:-3] if name.endswith(".in") else name
        with open(os.path.join(d, out), "w") as f:
            f.write(text)
        units.append(os.path.join(d, out.replace("@.", "@disk.")))
    assert any(u.endswith("devio@disk.service") for u in units)
    assert any(u.endswith(".socket") for u in units)
    assert any("recover" in u for u in units)
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=120, cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "devio" not in r.stderr, r.stderr  # no warning about our units


UNIT_RUN = r"""
import os, shlex, socket, subprocess, sys, time
cmd, sock = sys.argv[1], sys.argv[2]
# a private /run as systemd would give the unit (RuntimeDirectory=devio, a journal)
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "devio-test", "/run"], check=True)
os.makedirs("/run/systemd/journal")
os.makedirs("/run/devio")
j = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
j.bind("/run/systemd/journal/socket")
r = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60)
print("exit", r.returncode, r.stderr.strip().replace("\n", " | "))
pidfile = "/run/devio/unit-test.pid"
pid = int(open(pidfile).read())
size = subprocess.run(["nbdinfo", "--size", "nbd+unix:///?socket=" + sock], capture_output=True, text=True)
print("size", size.stdout.strip())
os.kill(pid, 15)
for _ in range(600):
    if not os.path.exists("/proc/%d" % pid):
        break
    time.sleep(0.05)
print("gone", not os.path.exists("/proc/%d" % pid), "pidfile", os.path.exists(pidfile))
j.settimeout(0.5)
try:
    while True:
        print(j.recv(65536).decode(errors="replace").replace("\n", " "))
except socket.timeout:
    pass
"""


def test_devio_service_command_runs(tmp):
    """What devio@.service runs (ExecStart with %i and $DEVIO_ARGS filled
    in), in a private /run with a journal socket: it forks once ready,
    writes the PIDFile= systemd waits for, logs to the journal, and stops
    on SIGTERM."""
    d, _ = tmp
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    with open(os.path.join(ROOT, "systemd", "devio@.service.in")) as f:
        unit = f.read()
    line = [l for l in unit.splitlines() if l.startswith("ExecStart=")][0][len("ExecStart="):]
    assert "PIDFile=/run/devio/%i.pid" in unit and "Type=forking" in unit
    sock = os.path.join(d, "unit.sock")
    cmd = (line.replace("@bindir@", os.path.dirname(DEVIO)).replace("%i", "unit-test")
           .replace("$DEVIO_ARGS", f"ram:8M --nbd unix:{sock}"))
    script = os.path.join(d, "unit.py")
    with open(script, "w") as f:
        f.write(UNIT_RUN)
    out = run_ok("unshare", "--mount", sys.executable, script, cmd, sock)
    assert out.startswith("exit 0 "), out
    assert f"size {8 * MiB}\n" in out, out
    assert "gone True pidfile False" in out, out
    assert "SYSLOG_IDENTIFIER=devio" in out and "signal 15: stopping" in out, out
