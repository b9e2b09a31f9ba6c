"""one_conn_server.py - a devio protocol server that behaves as ImDisk's
devio does on Linux, written from the protocol's definition
(docs/devio-protocol.md) for the tests: it accepts ONE connection, stops
listening, serves it (INFO, READ, WRITE, CLOSE; nothing else offered) and
exits.  Options mimic ImDisk's devio: --size-zero reports size 0 (a block
device on Linux), --buffersize N exits on a WRITE longer than N bytes (its
buffer).

    python3 one_conn_server.py PORTFILE IMAGE [--size-zero] [--buffersize N]

The port it listens on (127.0.0.1) is written to PORTFILE once it listens.
"""
import os
import socket
import struct
import sys

INFO, READ, WRITE, CLOSE = 1, 2, 3, 5


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            raise EOFError
        buf += c
    return bytes(buf)


def serve(conn, fd, size, report_size, bufsize):
    while True:
        (code,) = struct.unpack("<Q", recv_exact(conn, 8))
        if code == INFO:
            conn.sendall(struct.pack("<3Q", report_size, 1, 0))
        elif code == READ:
            off, length = struct.unpack("<2Q", recv_exact(conn, 16))
            data = os.pread(fd, length, off) if off < size else b""
            conn.sendall(struct.pack("<2Q", 0, len(data)) + data)
        elif code == WRITE:
            off, length = struct.unpack("<2Q", recv_exact(conn, 16))
            if bufsize and length > bufsize:
                sys.exit(f"write of {length} bytes over the {bufsize}-byte buffer")
            data = recv_exact(conn, length)
            n = os.pwrite(fd, data, off)
            conn.sendall(struct.pack("<2Q", 0, n))
        elif code == CLOSE:
            return
        else:
            conn.sendall(struct.pack("<Q", 19))  # ENODEV


def main():
    portfile, image = sys.argv[1], sys.argv[2]
    bufsize = int(sys.argv[sys.argv.index("--buffersize") + 1]) if "--buffersize" in sys.argv else 0
    fd = os.open(image, os.O_RDWR)
    size = os.fstat(fd).st_size
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(lst.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    conn, _ = lst.accept()
    lst.close()  # exactly one connection, as ImDisk's devio
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        serve(conn, fd, size, 0 if "--size-zero" in sys.argv else size, bufsize)
    except EOFError:
        pass


if __name__ == "__main__":
    main()
