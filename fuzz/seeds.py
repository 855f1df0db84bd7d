#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora into fuzz/seeds/<target>/.

Each seed is a well-formed input in the target's format (see the targets'
doc comments and fuzz/src/driver.rs), so the fuzzer starts from requests
a real driver or client sends. Run it again after changing a format;
the outputs are committed.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- driver records (fuzz/src/driver.rs) ---------------------------------

def chain(queue, *descs):
    """descs: (b"bytes") for a driver-written descriptor, or an int for a
    device-writable one of that length."""
    out = bytes([0, queue, len(descs) - 1])
    for d in descs:
        if isinstance(d, int):
            out += bytes([1]) + struct.pack("<H", d)
        else:
            out += bytes([0]) + struct.pack("<H", len(d)) + d
    return out


def reg_write(offset, value):
    return bytes([1]) + struct.pack("<HI", offset, value)


def reg_read(offset):
    return bytes([2]) + struct.pack("<H", offset)


SETUP = bytes([4])

# --- virtio-blk ------------------------------------------------------------

def blk_req(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


BLK = {
    "read": chain(0, blk_req(0, 2), 512, 1),
    "write-read": chain(0, blk_req(1, 3), b"\xab" * 512, 1) + chain(0, blk_req(0, 3), 512, 1),
    "flush": chain(0, blk_req(4), 1),
    "get-id": chain(0, blk_req(8), 20, 1),
    "discard": chain(0, blk_req(11), struct.pack("<QII", 8, 8, 0), 1),
    "write-zeroes": chain(0, blk_req(13), struct.pack("<QII", 16, 8, 0), 1),
    "read-past-end": chain(0, blk_req(0, 1 << 40), 512, 1),
}

# --- virtio-mmio (from nothing) ---------------------------------------------

MMIO = {
    "probe": b"".join(reg_read(o) for o in (0, 4, 8, 0xC, 0x10, 0x34, 0x70, 0xFC, 0x100)),
    "setup-read": SETUP + BLK["read"],
    "reset-midway": SETUP + BLK["write-read"] + reg_write(0x70, 0) + BLK["read"],
    "bad-queue": reg_write(0x70, 3) + reg_write(0x20, 1) + reg_write(0x70, 11)
    + reg_write(0x30, 0) + reg_write(0x38, 3) + reg_write(0x80, 0xFFFFFFF0)
    + reg_write(0x44, 1) + reg_write(0x70, 15) + reg_write(0x50, 0),
}

# --- virtio-vsock -------------------------------------------------------------

def vsock_hdr(op, src_port=1234, dst_port=5000, length=0, buf_alloc=65536, fwd=0):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, buf_alloc, fwd)


RX = chain(0, 4096) + chain(0, 4096)
VSOCK = {
    "connect": RX + chain(1, vsock_hdr(1)),
    "connect-ready-port": RX + chain(1, vsock_hdr(1, dst_port=1023)),
    "data-then-shutdown": RX + chain(1, vsock_hdr(1)) + chain(1, vsock_hdr(5, length=5), b"hello")
    + chain(1, vsock_hdr(4)) + chain(1, vsock_hdr(3)),
    "credit": RX + chain(1, vsock_hdr(7)) + chain(1, vsock_hdr(6)),
    "split-header": RX + chain(1, vsock_hdr(5, length=4)[:20], vsock_hdr(5, length=4)[20:] + b"abcd"),
}

# --- virtio-net + user network -----------------------------------------------

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


GUEST_MAC = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
GW_MAC = bytes([0x52, 0x55, 10, 0, 2, 2])
BCAST = b"\xff" * 6
GUEST_IP = bytes([10, 0, 2, 15])
GW_IP = bytes([10, 0, 2, 2])
DNS_IP = bytes([10, 0, 2, 3])


def ipv4(src, dst, proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, src, dst)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def udp(src, dst, sport, dport, data):
    u = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    pseudo = src + dst + struct.pack("!BBH", 0, 17, len(u))
    c = csum(pseudo + u) or 0xFFFF
    return u[:6] + struct.pack("!H", c) + u[8:]


def tcp_syn(src, dst, sport, dport):
    t = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(t))
    return t[:16] + struct.pack("!H", csum(pseudo + t)) + t[18:]


