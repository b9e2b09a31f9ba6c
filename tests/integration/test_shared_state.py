"""test_shared_state.py - devio never breaks state other programs depend
on: a live Unix socket is not taken over, a mount point that already is
one is refused and only devio's own mount is unmounted, enable_uring is
switched on only when asked, `devio detach` cleans what a killed server
left and stops a multi-front-end server only with --all, a stale status
file never gets an unrelated process signalled, and a hung FUSE server is
cut off by `detach --force` or the kernel's request timeout."""
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import DEVIO, run_ok, wait_for
from test_fuse import ENABLE_URING, MiB, Scratch, is_mounted, lazy_umount, loop_exists, run

RUN_DIR = "/run/devio"


@pytest.fixture
def scratch():
    s = Scratch()
    yield s
    s.close()


def devio(*args, timeout=120):
    return subprocess.run([DEVIO, *args], capture_output=True, text=True, timeout=timeout)


def nbd_size(sock):
    return int(run_ok("nbdinfo", "--size", f"nbd+unix:///?socket={sock}").strip())


def devio_size(sock):
    out = run_ok(DEVIO, "info", f"devio+unix://{sock}")
    return out


def served_size(kind, sock):
    if kind == "nbd":
        return nbd_size(sock)
    out = devio_size(sock)
    assert str(8 * MiB) in out, out
    return 8 * MiB


def start_fuse(serve, mnt, *extra, source="ram:64M"):
    """serve --fuse mnt; the server and what it printed first (file or loop device)."""
    s = serve(source, "--fuse", mnt, *extra)
    want = "/dev/loop" if "--loop" in extra else os.path.join(mnt, "disk")
    def lines():
        return [l for l in s.stderr().splitlines() if l.startswith(want)]

    wait_for(lambda: lines() or s.proc.poll() is not None, 30, "fuse ready")
    assert s.proc.poll() is None, s.stderr()
    wait_for(lambda: f"{s.proc.pid}.status" in status_files(), 10, "status file")
    return s, lines()[0]


def connects(sock):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(sock)
            return True
        except OSError:
            return False


def on_cleanup(scratch, fn):
    scratch.cleanups.append(fn)


# ---- Unix sockets ----

@pytest.mark.parametrize("kind", ["nbd", "devio"])
def test_live_unix_socket_is_not_taken_over(serve, scratch, kind):
    sock = scratch.path("s.sock")
    first = serve("ram:8M", f"--{kind}", f"unix:{sock}")
    first.wait_unix(sock)
    second = serve("ram:4M", f"--{kind}", f"unix:{sock}")
    assert second.proc.wait(timeout=30) == 1
    assert "in use by another server" in second.stderr()
    assert served_size(kind, sock) == 8 * MiB  # still the first server's
    # a stale socket (its server killed) is replaced
    first.stop(signal.SIGKILL)
    assert not connects(sock)
    third = serve("ram:8M", f"--{kind}", f"unix:{sock}")
    wait_for(lambda: connects(sock) or third.proc.poll() is not None, 10, "third server")
    assert third.proc.poll() is None, third.stderr()
    assert served_size(kind, sock) == 8 * MiB
    assert third.stop() == 0


def test_servers_racing_for_one_socket(serve, scratch):
    """Started at the same moment on one path: one serves, the others say
    the socket is in use and exit 1 (never two, never a stolen path).
    (The window this closes is microseconds wide: a regression check, not
    a reproducer.)"""
    for i in range(5):
        sock = scratch.path(f"race{i}.sock")
        servers = [serve(f"ram:{k + 1}M", "--nbd", f"unix:{sock}") for k in range(4)]
        wait_for(lambda: sum(s.proc.poll() is not None for s in servers) == 3, 60, "all but one give up")
        winner = [s for s in servers if s.proc.poll() is None][0]
        for s in servers:
            if s is not winner:
                assert s.proc.returncode == 1 and "in use by another server" in s.stderr(), s.stderr()
        assert nbd_size(sock) == (servers.index(winner) + 1) * MiB
        assert winner.stop() == 0
        assert not os.path.exists(sock)


# ---- FUSE mounts ----

def test_fuse_refuses_a_mount_point(serve, scratch):
    mnt = scratch.mkdir("mnt")
    run("mount", "-t", "tmpfs", "-o", "size=1m", "devio-test", mnt)
    with open(os.path.join(mnt, "keep"), "w") as f:
        f.write("mine")
    s = serve("ram:8M", "--fuse", mnt)
    assert s.proc.wait(timeout=30) == 1
    assert "already a mount point" in s.stderr()
    with open(os.path.join(mnt, "keep")) as f:  # the tmpfs is untouched, nothing stacked on it
        assert f.read() == "mine"
    run("umount", mnt)
    assert not is_mounted(mnt)


