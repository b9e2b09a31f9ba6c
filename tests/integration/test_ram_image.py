"""test_ram_image.py - ram:SIZE,image=FILE (backends/ram_image.c): a RAM disk
kept in a file.  kill -9 after a FLUSH loses nothing; writes reach the file
within sync-interval, after sync-every bytes, and at a clean stop; a crash
between the journal and the image is completed at the next start, a damaged
journal ignored; loading is sparse (memory follows the data, not the size)
and TRIM punches holes in the file."""
import os
import signal

import pytest

from conftest import vmrss, wait_for

MiB = 1 << 20


def nbd_handle(sock):
    import nbd
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    return h


def start(serve, tmp_path, img, *opts, env=None):
    # a fresh socket path each time: a killed server leaves its socket behind
    sock = str(tmp_path / f"r{len(os.listdir(tmp_path))}.sock")
    src = f"ram:64M,image={img}" + "".join("," + o for o in opts)
    s = serve(src, "--nbd", f"unix:{sock}", env=env)
    s.wait_unix(sock)
    return s, sock


def file_at(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_kill9_after_flush_loses_nothing_and_reloads(serve, tmp_path):
    img = str(tmp_path / "disk.img")
    data = os.urandom(3 * MiB)
    s, sock = start(serve, tmp_path, img, "sync-interval=3600", "sync-every=1G")
    h = nbd_handle(sock)
    h.pwrite(data, MiB)
    h.flush()
    h.shutdown()
    s.stop(sig=signal.SIGKILL)
    assert file_at(img, MiB, len(data)) == data
    assert os.path.getsize(img) == 64 * MiB and os.stat(img).st_blocks * 512 < 8 * MiB  # sparse
    s, sock = start(serve, tmp_path, img, "sync-interval=3600")
    h = nbd_handle(sock)
    assert h.pread(len(data), MiB) == data
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    assert s.stop() == 0


def test_background_write_back(serve, tmp_path):
    img = str(tmp_path / "disk.img")
    s, sock = start(serve, tmp_path, img, "sync-interval=1")
    h = nbd_handle(sock)
    h.pwrite(b"interval" * 512, 0)
    wait_for(lambda: file_at(img, 0, 8) == b"interval", 30, "write-back by the interval")
    h.shutdown()
    s.stop(sig=signal.SIGKILL)
    s, sock = start(serve, tmp_path, img, "sync-interval=3600", "sync-every=1M")
    h = nbd_handle(sock)
    h.pwrite(b"every!!!" * 512, 0)  # dirty before the bytes that trigger the write-back
    h.pwrite(os.urandom(2 * MiB), 8 * MiB)
    wait_for(lambda: file_at(img, 0, 8) == b"every!!!", 30, "write-back after sync-every bytes")
    h.shutdown()
    s.stop(sig=signal.SIGKILL)


def test_clean_stop_writes_back(serve, tmp_path):
    img = str(tmp_path / "disk.img")
    s, sock = start(serve, tmp_path, img, "sync-interval=3600")
    h = nbd_handle(sock)
    h.pwrite(b"stopped!" * 512, 4096)
    h.shutdown()
    assert s.stop() == 0
    assert file_at(img, 4096, 8) == b"stopped!"
    assert os.path.getsize(img + ".journal") == 0


def test_crash_between_journal_and_image_is_completed(serve, tmp_path):
    img = str(tmp_path / "disk.img")
    data = os.urandom(MiB)
    env = dict(os.environ, DEVIO_RAM_IMAGE_CRASH_AFTER_JOURNAL="1")
    s, sock = start(serve, tmp_path, img, "sync-interval=3600", env=env)
    h = nbd_handle(sock)
    h.pwrite(data, 0)
    with pytest.raises(Exception):
        h.flush()  # the server dies inside it
    wait_for(lambda: s.proc.poll() is not None, 30, "the crash")
    assert s.proc.returncode == 99
    assert file_at(img, 0, len(data)) != data  # the image not written yet
    assert os.path.getsize(img + ".journal") > len(data)
    s, sock = start(serve, tmp_path, img, "sync-interval=3600")
    assert "completed the write-back a crash interrupted" in s.stderr()
    assert file_at(img, 0, len(data)) == data
    h = nbd_handle(sock)
    assert h.pread(len(data), 0) == data
    h.shutdown()
    assert s.stop() == 0


def test_damaged_journal_is_ignored(serve, tmp_path):
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as f:
        f.write(b"kept" * 1024)
        f.truncate(64 * MiB)
    for junk in (b"DEVIORJ1" + bytes(100), os.urandom(70000)):
        with open(img + ".journal", "wb") as f:
            f.write(junk)
        s, sock = start(serve, tmp_path, img, "sync-interval=3600")
        assert "ignored an incomplete journal" in s.stderr()
        h = nbd_handle(sock)
        assert h.pread(16, 0) == b"kept" * 4
        h.shutdown()
        assert s.stop() == 0
        assert file_at(img, 0, 16) == b"kept" * 4


def test_load_is_sparse_and_trim_punches(serve, tmp_path):
    img = str(tmp_path / "disk.img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(os.urandom(2 * MiB))
        f.seek(40 * MiB)
        f.write(bytes(4 * MiB))  # data extents of zeroes: not loaded
    s, sock = start(serve, tmp_path, img, "sync-interval=3600")
    # memory follows what holds data (2 MiB), not the 64 MiB disk
    assert vmrss(s.proc.pid) < 64 * MiB
    h = nbd_handle(sock)
    h.trim(2 * MiB, 32 * MiB)
    h.flush()
    h.shutdown()
    assert os.stat(img).st_blocks * 512 < 5 * MiB  # the 2 MiB punched (the zeroes may stay)
    assert file_at(img, 32 * MiB, 4096) == bytes(4096)
    assert s.stop() == 0
