"""conftest.py - fixtures shared by the integration tests: the devio binary,
a server process that is always stopped, ImDisk's devio command line on a
free port, free ports, scratch directories."""
import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The peers' Python tools (nbdsh: python3-libnbd) are Debian's: its python3
# first, whatever interpreter a PATH set up for development would find.
os.environ["PATH"] = "/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")
DEVIO = os.environ.get("DEVIO", os.path.join(ROOT, "build-test", "devio"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def vmrss(pid):
    """Resident bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def run_ok(*args, timeout=120):
    """Run a tool; its stdout, or an AssertionError with everything it said."""
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Server:
    """A `devio serve` process; stop() is idempotent and always called."""

    def __init__(self, args, env=None):
        self.args = [DEVIO, "serve"] + list(args)
        # stderr to a file, never a pipe: a chatty server must not block on it
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, env=env, start_new_session=True)

    def wait_tcp(self, port, timeout=10.0):
        wait_for(lambda: port_open(port) or self.proc.poll() is not None, timeout, f"port {port}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited {self.proc.returncode}: {self.stderr()}")

    def wait_unix(self, path, timeout=10.0):
        wait_for(lambda: os.path.exists(path) or self.proc.poll() is not None, timeout, path)
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited {self.proc.returncode}: {self.stderr()}")

    def stderr(self):
        """What the server has printed so far (stdout and stderr)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        """Stop the server; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session", autouse=True)
def prune_run_dir():
    """Tests kill servers with SIGKILL on purpose; what those left in the
    run directory (PID.status, .json, .lock) goes at the end of the run,
    as any reader of it removes the entries of dead servers."""
    yield
    subprocess.run([DEVIO, "status"], capture_output=True, timeout=60)


@pytest.fixture
def serve():
    """serve(args...) starts a server; every server is stopped at teardown."""
    servers = []

    def start(*args, env=None):
        s = Server(args, env=env)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
        out = s.stderr()
        if "AddressSanitizer" in out or "runtime error:" in out:
            pytest.fail(f"sanitizer report from {s.args}:\n{out}")


def stop_process(p, timeout=20):
    """SIGTERM, and SIGKILL when p has not gone within timeout seconds."""
    p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.fixture
def imdisk():
    """imdisk(args...) starts `devio ARGS` listening on a fresh TCP port."""
    procs = []

    def start(*args):
        port = free_port()
        argv = [DEVIO] + [str(port) if a == "PORT" else a for a in args]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        procs.append(p)
        wait_for(lambda: port_open(port) or p.poll() is not None, 30, f"port {port}")
        assert p.poll() is None, p.stderr.read()
        return p, port

    yield start
    for p in procs:
        if p.poll() is None:
            stop_process(p)
        err = p.stderr.read()
        p.stderr.close()
        assert b"AddressSanitizer" not in err and b"runtime error:" not in err, err
