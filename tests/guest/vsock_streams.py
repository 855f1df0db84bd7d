"""Concurrent vsock streams, run inside the guest by tests/vhost_user.rs.

Usage: python3 vsock_streams.py N MIB
- host to guest: listens on port 6000 and says so by connecting to host
  port 6002; takes N connections; from each it reads MIB MiB and answers
  the data's sha256 (hex, one line);
- guest to host: opens N connections to host port 6001 at once and sends
  MIB MiB on each: stream i sends bytes (i + j) % 251; the host checks.
Prints "streams done" when both directions finished.
"""
import ctypes
import hashlib
import socket
import struct
import sys
import threading

n = int(sys.argv[1])
size = int(sys.argv[2]) << 20
HOST = 2
# SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD (linux/vm_sockets.h), a struct timeval:
# a connect's answer waits behind the other streams' data, and the guest
# kernel is slow on PVM hosts; the default of 2 s is too short there.
CONNECT_TIMEOUT = 6
libc = ctypes.CDLL(None, use_errno=True)
errors = []


def vsock(timeout_s=120):
    """A vsock stream socket whose connect waits up to `timeout_s` (Python's
    setsockopt takes only integers at this level)."""
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    tv = struct.pack("ll", timeout_s, 0)
    if libc.setsockopt(s.fileno(), socket.AF_VSOCK, CONNECT_TIMEOUT, tv, len(tv)) != 0:
        raise OSError(ctypes.get_errno(), "setsockopt(SO_VM_SOCKETS_CONNECT_TIMEOUT)")
    return s


def serve_one(conn):
    try:
        h = hashlib.sha256()
        left = size
        while left:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                raise RuntimeError("the host closed early")
            h.update(chunk)
            left -= len(chunk)
        conn.sendall((h.hexdigest() + "\n").encode())
        conn.close()
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e))


def send_one(i):
    try:
        pattern = bytes((i + j) % 251 for j in range(251 * 256))
        s = vsock()
        s.connect((HOST, 6001))
        s.sendall(bytes([i]))
        left = size
        while left:
            part = pattern[: min(left, len(pattern))]
            s.sendall(part)
            left -= len(part)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        s.close()
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e))


listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, 6000))
listener.listen(n)
ready = vsock()
ready.connect((HOST, 6002))
ready.close()
threads = []
for _ in range(n):
    conn, _ = listener.accept()
    t = threading.Thread(target=serve_one, args=(conn,))
    t.start()
    threads.append(t)
for i in range(n):
    t = threading.Thread(target=send_one, args=(i,))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
if errors:
    print("errors", errors, flush=True)
    sys.exit(1)
print("streams done", flush=True)
