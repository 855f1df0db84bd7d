"""Network benchmark run inside the guest by `vmm bench net`.

The guest fetches this text from the host at start; the host puts a first
line in front of it that sets MIB, RUNS, CONNECTS and the ports SOURCE, SINK
and ACCEPT of its servers on 10.0.2.2 (the host's loopback on both qemu's
user network and ours). Per run: MIB MiB host -> guest (the SOURCE server
sends what the guest asks for) and guest -> host (the SINK server answers
once it has every byte); then CONNECTS connection set-ups to ACCEPT. Prints
`netbench {json}`, then `netbench-done`.
"""
import json
import socket
import time

HOST = "10.0.2.2"
size = MIB << 20
out = {"host_to_guest_mibs": [], "guest_to_host_mibs": [], "connect_ms": []}
view = memoryview(bytearray(1 << 20))
chunk = bytes(1 << 20)

for _ in range(RUNS):
    s = socket.create_connection((HOST, SOURCE))
    t = time.monotonic()
    s.sendall(b"%d\n" % size)
    got = 0
    while True:
        n = s.recv_into(view)
        if not n:
            break
        got += n
    dt = time.monotonic() - t
    s.close()
    if got != size:
        raise SystemExit("netbench: got %d of %d bytes" % (got, size))
    out["host_to_guest_mibs"].append(MIB / dt)

    s = socket.create_connection((HOST, SINK))
    t = time.monotonic()
    left = size
    while left:
        n = min(left, len(chunk))
        s.sendall(chunk[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    if s.recv(16) != b"ok":
        raise SystemExit("netbench: the sink did not confirm")
    out["guest_to_host_mibs"].append(MIB / (time.monotonic() - t))
    s.close()

for _ in range(CONNECTS):
    t = time.monotonic()
    s = socket.create_connection((HOST, ACCEPT))
    out["connect_ms"].append((time.monotonic() - t) * 1000)
    s.close()

print("netbench " + json.dumps(out), flush=True)
print("netbench-done", flush=True)
