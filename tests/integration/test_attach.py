"""test_attach.py - `devio attach URI --fuse DIR --loop` against real servers
(this project's devio and NBD front ends, and nbdkit's memory plugin as a
third-party NBD server), then `devio detach`."""
import os
import shutil
import signal
import subprocess

import pytest

from conftest import DEVIO, wait_for
from test_fuse import MiB, Scratch, is_mounted, lazy_umount, loop_exists, run


@pytest.fixture
def scratch():
    s = Scratch()
    yield s
    s.close()


def attach(scratch, uri, *extra):
    """devio attach -d; returns the loop device.  Detached at teardown."""
    mnt = scratch.mkdir("mnt")
    log = open(scratch.path("attach.log"), "w")
    scratch.cleanups.append(log.close)
    r = subprocess.run([DEVIO, "attach", uri, "--fuse", mnt, "--loop", "-d", *extra],
                       stdout=subprocess.PIPE, stderr=log, text=True, timeout=60)
    scratch.cleanups.append(lambda: subprocess.run([DEVIO, "detach", mnt], capture_output=True, timeout=60))
    with open(scratch.path("attach.log")) as f:
        err = f.read()
    assert r.returncode == 0, err
    dev = r.stdout.strip()
    assert dev.startswith("/dev/loop"), r.stdout
    scratch.cleanups.append(lambda: loop_exists(dev) and subprocess.run(["losetup", "-d", dev], capture_output=True))
    return mnt, dev


def write_read_detach(scratch, uri, size=8 * MiB):
    mnt, dev = attach(scratch, uri)
    data = os.urandom(size)
    with open(dev, "r+b", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    with open(dev, "rb") as f:
        assert f.read(size) == data
    run(DEVIO, "detach", mnt, timeout=60)
    assert not is_mounted(mnt)
    wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")
    with open(os.path.join(scratch.dir, "attach.log")) as f:
        log = f.read()
    assert "AddressSanitizer" not in log and "runtime error:" not in log, log
    return data


def test_attach_devio_server(serve, scratch):
    img = scratch.path("img.raw")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    sock = scratch.path("devio.sock")
    s = serve(img, "--devio", "unix:" + sock)
    s.wait_unix(sock)
    data = write_read_detach(scratch, "devio+unix://" + sock)
    with open(img, "rb") as f:
        assert f.read(len(data)) == data


def test_attach_nbd_server(serve, scratch):
    img = scratch.path("img.raw")
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    sock = scratch.path("nbd.sock")
    s = serve(img, "--nbd", "unix:" + sock)
    s.wait_unix(sock)
    data = write_read_detach(scratch, f"nbd+unix:///?socket={sock}")
    with open(img, "rb") as f:
        assert f.read(len(data)) == data


def test_attach_nbdkit_memory(scratch):
    if not shutil.which("nbdkit"):
        pytest.skip("no nbdkit")
    sock = scratch.path("nbdkit.sock")
    pidfile = scratch.path("nbdkit.pid")
    run("nbdkit", "-U", sock, "-P", pidfile, "memory", "64M")

    def kill_nbdkit():
        with open(pidfile) as f:
            os.kill(int(f.read()), signal.SIGTERM)
    scratch.cleanups.insert(0, kill_nbdkit)  # after every other cleanup
    wait_for(lambda: os.path.exists(sock), 10, sock)
    data = write_read_detach(scratch, f"nbd+unix:///?socket={sock}")
    # the bytes are in nbdkit: read them back with a third-party client
    out = subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "-"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout[: len(data)] == data


def test_attach_foreground_sigterm(serve, scratch):
    """Without -d attach runs until signalled, then unmounts and detaches."""
    sock = scratch.path("devio.sock")
    s = serve("ram:16M", "--devio", "unix:" + sock)
    s.wait_unix(sock)
    mnt = scratch.mkdir("mnt")
    p = subprocess.Popen([DEVIO, "attach", "devio+unix://" + sock, "--fuse", mnt, "--loop"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        dev = p.stdout.readline().strip()
        assert dev.startswith("/dev/loop")
        assert is_mounted(mnt) and loop_exists(dev)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not is_mounted(mnt)
        wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        lazy_umount(mnt)


def test_detach_by_loop_device(serve, scratch):
    """devio detach /dev/loopN finds the attach process by its loop device."""
    sock = scratch.path("devio.sock")
    s = serve("ram:16M", "--devio", "unix:" + sock)
    s.wait_unix(sock)
    mnt, dev = attach(scratch, "devio+unix://" + sock)
    out = run(DEVIO, "status").stdout
    assert f"loop {dev}" in out and "fuse transport" in out, out
    run(DEVIO, "detach", dev, timeout=60)
    assert not is_mounted(mnt)
    wait_for(lambda: not loop_exists(dev), 10, f"{dev} detached")
    r = subprocess.run([DEVIO, "detach", mnt], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "no devio server" in r.stderr
