"""devio_wire.py - an independent client of ImDisk's devio stream protocol,
written from the protocol's definition with struct (it shares no code with
the C client), for tests: every field a 64-bit little-endian integer, one
request outstanding per connection."""
import socket
import struct

INFO, READ, WRITE, CONNECT, CLOSE, UNMAP, ZERO, SCSI, SHARED = 1, 2, 3, 4, 5, 6, 7, 8, 9
FLAG_RO, FLAG_UNMAP, FLAG_ZERO = 0x01, 0x02, 0x04
ENODEV = 19


class ProtocolError(Exception):
    pass


def q(*vals):
    """Pack 64-bit little-endian unsigned integers."""
    return struct.pack("<%dQ" % len(vals), *vals)


class Client:
    """One connection to a devio server (TCP port, or a Unix socket path)."""

    def __init__(self, port=None, path=None, host="127.0.0.1", timeout=30.0, sock=None):
        if sock is not None:
            self.s = sock
        elif path is not None:
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.s.settimeout(timeout)
            self.s.connect(path)
        else:
            self.s = socket.create_connection((host, port), timeout=timeout)
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s.settimeout(timeout)

    def close(self):
        self.s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw bytes --
    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        chunks, got = [], 0
        while got < n:
            c = self.s.recv(min(n - got, 1 << 20))
            if not c:
                raise ProtocolError(f"connection closed after {got} of {n} bytes")
            chunks.append(c)
            got += len(c)
        return b"".join(chunks)

    def recv_q(self, n=1):
        return struct.unpack("<%dQ" % n, self.recv_exact(8 * n))

    def at_eof(self, timeout=10.0):
        """True if the server closed the connection (and sent nothing more)."""
        old = self.s.gettimeout()
        self.s.settimeout(timeout)
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True
        finally:
            self.s.settimeout(old)

    # -- requests --
    def info(self):
        """(file_size, req_alignment, flags)"""
        self.send(q(INFO))
        return self.recv_q(3)

    def read(self, offset, length):
        """(errorno, data)"""
        self.send(q(READ, offset, length))
        err, n = self.recv_q(2)
        if err:
            if n:
                raise ProtocolError(f"READ error {err} with length {n}")
            return err, b""
        if n > length:
            raise ProtocolError(f"READ answered {n} bytes for {length}")
        return 0, self.recv_exact(n)

    def write(self, offset, data):
        """(errorno, length written)"""
        self.send(q(WRITE, offset, len(data)) + data)
        return self.recv_q(2)

    def _ranges(self, code, ranges):
        body = b"".join(struct.pack("<qQ", off, ln) for off, ln in ranges)
        self.send(q(code, len(body)) + body)
        return self.recv_q(1)[0]

    def unmap(self, ranges):
        return self._ranges(UNMAP, ranges)

    def zero(self, ranges):
        return self._ranges(ZERO, ranges)

    def bye(self):
        self.send(q(CLOSE))