def eth(dst, ethertype, payload):
    return dst + GUEST_MAC + struct.pack("!H", ethertype) + payload


def net_tx(frame):
    # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
    # csum_offset, num_buffers.
    return chain(1, struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0) + frame)


def dns_query(name, qid=0x1234):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def dns_answer(name, addr, qid=0x1234):
    a = bytearray(dns_query(name, qid))
    a[2:4] = struct.pack("!H", 0x8180)
    a[6:8] = struct.pack("!H", 1)
    return bytes(a) + struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + bytes(addr)


ARP = eth(BCAST, 0x0806, struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP + b"\0" * 6 + GW_IP)
DHCP_DISCOVER = eth(BCAST, 0x0800, ipv4(b"\0" * 4, b"\xff" * 4, 17, udp(
    b"\0" * 4, b"\xff" * 4, 68, 67,
    struct.pack("!BBBBIHH", 1, 1, 6, 0, 0x3903F326, 0, 0x8000) + b"\0" * 16 + GUEST_MAC + b"\0" * 10
    + b"\0" * 192 + b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff")))
DNS = eth(GW_MAC, 0x0800, ipv4(GUEST_IP, DNS_IP, 17, udp(GUEST_IP, DNS_IP, 40000, 53, dns_query("example.test"))))
ICMP = eth(GW_MAC, 0x0800, ipv4(GUEST_IP, GW_IP, 1, (lambda p: p[:2] + struct.pack("!H", csum(p)) + p[4:])(
    struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping")))
SYN = eth(GW_MAC, 0x0800, ipv4(GUEST_IP, GW_IP, 6, tcp_syn(GUEST_IP, GW_IP, 40001, 80)))
NET_RX = chain(0, 2048) + chain(0, 2048) + chain(0, 2048)


def net_input(answer, records):
    return struct.pack("<H", len(answer)) + answer + records


NET = {
    "arp": net_input(b"", NET_RX + net_tx(ARP)),
    "dhcp": net_input(b"", NET_RX + net_tx(DHCP_DISCOVER)),
    "dns": net_input(dns_answer("example.test", [127, 0, 0, 1]), NET_RX + net_tx(DNS)),
    "icmp": net_input(b"", NET_RX + net_tx(ICMP)),
    "tcp-syn-refused": net_input(b"", NET_RX + net_tx(SYN)),
}

# --- virtio-fs (FUSE) ---------------------------------------------------------

UNIQUE = [1]


def fuse(opcode, nodeid, body):
    UNIQUE[0] += 1
    return struct.pack("<IIQQIIII", 40 + len(body), opcode, UNIQUE[0], nodeid, 0, 0, 0, 0) + body


def fuse_req(opcode, nodeid, body, reply=4096):
    return chain(1, fuse(opcode, nodeid, body), reply)


INIT = fuse_req(26, 0, struct.pack("<IIIII", 7, 31, 0, 0, 0) + b"\0" * 44)
LOOKUP, GETATTR, OPEN, READ, WRITE, RELEASE = 1, 3, 14, 15, 16, 18
MKDIR, UNLINK, RENAME, CREATE, OPENDIR, READDIR, READDIRPLUS = 9, 10, 12, 35, 27, 28, 44
SETATTR, SYMLINK, LINK, READLINK, GETXATTR = 4, 6, 13, 5, 22


def name(s):
    return s.encode() + b"\0"


FS = {
    "lookup-read": b"\0" + INIT + fuse_req(LOOKUP, 1, name("file"))
    + fuse_req(OPEN, 2, struct.pack("<II", 0, 0))
    + fuse_req(READ, 2, struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0)),
    "escape-link": b"\0" + INIT + fuse_req(LOOKUP, 1, name("link"))
    + fuse_req(LOOKUP, 2, name("secret")) + fuse_req(LOOKUP, 1, name(".."))
    + fuse_req(READLINK, 2, b""),
    "create-write": b"\0" + INIT
    + fuse_req(CREATE, 1, struct.pack("<IIII", os.O_RDWR, 0o100644, 0o022, 0) + name("new"))
    + fuse_req(WRITE, 2, struct.pack("<QQIIQII", 0, 0, 5, 0, 0, 0, 0) + b"hello"),
    "mkdir-rename-unlink": b"\0" + INIT + fuse_req(MKDIR, 1, struct.pack("<II", 0o755, 0o022) + name("d"))
    + fuse_req(RENAME, 1, struct.pack("<Q", 1) + name("file") + name("moved"))
    + fuse_req(UNLINK, 1, name("moved")),
    "readdir": b"\0" + INIT + fuse_req(OPENDIR, 1, struct.pack("<II", 0, 0))
    + fuse_req(READDIRPLUS, 1, struct.pack("<QQIIQII", 0, 0, 4096, 0, 0, 0, 0)),
    "read-only-create": b"\1" + INIT
    + fuse_req(CREATE, 1, struct.pack("<IIII", os.O_RDWR, 0o100644, 0o022, 0) + name("new")),
    "symlink-setattr": b"\0" + INIT + fuse_req(SYMLINK, 1, name("s") + name("../outside/secret"))
    + fuse_req(SETATTR, 1, struct.pack("<IIQQQQQQIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 0, 0, 0)),
}

# --- agent protocol -------------------------------------------------------------

def frame(kind, payload):
    return bytes([kind]) + struct.pack("<I", len(payload)) + payload


def resp(obj):
    return frame(5, json.dumps(obj).encode())


AGENT = {
    "exec": b"\0" + frame(3, b"out\n") + frame(4, b"err\n") + resp({"exit_code": 0}),
    "exec-signal": b"\0" + resp({"signal": 9}),
    "get": b"\1" + frame(3, b"x" * 100) + resp({"size": 100}),
    "get-too-much": b"\1" + frame(3, b"x" * 5000) + resp({"size": 5000}),
    "put": b"\2" + resp({"size": 9}),
    "ping": b"\3" + resp({"agent": "1.0"}),
    "error": b"\0" + resp({"error": "no such file"}),
    "refused": b"\x80" + b"NO\n",
}

# --- control API ------------------------------------------------------------------

def http(method, path, body=b""):
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


API = {
    "describe": http("GET", "/vm"),
    "pause": http("PUT", "/vm/pause"),
    "snapshot": http("PUT", "/vm/snapshot", json.dumps({"dir": "/tmp/snap", "key": "00" * 32}).encode()),
    "fork": http("PUT", "/vm/fork", json.dumps({"count": 2, "names": ["a", "b"]}).encode()),
    "wrong-method": http("POST", "/vm/stop"),
}


def main():
    for target, seeds in [("virtio_blk", BLK), ("virtio_mmio", MMIO), ("virtio_vsock", VSOCK),
                          ("virtio_net", NET), ("virtio_fs", FS), ("agent_protocol", AGENT),
                          ("api_http", API)]:
        for n, data in seeds.items():
            write(target, n, data)
    # A real snapshot's state file, whole and as a body (the target frames
    # the input itself too).
    if len(sys.argv) > 1:
        state = open(sys.argv[1], "rb").read()
        write("snapshot_state", "state", state)
        write("snapshot_state", "state-body", state[24:])


if __name__ == "__main__":
    main()


# --- image layers (fuzz_targets/image_layer.rs) ---------------------------

def layer_seed():
    """A tar with what layers hold: folders, files, a symlink out of the
    tree and a path through it, a hard link, whiteouts, an opaque folder,
    a device node, PAX extended attributes."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add(name, kind=tarfile.REGTYPE, data=b"", link="", pax=None):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            info.linkname = link
            info.mode = 0o4755 if kind == tarfile.REGTYPE else 0o755
            info.mtime = 1000000000
            if pax:
                info.pax_headers = pax
            t.addfile(info, io.BytesIO(data) if data else None)
        add("etc", tarfile.DIRTYPE)
        add("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")
        add("up", tarfile.SYMTYPE, link="../../..")
        add("up/escaped", data=b"x")
        add("abs", tarfile.SYMTYPE, link="/etc")
        add("abs/through", data=b"y")
        add("etc/again", tarfile.LNKTYPE, link="etc/passwd")
        add("etc/.wh.gone")
        add("opaque/.wh..wh..opq")
        add("dev/null", tarfile.CHRTYPE)
        add("bin/ping", data=b"cap", pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
    return buf.getvalue()


write("image_layer", "kinds", layer_seed())
