/**
 * A manual `appliance snapshot` runs the pre/post hooks of the volume's group, like the daemon:
 * a failing pre hook aborts with ERR_HOOK_FAILED and no snapshot, and the post hook always runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync, appendFileSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { rootCertificates } from 'node:tls';
import { cliJson, collect, spawnCli, tempDir } from '../helpers/cli.js';

/** A home in `dir` with volume db (a 192 KiB image) in group erp, whose hooks are `hooks` (YAML lines). */
async function homeWithHooks(dir: string, hooks: string): Promise<string> {
  const home = join(dir, 'home');
  const img = join(dir, 'db.img');
  writeRandom(img, 3 * 65536);
  assert.equal((await cliJson(['--home', home, 'init', '--name', 'h'])).code, 0);
  assert.equal((await cliJson(['--home', home, 'volume', 'add', 'db', '--path', img, '--block-size', '64KiB'])).code, 0);
  appendFileSync(join(home, 'config.yaml'), `groups:\n  erp:\n    volumes: [db]\n    hooks:\n${hooks}`);
  return home;
}

/**
 * A home whose volume's hooks stand for a freeze: the pre hook creates FROZEN and runs `pre`
 * (shell, with $FROZEN and $LOG set), the post hook removes FROZEN and logs "post".
 */
async function freezingHome(t: { after(fn: () => void): void }, pre: string, timeout = '10s', beforeThaw = ''): Promise<{ home: string; log: string; frozen: string }> {
  const dir = tempDir(t);
  const log = join(dir, 'hooks.log');
  const frozen = join(dir, 'FROZEN');
  const home = await homeWithHooks(dir, `      pre: "touch ${frozen}; ${pre.replaceAll('$LOG', log)}"
      post: "${beforeThaw.replaceAll('$LOG', log)}rm ${frozen} && echo post >> ${log}"
      timeout: ${timeout}
`);
  return { home, log, frozen };
}

test('manual snapshots run the group hooks; a failing pre hook takes no snapshot and still runs post', async (t) => {
  const dir = tempDir(t);
  const log = join(dir, 'hooks.log');
  const flag = join(dir, 'fail-pre');
  const home = await homeWithHooks(dir, `      pre: "test ! -e ${flag} && echo pre $TANDEM_VOLUME >> ${log}"
      post: "echo post $TANDEM_VOLUME >> ${log}"
      timeout: 10s
`);

  const ok = await cliJson(['--home', home, 'snapshot', 'db']);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(readFileSync(log, 'utf8'), 'pre db\npost db\n');

  writeFileSync(flag, '');
  const bad = await cliJson(['--home', home, 'snapshot', 'db']);
  assert.equal(bad.code, 1);
  assert.equal(bad.json.error.code, 'ERR_HOOK_FAILED');
  assert.equal(readFileSync(log, 'utf8'), 'pre db\npost db\npost db\n', 'post ran after the failed pre');
  const snaps = await cliJson(['--home', home, 'snapshots', 'db']);
  assert.equal(JSON.stringify(snaps.json).match(/"id"/g)?.length, 1, 'no second snapshot was taken');
  assert.ok(existsSync(flag));
});

test('hooks see NODE_EXTRA_CA_CERTS as the operator set it, though the launcher keeps it from Node', async (t) => {
  const dir = tempDir(t);
  const log = join(dir, 'env.log');
  const ca = join(dir, 'ca.pem');
  writeFileSync(ca, rootCertificates[0]!);
  const home = await homeWithHooks(dir, `      pre: 'echo "$NODE_EXTRA_CA_CERTS|\${TANDEM_EXTRA_CA_CERTS-unset}" >> ${log}'\n`);
  const ok = await cliJson(['--home', home, 'snapshot', 'db'], { env: { NODE_EXTRA_CA_CERTS: ca } });
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(readFileSync(log, 'utf8'), `${ca}|unset\n`);
});

test('Ctrl-C, a closed terminal or kill during a hooked snapshot runs the post hook (the thaw) before the command ends', async (t) => {
  for (const sig of ['SIGINT', 'SIGHUP', 'SIGTERM'] as const) {
    // The signal arrives while the pre hook runs: it is killed (so it logs nothing), then the thaw runs.
    const { home, log, frozen } = await freezingHome(t, `kill -${sig.slice(3)} $PPID; sleep 0.3; echo pre >> $LOG`);
    const r = await collect(spawnCli(['--home', home, 'snapshot', 'db']));
    assert.equal(r.signal, sig, `ended by ${sig} as it would have been: ${r.stderr}`);
    assert.match(r.stderr, new RegExp(`${sig}: stopping at the next safe point[^]*post hook \`rm [^\`]*\` exited 0[^]*ERR_INTERRUPTED`), 'the command stops, runs the post hook, and says so');
    assert.equal(readFileSync(log, 'utf8'), 'post\n', 'post ran once, after the pre hook ended');
    assert.ok(!existsSync(frozen), 'the file system was thawed');
    const snaps = await cliJson(['--home', home, 'snapshots', 'db']);
    assert.deepEqual(snaps.json, [], 'no snapshot was taken');
  }
});

