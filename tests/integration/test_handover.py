"""test_handover.py - the hand-over request (SIGUSR2, `devio detach
--handover`) on the host: a server whose front ends cannot hand over (NBD
here; ublk needs the guest, tests/vm/scenarios/ublk-handover.sh) refuses
it in its log and goes on serving, and detach refuses targets that are not
ublk devices or that no server serves."""
import os
import signal
import subprocess
import time

from conftest import DEVIO, wait_for


def test_sigusr2_refused_by_nbd_server_serves_on(serve, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20))
    sock = str(tmp_path / "s.sock")
    s = serve(str(img), "--nbd", "unix:" + sock)
    s.wait_unix(sock)
    s.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: "cannot hand over" in s.stderr(), 10, "the refusal in the log")
    time.sleep(0.3)
    assert s.proc.poll() is None, s.stderr()
    # still serving: a real NBD client reads the image
    out = subprocess.run(["nbdcopy", "nbd+unix:///?socket=" + sock, "-"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == img.read_bytes()
    assert "--nbd cannot hand over" in s.stderr()
    assert s.stop() == 0


def test_detach_handover_needs_a_ublk_device(tmp_path):
    r = subprocess.run([DEVIO, "detach", "--handover", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "only a ublk device" in r.stderr


def test_detach_handover_without_server(tmp_path):
    # a device name no server has in its status file
    r = subprocess.run([DEVIO, "detach", "--handover", "/dev/ublkb4000"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert "no devio server serves it" in r.stderr
