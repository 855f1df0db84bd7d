"""Drives `vmm serve` with the official E2B Python SDK (tests/e2b.rs runs
it with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at the
server). Each check prints `ok NAME`; the first failure raises."""

import asyncio
import json
import os
import re
import time
import urllib.request

from e2b.api.client.api.sandboxes import get_sandboxes_metrics, get_v_2_sandboxes_sandbox_id_logs
from e2b.api.client.models import LogsDirection
from e2b.connection_config import ConnectionConfig
from e2b.sandbox_sync.paginator import get_api_client

from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FilesystemEventType,
    NotFoundException,
    PtySize,
    Sandbox,
    TimeoutException,
)


def ok(name, cond=True, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}", flush=True)


t0 = time.monotonic()
sbx = Sandbox.create(envs={"FROM_CREATE": "yes"}, metadata={"suite": "e2b"}, timeout=600)
ok("create", len(sbx.sandbox_id) == 20, sbx.sandbox_id)
print(f"create took {time.monotonic() - t0:.2f} s", flush=True)

# Commands: output, streaming, exit codes, env, cwd.
r = sbx.commands.run("python3 -c 'print(6*7)'")
ok("run", r.stdout == "42\n" and r.exit_code == 0, repr(r))

chunks = []
r = sbx.commands.run(
    "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo oops >&2",
    on_stdout=chunks.append,
)
ok("streamed stdout", "".join(chunks) == "line1\nline2\nline3\n", repr(chunks))
ok("stderr", r.stderr == "oops\n", repr(r.stderr))

try:
    sbx.commands.run("exit 3")
    ok("exit code", False, "no exception")
except CommandExitException as e:
    ok("exit code", e.exit_code == 3, repr(e))

r = sbx.commands.run("echo $FOO $FROM_CREATE; pwd", envs={"FOO": "bar"}, cwd="/tmp")
ok("env and cwd", r.stdout == "bar yes\n/tmp\n", repr(r.stdout))

r = sbx.commands.run("id -un", user="user")
ok("named user", r.stdout == "user\n", repr(r.stdout))

try:
    sbx.commands.run("sleep 60", timeout=2)
    ok("timeout", False, "no exception")
except TimeoutException:
    ok("timeout")
# The server kills a command whose call timed out: attach to it (if it
# has not ended yet) and wait for its end.
for p in sbx.commands.list():
    if "sleep 60" in " ".join(p.args):
        try:
            sbx.commands.connect(p.pid).wait()
        except CommandExitException:
            pass
ok("timed-out command killed", not any("sleep 60" in " ".join(p.args) for p in sbx.commands.list()))

h = sbx.commands.run("sleep 300", background=True)
ok("background", h.pid in [p.pid for p in sbx.commands.list()])
ok("kill background", h.kill())
try:
    h.wait()
    ok("killed background ended", False, "it exited cleanly")
except CommandExitException as e:
    ok("killed background ended", e.exit_code == -1 and "killed" in (e.error or ""), repr(e))
ok("background gone", h.pid not in [p.pid for p in sbx.commands.list()])

h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "hello\n")
r = h.wait()
ok("stdin", r.stdout == "got:hello\n", repr(r.stdout))

# A terminal (the SDK's pty: bash -i -l on a PTY): typed into, resized,
# interrupted with ^C, ended by its shell's exit.
term = sbx.pty.create(PtySize(rows=24, cols=80), timeout=300)
screen, shown = iter(term), bytearray()


def shows(marker):
    while marker not in shown:
        _, _, chunk = next(screen)
        shown.extend(chunk or b"")
    return True


def shows_pattern(pattern):
    while not re.search(pattern, bytes(shown), re.S):
        _, _, chunk = next(screen)
        shown.extend(chunk or b"")
    return True


sbx.pty.send_stdin(term.pid, b"stty size; tty; echo pty-$((6*7))\n")
ok("pty", shows(b"pty-42"))
ok("pty is a terminal", b"24 80" in shown and b"/dev/pts/" in shown, repr(bytes(shown)))
shown.clear()
sbx.pty.resize(term.pid, PtySize(rows=40, cols=120))
sbx.pty.send_stdin(term.pid, b"stty size\n")
ok("pty resize", shows(b"40 120"))
# The marker comes from the foreground command itself, so the ^C cannot
# reach the shell between its fork and the command taking the terminal (the
# shell then went back to its prompt, leaving the command running and
# waiting for it at exit); the next line is typed once the shell prompts
# again (a ^C flushes what was typed ahead).
shown.clear()
sbx.pty.send_stdin(term.pid, b"sh -c 'echo nap-$((2+3)); exec sleep 600'\n")
shows(b"nap-5")
sbx.pty.send_stdin(term.pid, b"\x03")
shows_pattern(rb"\^C.*# ")
sbx.pty.send_stdin(term.pid, b"echo after-$((1+1))\n")
ok("pty ^C stops the foreground command", shows(b"after-2"))
sbx.pty.send_stdin(term.pid, b"exit\n")
ok("pty exit", term.wait().exit_code == 0)