test('a signal while the snapshot reads the volume: the scan stops before it commits, so no snapshot holds data read after the thaw', async (t) => {
  const dir = tempDir(t);
  const log = join(dir, 'hooks.log');
  const frozen = join(dir, 'FROZEN');
  const home = join(dir, 'home');
  const img = join(dir, 'big.img');
  // Large enough that the scan is under way when the signal comes; the post hook is slow, so the
  // scan would finish and commit while it runs, if nothing stopped it.
  writeRandom(img, 256 * 1024 * 1024);
  assert.equal((await cliJson(['--home', home, 'init', '--name', 'h'])).code, 0);
  assert.equal((await cliJson(['--home', home, 'volume', 'add', 'big', '--path', img])).code, 0);
  // The pre hook leaves a watcher behind: once the CLI has the image open (the scan began), it
  // sends SIGTERM. Bounded: it gives up after ~5 s.
  const watch = `(n=0; while [ $n -lt 500 ] && ! ls -l /proc/$PPID/fd 2>/dev/null | grep -q big.img; do n=$((n+1)); sleep 0.01; done; kill -TERM $PPID) >/dev/null 2>&1 &`;
  appendFileSync(join(home, 'config.yaml'), `groups:\n  g:\n    volumes: [big]\n    hooks:\n      pre: "touch ${frozen}; ${watch}"\n      post: "sleep 2; rm ${frozen} && echo post >> ${log}"\n      timeout: 10s\n`);
  const r = await collect(spawnCli(['--home', home, 'snapshot', 'big']));
  assert.equal(r.signal, 'SIGTERM', r.stderr);
  assert.match(r.stderr, /SIGTERM: stopping at the next safe point[^]*post hook `sleep 2; rm [^`]*` exited 0/);
  assert.equal(readFileSync(log, 'utf8'), 'post\n');
  assert.ok(!existsSync(frozen));
  const snaps = await cliJson(['--home', home, 'snapshots', 'big']);
  assert.deepEqual(snaps.json, [], 'the scan under way when the post hook began did not commit');
  const v = await cliJson(['--home', home, 'verify']);
  assert.equal(v.code, 0, v.stderr);
});

test('kill -9 between the hooks: doctor says the post hook is owed; the next snapshot, or the daemon when it starts, runs it first', async (t) => {
  for (const by of ['snapshot', 'daemon'] as const) {
    const kill = join(tempDir(t), 'KILL');
    const { home, log, frozen } = await freezingHome(t, `echo pre >> $LOG; if [ -e ${kill} ]; then rm ${kill}; kill -9 $PPID; sleep 5; fi`);
    writeFileSync(kill, '');
    const killed = await collect(spawnCli(['--home', home, 'snapshot', 'db']));
    assert.equal(killed.signal, 'SIGKILL');
    assert.ok(existsSync(frozen), 'the killed snapshot left the file system frozen');

    const doctor = await cliJson(['--home', home, 'doctor']);
    assert.equal(doctor.code, 1);
    assert.match(JSON.stringify(doctor.json), /did not run its post hook `rm [^`]*FROZEN/);
    assert.ok(existsSync(frozen), 'doctor only reads');

    if (by === 'snapshot') {
      const next = await cliJson(['--home', home, 'snapshot', 'db']);
      assert.equal(next.code, 0, next.stderr);
      assert.match(next.stderr, /ran the post hook `rm [^`]*` that a snapshot interrupted at \S+ owed: exited 0/);
      assert.equal(readFileSync(log, 'utf8'), 'pre\npost\npre\npost\n', 'the owed post ran before the new pre');
    } else {
      const d = spawnCli(['--home', home, 'daemon', '--listen', '127.0.0.1:0']);
      const ended = collect(d);
      const deadline = Date.now() + 30_000;
      while (existsSync(frozen) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      d.kill('SIGTERM');
      const r = await ended;
      assert.ok(!existsSync(frozen), `the daemon thawed at its start: ${r.stderr}`);
      assert.match(r.stderr, /ran the post hook an interrupted snapshot owed/);
      assert.equal(readFileSync(log, 'utf8'), 'pre\npost\n');
    }
    assert.ok(!existsSync(frozen));
    const after = await cliJson(['--home', home, 'doctor']);
    assert.doesNotMatch(JSON.stringify(after.json), /did not run its post hook/, 'nothing is owed any more');
  }
});

test('Ctrl-C while the pre hook hangs: the pre hook is killed and the post hook runs at once, not after the timeout', async (t) => {
  const { home, log, frozen } = await freezingHome(t, 'kill -INT $PPID; sleep 30; echo pre >> $LOG', '60s');
  const started = Date.now();
  const r = await collect(spawnCli(['--home', home, 'snapshot', 'db']));
  assert.equal(r.signal, 'SIGINT', r.stderr);
  assert.ok(Date.now() - started < 20_000, `took ${Date.now() - started} ms: the hanging pre hook was waited for`);
  assert.equal(readFileSync(log, 'utf8'), 'post\n', 'the pre hook was killed before it finished; post ran');
  assert.ok(!existsSync(frozen));
});

test('Ctrl-C again while the post hook (the thaw) runs does not end the command before it: the file system is never left frozen', async (t) => {
  // Ctrl-C during the pre hook, and again as the post hook starts.
  const { home, log, frozen } = await freezingHome(t, 'kill -INT $PPID; sleep 30', '60s', 'kill -INT $PPID; sleep 1; ');
  const r = await collect(spawnCli(['--home', home, 'snapshot', 'db']));
  assert.ok(!existsSync(frozen), `thawed before the command ended: ${r.stderr}`);
  assert.equal(readFileSync(log, 'utf8'), 'post\n');
  assert.match(r.stderr, /SIGINT again: the post hook \(the thaw\) runs first/);
  assert.equal(r.signal, 'SIGINT', r.stderr);
});
