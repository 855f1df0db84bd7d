"""POSIX operations on a virtio-fs share, run inside the guest by tests/fs.rs.

Usage: python3 fs_ops.py DIR. Prints "ok <name>" per check and exits 0, or
raises (non-zero exit, traceback on stderr) at the first failure.
"""
import errno
import fcntl
import mmap
import os
import stat
import sys
import time

d = sys.argv[1]
os.makedirs(d, exist_ok=True)
os.chdir(d)


def ok(name):
    print("ok", name, flush=True)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def expect_errno(code, fn, *args):
    try:
        fn(*args)
    except OSError as e:
        assert e.errno == code, (fn, args, e)
        return
    raise AssertionError(f"{fn.__name__}{args} did not fail with {errno.errorcode[code]}")


# create, write, read
with open("a.txt", "w") as f:
    f.write("hello\n")
assert read("a.txt") == b"hello\n"
ok("create-write-read")

# append
with open("a.txt", "a") as f:
    f.write("world\n")
assert read("a.txt") == b"hello\nworld\n"
ok("append")

# truncate (shrink, grow, by path and by descriptor)
os.truncate("a.txt", 5)
assert read("a.txt") == b"hello"
with open("a.txt", "r+") as f:
    f.truncate(8)
assert read("a.txt") == b"hello\0\0\0"
with open("a.txt", "w") as f:  # O_TRUNC
    pass
assert os.stat("a.txt").st_size == 0
ok("truncate")

# rename, including over an existing file, and RENAME_NOREPLACE semantics
with open("b.txt", "w") as f:
    f.write("b")
with open("c.txt", "w") as f:
    f.write("c")
os.rename("b.txt", "c.txt")
assert read("c.txt") == b"b" and not os.path.exists("b.txt")
os.mkdir("dir1")
os.rename("c.txt", "dir1/moved.txt")
assert read("dir1/moved.txt") == b"b"
ok("rename")

# unlink while open: the open file keeps working
f = open("open.txt", "w+")
f.write("still here")
f.flush()
os.unlink("open.txt")
assert not os.path.exists("open.txt")
f.seek(0)
assert f.read() == "still here"
f.close()
ok("unlink-while-open")

# mkdir, rmdir (and rmdir of a non-empty directory fails)
os.makedirs("p/q/r")
expect_errno(errno.ENOTEMPTY, os.rmdir, "p")
os.rmdir("p/q/r")
os.rmdir("p/q")
os.rmdir("p")
assert not os.path.exists("p")
ok("mkdir-rmdir")

# readdir of a large directory (more than one READDIR reply)
os.mkdir("big")
names = {f"entry-with-a-longish-name-{i:05}" for i in range(200)}
for n in names:
    open(os.path.join("big", n), "w").close()
assert set(os.listdir("big")) == names
for n in names:
    os.unlink(os.path.join("big", n))
os.rmdir("big")
ok("readdir-large")

# symlink, readlink (relative and absolute targets resolve in the guest)
os.symlink("dir1/moved.txt", "link")
assert os.readlink("link") == "dir1/moved.txt"
assert read("link") == b"b"
assert stat.S_ISLNK(os.lstat("link").st_mode)
os.symlink("/etc/hostname", "abs-link")
assert read("abs-link") == read("/etc/hostname")
ok("symlink-readlink")

# hard link
os.link("dir1/moved.txt", "hard")
assert os.stat("hard").st_nlink == 2
assert os.stat("hard").st_ino == os.stat("dir1/moved.txt").st_ino
with open("hard", "a") as f:
    f.write("+")
assert read("dir1/moved.txt") == b"b+"
ok("hard-link")

# chmod
os.chmod("hard", 0o640)
assert stat.S_IMODE(os.stat("hard").st_mode) == 0o640
os.chmod("dir1", 0o700)
assert stat.S_IMODE(os.stat("dir1").st_mode) == 0o700
ok("chmod")

# utimes
os.utime("hard", (1000000000, 1200000000))
st = os.stat("hard")
assert int(st.st_atime) == 1000000000 and int(st.st_mtime) == 1200000000, st
os.utime("hard", ns=(1, 1500000000123456789))
assert os.stat("hard").st_mtime_ns == 1500000000123456789
ok("utimes")

# fsync, fdatasync, sync
fd = os.open("sync.txt", os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"durable")
os.fsync(fd)
os.fdatasync(fd)
os.close(fd)
os.sync()
ok("fsync")

# statfs
sv = os.statvfs(".")
assert sv.f_blocks > 0 and sv.f_bsize > 0 and sv.f_namemax == 255, sv
ok("statfs")

# mmap read (and a shared writable mapping reaches the file)
with open("map.txt", "wb") as f:
    f.write(b"x" * 8192 + b"tail")
with open("map.txt", "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert m[8192:] == b"tail"
    m.close()
with open("map.txt", "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    m[0:4] = b"MMAP"
    m.flush()
    m.close()
assert read("map.txt")[:5] == b"MMAPx"
ok("mmap-read")

# flock and fcntl locks between two processes (a forked child: under PVM
# a new interpreter costs seconds)
def other_process_cannot(lock):
    pid = os.fork()
    if pid == 0:
        try:
            lock()
        except OSError:
            os._exit(7)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7


with open("lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    # flock locks belong to the open file: the child opens its own.
    assert other_process_cannot(
        lambda: fcntl.flock(open("lock"), fcntl.LOCK_EX | fcntl.LOCK_NB))
    fcntl.flock(f, fcntl.LOCK_UN)
    # POSIX locks belong to the process: the child's own attempt conflicts.
    fcntl.lockf(f, fcntl.LOCK_EX)
    assert other_process_cannot(
        lambda: fcntl.lockf(open("lock", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB))
ok("locks")

# xattrs
os.setxattr("sync.txt", "user.color", b"blue")
assert os.getxattr("sync.txt", "user.color") == b"blue"
assert "user.color" in os.listxattr("sync.txt")
os.removexattr("sync.txt", "user.color")
assert "user.color" not in os.listxattr("sync.txt")
ok("xattr")

# fallocate and SEEK_DATA/SEEK_HOLE
fd = os.open("sparse", os.O_CREAT | os.O_RDWR, 0o644)
os.posix_fallocate(fd, 0, 1 << 20)
assert os.fstat(fd).st_size == 1 << 20
os.ftruncate(fd, 0)
os.pwrite(fd, b"data", 4 << 20)
assert os.lseek(fd, 0, os.SEEK_DATA) >= (4 << 20) - 4096
os.close(fd)
ok("fallocate-seek")

# device nodes cannot be made; FIFOs can
expect_errno(errno.EPERM, os.mknod, "sda", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
os.mkfifo("fifo")
assert stat.S_ISFIFO(os.stat("fifo").st_mode)
ok("mknod")

# set-user-ID bits are dropped by the host
with open("suid", "w") as f:
    pass
os.chmod("suid", 0o4755)
assert stat.S_IMODE(os.stat("suid").st_mode) & 0o4000 == 0
ok("no-setuid")

print("all done", flush=True)