def test_fuse_stop_unmounts_only_its_own_mount(serve, scratch):
    mnt = scratch.mkdir("mnt")
    s, _ = start_fuse(serve, mnt)
    run("mount", "-t", "tmpfs", "-o", "size=1m", "devio-test", mnt)  # someone mounts over ours
    with open(os.path.join(mnt, "keep"), "w") as f:
        f.write("mine")
    assert s.stop() == 0, s.stderr()
    assert "another mount covers ours" in s.stderr()
    with open(os.path.join(mnt, "keep")) as f:  # not unmounted by path
        assert f.read() == "mine"
    run("umount", mnt)
    # what is left under it is devio's dead mount: detach removes it
    assert is_mounted(mnt)
    r = devio("detach", mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)


def test_fuse_stop_finds_its_moved_mount(serve, scratch):
    """The mount was moved (mount --move): stop unmounts it where it is
    now, found by its mount ID."""
    mnt = scratch.mkdir("mnt")
    moved = scratch.mkdir("moved")
    s, _ = start_fuse(serve, mnt)
    r = run("mount", "--move", mnt, moved, check=False)
    if r.returncode != 0:
        pytest.skip(f"mount --move refused here: {r.stderr.strip()}")
    assert os.path.exists(os.path.join(moved, "disk"))
    assert s.stop() == 0, s.stderr()
    assert f"our mount is at {moved} now" in s.stderr()
    assert not is_mounted(moved) and not is_mounted(mnt)


# ---- enable_uring ----

def test_uring_transport_never_switches_the_kernel_on_silently(serve, scratch):
    if not os.path.exists(ENABLE_URING):
        pytest.skip("kernel without FUSE over io_uring")
    with open(ENABLE_URING) as f:
        old = f.read().strip()
    try:
        with open(ENABLE_URING, "w") as f:
            f.write("N")
        mnt = scratch.mkdir("mnt")
        s = serve("ram:8M", "--fuse", mnt, "--fuse-transport", "uring")
        assert s.proc.wait(timeout=30) == 1
        assert "--fuse-enable-uring" in s.stderr()
        with open(ENABLE_URING) as f:
            assert f.read().strip() == "N"
        assert not is_mounted(mnt)
    finally:
        with open(ENABLE_URING, "w") as f:
            f.write(old)


# ---- detach ----

