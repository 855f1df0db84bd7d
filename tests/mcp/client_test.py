"""Drives `vmm mcp` with the official MCP Python SDK (tests/mcp.rs runs it
with the vmm binary's path as its argument): lists the tools and calls
each. Each check prints `ok NAME`; the first failure raises."""

import asyncio
import re
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def ok(name, cond=True, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}", flush=True)


def text(result):
    return "".join(c.text for c in result.content if getattr(c, "text", None) is not None)


async def main(vmm):
    params = StdioServerParameters(command=vmm, args=["mcp"])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            want = {"create_sandbox", "run_command", "read_file", "write_file",
                    "list_files", "fork_sandbox", "destroy_sandbox", "list_sandboxes"}
            ok("tools listed", want <= tools, repr(tools))

            async def call(name, **args):
                return await session.call_tool(name, args)

            # Off the internet, the host's port 9 allowed: the arguments
            # reach the sandbox's egress policy (a bad rule is a tool error).
            r = await call("create_sandbox", internet=False, allow=["no rule!"])
            ok("a bad rule is refused", r.is_error, text(r))
            r = await call("create_sandbox", internet=False, allow=["10.0.2.2:9"])
            m = re.search(r"sandbox_id: (\w+)", text(r))
            ok("create_sandbox", not r.is_error and m, text(r))
            sid = m.group(1)

            r = await call("run_command", sandbox_id=sid, command="echo hi; echo oops >&2; exit 3")
            t = text(r)
            ok("run_command", "exit code 3" in t and "hi" in t and "oops" in t, t)
            r = await call("run_command", sandbox_id=sid, command="head -c 100000 /dev/zero | tr '\\0' x")
            ok("long output cut", "more bytes not shown" in text(r) and len(text(r)) < 40000, len(text(r)))
            r = await call("run_command", sandbox_id=sid, command="sleep 30", timeout_seconds=1)
            ok("command timeout", "timed out" in text(r), text(r))

            r = await call("write_file", sandbox_id=sid, path="/tmp/mcp/note.txt", content="from mcp")
            ok("write_file", not r.is_error, text(r))
            r = await call("read_file", sandbox_id=sid, path="/tmp/mcp/note.txt")
            ok("read_file", text(r) == "from mcp", text(r))
            r = await call("list_files", sandbox_id=sid, path="/tmp/mcp")
            ok("list_files", "/tmp/mcp/note.txt" in text(r), text(r))
            r = await call("read_file", sandbox_id=sid, path="/tmp/mcp/missing")
            ok("missing file is a tool error", r.is_error, text(r))

            r = await call("fork_sandbox", sandbox_id=sid, count=2)
            kids = re.findall(r"sandbox_id: (\w+)", text(r))
            ok("fork_sandbox", len(kids) == 2, text(r))
            for i, kid in enumerate(kids):
                await call("write_file", sandbox_id=kid, path="/tmp/mcp/kid", content=str(i))
            for i, kid in enumerate(kids):
                r = await call("read_file", sandbox_id=kid, path="/tmp/mcp/kid")
                ok(f"child {i} diverged", text(r) == str(i), text(r))
                r = await call("read_file", sandbox_id=kid, path="/tmp/mcp/note.txt")
                ok(f"child {i} has the parent's file", text(r) == "from mcp", text(r))

            r = await call("list_sandboxes")
            ok("list_sandboxes", all(s in text(r) for s in [sid] + kids), text(r))
            for s in kids + [sid]:
                r = await call("destroy_sandbox", sandbox_id=s)
                ok("destroy_sandbox", not r.is_error, text(r))
            r = await call("run_command", sandbox_id=sid, command="true")
            ok("a destroyed sandbox is a tool error", r.is_error, text(r))
    print("all done", flush=True)


asyncio.run(main(sys.argv[1]))
