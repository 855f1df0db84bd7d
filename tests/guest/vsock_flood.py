"""A hostile guest's vsock flood, run inside the guest by tests/hostile.rs.

Usage: python3 vsock_flood.py COUNT OUT RELEASE. Opens COUNT stream
connections to host ports (eleven in thirteen to 5000, where the test
listens and keeps every connection: past the VMM's cap of 1024 for 1300;
one in thirteen to the VMM's own ready port 1023, which closes them; one in
thirteen to 5001, where nobody listens), holds every
one that connects, writes a summary line "opened <results>" to OUT, then holds
them until the file RELEASE exists (or 300 s pass) and closes them all.
"""
import errno
import os
import resource
import socket
import sys
import time

count, out, release = int(sys.argv[1]), sys.argv[2], sys.argv[3]
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, count + 256))
PORTS = (5000,) * 11 + (1023, 5001)
held = []
results = {}
for i in range(count):
    port = PORTS[i % len(PORTS)]
    # A blocking connect: the guest kernel bounds it (vsock's connect
    # timeout, 2 s by default), and the interpreter's non-blocking connect
    # path with a timeout is where python3.11 crashed twice in this flood
    # (SIGSEGV at the same instruction both times).
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.connect((socket.VMADDR_CID_HOST, port))
        held.append(s)
        what = "ok"
    except OSError as e:
        what = errno.errorcode.get(e.errno, str(e))
        s.close()
    key = "%d:%s" % (port, what)
    results[key] = results.get(key, 0) + 1
with open(out + ".new", "w") as f:
    f.write("opened %s\n" % " ".join("%s=%d" % kv for kv in sorted(results.items())))
os.rename(out + ".new", out)
deadline = time.time() + 300
while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.2)
for s in held:
    s.close()