def status_files():
    try:
        return set(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return set()


def test_detach_after_kill9_cleans_mount_and_loop(serve, scratch):
    mnt = scratch.mkdir("mnt")
    s, dev = start_fuse(serve, mnt, "--loop")
    on_cleanup(scratch, lambda: loop_exists(dev) and subprocess.run(["losetup", "-d", dev], capture_output=True))
    pid = s.proc.pid
    s.stop(signal.SIGKILL)
    with pytest.raises(OSError):
        os.listdir(mnt)  # Transport endpoint is not connected
    r = devio("detach", mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    wait_for(lambda: not loop_exists(dev), 30, f"{dev} detached")
    assert f"{pid}.status" not in status_files() and f"{pid}.lock" not in status_files()


def test_detach_one_front_end_of_several_needs_all(serve, scratch):
    mnt = scratch.mkdir("mnt")
    sock = scratch.path("n.sock")
    s, _ = start_fuse(serve, mnt, "--nbd", f"unix:{sock}")
    s.wait_unix(sock)
    r = devio("detach", mnt)
    assert r.returncode == 1
    assert "--all" in r.stderr and f"--nbd unix:{sock}" in r.stderr, r.stderr
    assert s.proc.poll() is None and nbd_size(sock) == 64 * MiB and is_mounted(mnt)
    r = devio("detach", "--all", mnt)
    assert r.returncode == 0, r.stderr
    assert s.proc.wait(timeout=30) == 0
    assert not is_mounted(mnt) and not os.path.exists(sock)


def stale_entry(pid, mnt, start, lock):
    """A status file as a killed server left it, naming pid."""
    os.makedirs(RUN_DIR, exist_ok=True)
    path = os.path.join(RUN_DIR, f"{pid}.status")
    with open(path, "w") as f:
        f.write(f"pid {pid}\n" + (f"start {start}\n" if start else "") +
                f"export '' ram:8M size 8388608\nfrontend --fuse {mnt}\n  fuse mount {mnt} file {mnt}/disk\n")
    if lock:
        open(os.path.join(RUN_DIR, f"{pid}.lock"), "w").close()
    return path


@pytest.mark.parametrize("how", ["lock", "start", "legacy"])
def test_stale_status_with_a_reused_pid_signals_nothing(scratch, how):
    """The pid of a dead server now belongs to an unrelated process: detach
    must not signal it, and the stale entry goes."""
    mnt = scratch.mkdir("mnt")
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        path = stale_entry(other.pid, mnt, start=1 if how != "legacy" else 0, lock=how == "lock")
        r = devio("detach", mnt)
        assert r.returncode == 1 and "no devio server serves it" in r.stderr, r.stderr
        time.sleep(0.2)
        assert other.poll() is None  # never signalled
        assert not os.path.exists(path)
        assert not os.path.exists(os.path.join(RUN_DIR, f"{other.pid}.lock"))
        stale_entry(other.pid, mnt, start=1, lock=False)
        assert f"pid {other.pid}\n" not in devio("status").stdout
        assert not os.path.exists(path)
    finally:
        other.kill()
        other.wait()
        for ext in ("status", "lock"):
            try:
                os.unlink(os.path.join(RUN_DIR, f"{other.pid}.{ext}"))
            except FileNotFoundError:
                pass


@pytest.mark.parametrize("lock", [True, False])
def test_files_of_a_server_killed_before_its_status_go(lock):
    """A server killed while starting or while writing its files leaves
    PID.json, PID.status.tmp or PID.json.tmp without PID.status: the next
    reader removes them once the pid is gone (its lock held by nobody)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    names = [f"{gone.pid}.{ext}" for ext in ("json", "status.tmp", "json.tmp")] + ([f"{gone.pid}.lock"] if lock else [])
    os.makedirs(RUN_DIR, exist_ok=True)
    try:
        for name in names:
            with open(os.path.join(RUN_DIR, name), "w") as f:
                f.write("{}\n" if "json" in name else "")
        r = devio("status")
        assert r.returncode == 0, r.stderr
        assert not [n for n in names if n in status_files()], status_files()
    finally:
        for name in names:
            try:
                os.unlink(os.path.join(RUN_DIR, name))
            except FileNotFoundError:
                pass


def test_detach_force_frees_a_hung_server(serve, scratch):
    """A stopped FUSE server blocks the loop device; detach --force aborts
    the connection, the reader gets an error, everything goes."""
    mnt = scratch.mkdir("mnt")
    s, dev = start_fuse(serve, mnt, "--loop", "--fuse-transport", "dev")
    on_cleanup(scratch, lambda: loop_exists(dev) and subprocess.run(["losetup", "-d", dev], capture_output=True))
    os.kill(s.proc.pid, signal.SIGSTOP)
    on_cleanup(scratch, lambda: s.proc.poll() is None and os.kill(s.proc.pid, signal.SIGCONT))
    reader = subprocess.Popen(["dd", f"if={dev}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct",
                               "skip=100"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        r = devio("detach", "--force", mnt, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "aborted FUSE connection" in r.stderr
        assert reader.wait(timeout=60) != 0  # an I/O error, not a hang
        assert s.proc.wait(timeout=30) is not None
        assert not is_mounted(mnt)
        wait_for(lambda: not loop_exists(dev), 30, f"{dev} detached")
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def test_fuse_request_timeout_cuts_off_a_hung_server(serve, scratch):
    """--fuse-timeout: the kernel (6.14+) aborts the connection when a
    request waits longer; a reader of a stopped server gets an error."""
    mnt = scratch.mkdir("mnt")
    s, disk = start_fuse(serve, mnt, "--fuse-timeout", "1", "--fuse-transport", "dev")
    status = devio("status").stdout
    if "request-timeout" not in status:
        assert "no FUSE request timeout" in s.stderr()
        pytest.skip("kernel without FUSE request timeouts")
    os.kill(s.proc.pid, signal.SIGSTOP)
    try:
        reader = subprocess.run(["dd", f"if={disk}", "of=/dev/null", "bs=64k", "count=4", "iflag=direct",
                                 "skip=200"], capture_output=True, text=True, timeout=120)
        assert reader.returncode != 0, reader.stderr
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    assert s.stop() == 0, s.stderr()
    lazy_umount(mnt)
    assert not is_mounted(mnt)
