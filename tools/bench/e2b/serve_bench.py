"""`vmm bench serve`'s client: the official E2B Python SDK, unchanged
(tools/client-env.sh python), pointed at a `vmm serve` by E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY.

    serve_bench.py one      create a sandbox (template `base`), run
                            python3 -c 'print(1)' in it, kill it; prints
                            one JSON line: the phases in ms
    serve_bench.py many N   N sandboxes alive at once, created PARALLEL at
                            a time (env, default 10); each runs a command
                            and answers with its own number; the list
                            shows them all. Prints `alive` and a JSON line,
                            waits for a line on stdin (the bench measures
                            memory then), kills them all, prints a last
                            JSON line.

Any wrong answer raises (exit status 1)."""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from e2b import Sandbox


def since(t):
    return (time.monotonic() - t) * 1e3


def one():
    t = time.monotonic()
    sbx = Sandbox.create()
    created = since(t)
    r = sbx.commands.run("python3 -c 'print(1)'")
    if r.stdout != "1\n" or r.exit_code != 0:
        raise AssertionError(f"python3 -c 'print(1)' answered {r!r}")
    ran = since(t)
    sbx.kill()
    done = since(t)
    print(json.dumps({"create_ms": created, "run_ms": ran - created, "kill_ms": done - ran, "total_ms": done}))


def many(n):
    parallel = int(os.environ.get("PARALLEL", "10"))

    def create(_):
        t = time.monotonic()
        # Creates wait in line on a loaded host: past the SDK's 60 s default.
        return Sandbox.create(timeout=3600, request_timeout=600), since(t)

    def answer(pair):
        i, sbx = pair
        t = time.monotonic()
        r = sbx.commands.run(f"echo sandbox-{i}", timeout=600, request_timeout=600)
        if r.stdout != f"sandbox-{i}\n":
            raise AssertionError(f"sandbox {i} answered {r.stdout!r}")
        return since(t)

    t = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        made = list(pool.map(create, range(n)))
    create_all = since(t)
    sandboxes = [s for s, _ in made]
    listed = set()
    pages = Sandbox.list()
    while pages.has_next:
        listed.update(s.sandbox_id for s in pages.next_items())
    missing = [s.sandbox_id for s in sandboxes if s.sandbox_id not in listed]
    if missing:
        raise AssertionError(f"{len(missing)} sandboxes not listed: {missing[:3]}")
    t = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        answers = list(pool.map(answer, enumerate(sandboxes)))
    answer_all = since(t)
    print("alive", flush=True)
    print(json.dumps({
        "count": n,
        "listed": len(listed),
        "create_all_ms": create_all,
        "create_ms": [ms for _, ms in made],
        "answer_all_ms": answer_all,
        "command_ms": answers,
    }), flush=True)
    sys.stdin.readline()
    t = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda s: s.kill(), sandboxes))
    print(json.dumps({"kill_all_ms": since(t)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["one"]:
        one()
    elif len(sys.argv) == 3 and sys.argv[1] == "many":
        many(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