# Files.
sbx.files.write("/tmp/e2b/hello.txt", "hi there")
ok("write and read", sbx.files.read("/tmp/e2b/hello.txt") == "hi there")
blob = os.urandom(3 << 20)
sbx.files.write("/tmp/e2b/blob.bin", blob)
ok("binary round trip", bytes(sbx.files.read("/tmp/e2b/blob.bin", format="bytes")) == blob)
ok("list", sorted(e.name for e in sbx.files.list("/tmp/e2b")) == ["blob.bin", "hello.txt"])
ok("exists", sbx.files.exists("/tmp/e2b/hello.txt") and not sbx.files.exists("/tmp/e2b/nope"))
ok("make_dir", sbx.files.make_dir("/tmp/e2b/d/e"))
ok("make_dir again", sbx.files.make_dir("/tmp/e2b/d/e") is False)
info = sbx.files.rename("/tmp/e2b/hello.txt", "/tmp/e2b/d/e/h.txt")
ok("rename", info.path == "/tmp/e2b/d/e/h.txt" and info.size == 8, repr(info))
ok("nested list", "h.txt" in [e.name for e in sbx.files.list("/tmp/e2b", depth=3)])
sbx.files.remove("/tmp/e2b/d")
ok("remove", not sbx.files.exists("/tmp/e2b/d"))
try:
    sbx.files.read("/tmp/e2b/missing")
    ok("missing file", False, "no exception")
except NotFoundException:
    ok("missing file")
sbx.files.write("relative.txt", "home")
ok("relative paths start at home", sbx.commands.run("cat /root/relative.txt").stdout == "home")

# Directory watches: polled (the sync SDK) and streamed (the async one).
sbx.files.make_dir("/tmp/watched")
w = sbx.files.watch_dir("/tmp/watched")
sbx.commands.run("echo x > /tmp/watched/new.txt")
seen, deadline = [], time.monotonic() + 30
while not any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in seen):
    ok("watch sees a command's file", time.monotonic() < deadline, repr(seen))
    seen += w.get_new_events()
    time.sleep(0.1)
w.stop()
ok("watch sees a command's file")


async def streamed_watch():
    asbx = await AsyncSandbox.connect(sbx.sandbox_id)
    got = asyncio.Queue()
    handle = await asbx.files.watch_dir("/tmp/watched", on_event=got.put_nowait, recursive=True)
    await asbx.commands.run("mkdir -p /tmp/watched/sub && touch /tmp/watched/sub/deep.txt")
    while True:
        ev = await asyncio.wait_for(got.get(), 30)
        if ev.name == "sub/deep.txt":
            break
    await handle.stop()


asyncio.run(streamed_watch())
ok("streamed recursive watch")

# Pause, then connect: the sandbox is as it was.
sbx.files.write("/tmp/state", "before pause")
sbx.pause()
ok("paused", Sandbox.get_info(sbx.sandbox_id).state.value == "paused")
again = Sandbox.connect(sbx.sandbox_id)
ok("resumed", again.commands.run("cat /tmp/state").stdout == "before pause")


