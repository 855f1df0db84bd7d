// Drives `vmm serve` with the official E2B JavaScript SDK (npm `e2b`,
// pinned in tests/node/package.json; tests/e2b.rs runs this with
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at the server and
// NODE_PATH at the installed packages). Each check prints `ok NAME`; the
// first failure throws.
const { Sandbox, CommandExitError } = require('e2b')

function ok(name, cond = true, detail = '') {
  if (!cond) throw new Error(`${name}: ${detail}`)
  console.log(`ok ${name}`)
}

async function main() {
  const sbx = await Sandbox.create({ envs: { FROM_CREATE: 'js' }, timeoutMs: 600_000 })
  ok('create', sbx.sandboxId.length === 20, sbx.sandboxId)

  const chunks = []
  const r = await sbx.commands.run("python3 -c 'print(6*7)'; echo $FROM_CREATE; echo err >&2", {
    onStdout: (d) => chunks.push(d),
  })
  ok('run', r.exitCode === 0 && r.stdout === '42\njs\n', JSON.stringify(r))
  ok('streamed stdout', chunks.join('') === '42\njs\n', JSON.stringify(chunks))
  ok('stderr', r.stderr === 'err\n', JSON.stringify(r.stderr))

  try {
    await sbx.commands.run('exit 4')
    ok('exit code', false, 'no error')
  } catch (e) {
    ok('exit code', e instanceof CommandExitError && e.exitCode === 4, String(e))
  }

  await sbx.files.makeDir('/tmp/js')
  await sbx.files.write('/tmp/js/a.txt', 'from javascript\n')
  ok('files read', (await sbx.files.read('/tmp/js/a.txt')) === 'from javascript\n')
  const bytes = new Uint8Array([0, 1, 2, 255])
  await sbx.files.write('/tmp/js/b.bin', bytes.buffer)
  const back = await sbx.files.read('/tmp/js/b.bin', { format: 'bytes' })
  ok('files binary', Buffer.from(back).equals(Buffer.from(bytes)), String(back))
  const names = (await sbx.files.list('/tmp/js')).map((e) => e.name).sort()
  ok('files list', JSON.stringify(names) === '["a.txt","b.bin"]', JSON.stringify(names))
  const seen = await sbx.commands.run('cat /tmp/js/a.txt')
  ok('file seen by a command', seen.stdout === 'from javascript\n', JSON.stringify(seen.stdout))
  await sbx.files.remove('/tmp/js/a.txt')
  ok('files remove', !(await sbx.files.exists('/tmp/js/a.txt')))

  const shown = []
  const term = await sbx.pty.create({
    cols: 100,
    rows: 30,
    timeoutMs: 300_000,
    onData: (d) => shown.push(Buffer.from(d).toString()),
  })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; echo js-$((6*7)); exit\n'))
  const ended = await term.wait()
  const screen = shown.join('')
  ok('pty', ended.exitCode === 0 && screen.includes('30 100') && screen.includes('js-42'), JSON.stringify(screen))

  const listed = await Sandbox.list().nextItems()
  ok('list', listed.some((s) => s.sandboxId === sbx.sandboxId), JSON.stringify(listed))

  await sbx.kill()
  ok('kill', !(await sbx.isRunning()))
  console.log('all done')
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
