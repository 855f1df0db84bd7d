"""File-system benchmark run inside the guest by `vmm bench fs`.

Usage: fsbench.py MIB FILES RUNS TARGET=DIR...
For each target: sequential write (1 MiB writes, then fsync) and read (guest
page cache dropped first) of MIB MiB, and FILES x (create + stat + unlink).
Prints one line per target: `fsbench {json}`, then `fsbench-done`.
"""
import json
import os
import sys
import time

mib, files, runs = (int(a) for a in sys.argv[1:4])
chunk = os.urandom(1 << 20)
buf = bytearray(1 << 20)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


for spec in sys.argv[4:]:
    target, d = spec.split("=", 1)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "seq.bin")
    out = {"target": target, "write_mibs": [], "read_mibs": [], "meta_files_per_s": []}
    for _ in range(runs):
        t = time.monotonic()
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for _ in range(mib):
            os.write(fd, chunk)
        os.fsync(fd)
        os.close(fd)
        out["write_mibs"].append(mib / (time.monotonic() - t))
        drop_caches()
        t = time.monotonic()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        out["read_mibs"].append(mib / (time.monotonic() - t))
        t = time.monotonic()
        for i in range(files):
            p = os.path.join(d, f"m{i}")
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            os.stat(p)
            os.unlink(p)
        out["meta_files_per_s"].append(files / (time.monotonic() - t))
    os.unlink(path)
    print("fsbench " + json.dumps(out), flush=True)
print("fsbench-done", flush=True)
