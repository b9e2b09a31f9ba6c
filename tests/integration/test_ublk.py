"""test_ublk.py - the --ublk front end's refusals on the host, whose kernel
has no ublk_drv: bad arguments are reported before the kernel is asked, a
missing driver fails the start cleanly.  Devices themselves are tested in
the guest kernel (tests/vm: ublk-* scenarios)."""
import os
import subprocess

import pytest

from conftest import DEVIO


def serve(*args, timeout=30):
    return subprocess.run([DEVIO, "serve", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args,message", [
    (["ram:1M", "--ublk=fast"], "want [ID][,user-copy|,kernel-copy|,zero-copy][,legacy-opcodes]"),
    (["ram:1M", "--ublk=1,2x"], "want [ID][,user-copy|,kernel-copy|,zero-copy][,legacy-opcodes]"),
    (["ram:1M", "--ublk", "--block-size", "8192"], "at most 4096"),
    (["ram:1M", "--ublk", "--depth", "5000"], "--depth"),
    (["ram:1K", "--ublk", "--block-size", "4096"], "smaller than one 4096-byte block"),
    # --recover serves the device as it was made, its request size included
    (["ram:1M", "--ublk=0", "--recover", "--max-io", "1M"], "request size"),
])
def test_bad_arguments_are_refused(args, message):
    r = serve(*args)
    assert r.returncode == 1
    assert message in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("devio: error:")]
    assert len(errors) == 1, r.stderr  # told once, by the part that knows why


def test_unknown_copy_mode_is_refused():
    r = serve("ram:1M", "--ublk", "--ublk-copy", "none")
    assert r.returncode == 2  # a usage error, told before anything starts
    assert "--ublk-copy: want auto, zero, user, kernel" in r.stderr


@pytest.mark.parametrize("size", ["1000", "4097", "64M", "0", "lots"])
def test_bad_max_io_is_refused(size):
    r = serve("ram:1M", "--ublk", "--max-io", size)
    assert r.returncode == 2  # a usage error, told before anything starts
    assert "--max-io: want a multiple of 4096 from 4096 to 33554432" in r.stderr


def test_unknown_batch_mode_is_refused():
    r = serve("ram:1M", "--ublk", "--ublk-batch", "maybe")
    assert r.returncode == 2  # a usage error, told before anything starts
    assert "--ublk-batch: want auto, on or off, got 'maybe'" in r.stderr


@pytest.mark.skipif(os.path.exists("/dev/ublk-control"), reason="ublk_drv is loaded here")
def test_missing_driver_fails_cleanly():
    r = serve("ram:1M", "--ublk")
    assert r.returncode == 1
    assert "/dev/ublk-control" in r.stderr
    assert "ublk_drv" in r.stderr