def vmm_state(sandbox_id):
    """This server's own view (GET /vmm/sandboxes/ID): running, paused, on_disk."""
    req = urllib.request.Request(
        f"{os.environ['E2B_API_URL']}/vmm/sandboxes/{sandbox_id}",
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["state"]


# Paused past the server's limit (tests/e2b.rs: --keep-paused 3), the
# sandbox moves to disk; a connect restores it as it was.
sbx.files.write("/tmp/state", "before disk")
sbx.pause()
deadline = time.monotonic() + 120
while (state := vmm_state(sbx.sandbox_id)) != "on_disk":
    ok("moved to disk", time.monotonic() < deadline and state == "paused", state)
    time.sleep(0.2)
ok("moved to disk")
ok("paused on disk", Sandbox.get_info(sbx.sandbox_id).state.value == "paused")
again = Sandbox.connect(sbx.sandbox_id)
ok("back from disk", again.commands.run("cat /tmp/state").stdout == "before disk")
ok("running again", vmm_state(sbx.sandbox_id) == "running")

# Fork: children continue from the parent's state and diverge.
sbx.files.write("/tmp/fork-state", "from the parent")
kids = sbx.fork(count=2)
ok("fork", len(kids) == 2 and all(isinstance(k, Sandbox) for k in kids), repr(kids))
for i, kid in enumerate(kids):
    kid.files.write("/tmp/mine", f"child {i}")
for i, kid in enumerate(kids):
    ok(f"child {i} has the parent's state", kid.files.read("/tmp/fork-state") == "from the parent")
    ok(f"child {i} diverged", kid.commands.run("cat /tmp/mine").stdout == f"child {i}")
ok("parent untouched", not sbx.files.exists("/tmp/mine"))
ok("children differ", len({kid.commands.run("cat /etc/machine-id").stdout for kid in kids}) == 2)
ok("kill a child", kids[0].kill())
ok("parent still runs", sbx.commands.run("echo alive").stdout == "alive\n")

# Network: the host's loopback (10.0.2.2, where tests/e2b.rs listens on
# HOST_PORT) opens only to a rule that names it.
connect = f"exec 3<>/dev/tcp/10.0.2.2/{os.environ['HOST_PORT']} && echo connected"


def reaches(s):
    try:
        return s.commands.run(connect).stdout == "connected\n"
    except CommandExitException:
        return False


ok("the host is closed by default", not reaches(sbx))
sbx.update_network({"allow_out": ["10.0.2.2"]})
ok("update_network opens it", reaches(sbx))
sbx.update_network({"deny_out": ["0.0.0.0/0"]})
ok("update_network closes it", not reaches(sbx))
net = Sandbox.create(allow_internet_access=False, network={"allow_out": ["10.0.2.2"]}, timeout=120)
ok("create with network rules", reaches(net))
net.kill()

# Metrics: one sample, as the guest sees itself.
m = sbx.get_metrics()
ok("metrics", len(m) == 1 and m[0].cpu_count >= 1 and 0 <= m[0].cpu_used_pct <= 100
   and 0 < m[0].mem_used < m[0].mem_total and 0 < m[0].disk_used < m[0].disk_total, repr(m))

# Metrics of many sandboxes and logs, through the SDK's own API client.
api = get_api_client(ConnectionConfig())
many = get_sandboxes_metrics.sync(client=api, sandbox_ids=[sbx.sandbox_id, kids[1].sandbox_id, "nosuch"])
ok("metrics of many", sorted(many.sandboxes) == sorted([sbx.sandbox_id, kids[1].sandbox_id])
   and all(m["memTotal"] > 0 for m in many.sandboxes.values()), repr(many))
logs = get_v_2_sandboxes_sandbox_id_logs.sync(sbx.sandbox_id, client=api)
said = [e.message for e in logs.logs]
ok("logs", said[0] == "Sandbox started" and {"Process started", "Process ended", "Sandbox paused",
   "Sandbox resumed", "Network rules changed"} <= set(said), repr(said))
ended = get_v_2_sandboxes_sandbox_id_logs.sync(sbx.sandbox_id, client=api, search="Process ended",
                                               direction=LogsDirection.BACKWARD, limit=1)
ok("logs searched", len(ended.logs) == 1 and ended.logs[0].fields["status"].startswith("exit status"),
   repr(ended))

# Snapshots: the sandbox's state as a template, which sandboxes start from.
sbx.files.write("/tmp/snap-state", "in the snapshot")
snap = sbx.create_snapshot()
ok("create_snapshot", snap.snapshot_id.startswith("snapshot-"), repr(snap))
sbx.files.write("/tmp/snap-state", "after the snapshot")
from_snap = Sandbox.create(snap.snapshot_id, timeout=120)
ok("a sandbox from the snapshot", from_snap.files.read("/tmp/snap-state") == "in the snapshot")
ok("the source ran on", sbx.files.read("/tmp/snap-state") == "after the snapshot")
from_snap.kill()
ok("list_snapshots", [s.snapshot_id for s in sbx.list_snapshots().next_items()] == [snap.snapshot_id])
ok("delete_snapshot", Sandbox.delete_snapshot(snap.snapshot_id))
ok("deleted", snap.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()])

# The list, a bad key, kill.
ids = [s.sandbox_id for s in Sandbox.list().next_items()]
ok("list sandboxes", sbx.sandbox_id in ids, repr(ids))
try:
    Sandbox.list(api_key="e2b_" + "0" * 40).next_items()
    ok("bad key refused", False, "listed")
except AuthenticationException:
    ok("bad key refused")
ok("kill", sbx.kill())
ok("killed", sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()])
ok("a child outlives its parent", kids[1].commands.run("echo alive").stdout == "alive\n")
ok("kill the other child", kids[1].kill())
ok("kill unknown", Sandbox.kill("nosuchsandbox") is False)
print("all done", flush=True)
