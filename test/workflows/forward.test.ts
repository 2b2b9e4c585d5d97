/**
 * CLI commands on a served home are forwarded to the server that holds its store: over the
 * server's owner-only Unix socket (HOME/run/cli.sock), else over its HTTPS listener. Real `serve`
 * processes, real CLI processes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { appendFileSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { cli, initHome, startCli, startServe, tempDir } from '../helpers/appliance.js';
import { parseAnswer } from '../../appliance/cli/forward-client.cjs';
import { cliJson } from '../helpers/cli.js';

function serverInfo(home: string): { pid: number; url: string; socket?: string } {
  return JSON.parse(readFileSync(join(home, 'run', 'server.json'), 'utf8'));
}

/** One raw HTTP/1.1 exchange on a Unix socket: the status line of the answer. */
function rawStatus(socket: string, request: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const conn = connect(socket);
    conn.on('data', (c: Buffer) => chunks.push(c));
    conn.on('error', reject);
    conn.on('end', () => resolve(Buffer.concat(chunks).toString('latin1').split('\r\n')[0]!));
    conn.write(request);
  });
}

test('forwarded commands go over the owner-only socket, else HTTPS; the socket needs the token; it goes with the server', async (t) => {
  const a = await initHome(t, 'fwd');
  const img = join(a.dir, '..', 'disk.img');
  writeFileSync(img, Buffer.alloc(256 * 1024, 7));
  const served = await startServe(t, a);
  const info = serverInfo(a.dir);
  assert.equal(info.socket, join(a.dir, 'run', 'cli.sock'));
  assert.equal(statSync(info.socket!).mode & 0o777, 0o600, 'only the owner may connect');

  // The socket alone: the HTTPS address in server.json leads nowhere, the command still runs in the server.
  writeFileSync(join(a.dir, 'run', 'server.json'), JSON.stringify({ ...info, url: 'https://127.0.0.1:1' }));
  const added = await cli(a, 'volume', 'add', 'disk', '--path', img);
  assert.equal(added.code, 0, added.stderr);
  const listed = await cli(a, 'volume', 'list');
  assert.equal(listed.code, 0, listed.stderr);
  assert.deepEqual(listed.json.map((v: { name: string }) => v.name), ['disk']);

  // No socket: HTTPS. A socket path that cannot be connected to falls back to HTTPS too.
  for (const socket of [undefined, join(a.dir, 'run', 'gone.sock')]) {
    writeFileSync(join(a.dir, 'run', 'server.json'), JSON.stringify({ pid: info.pid, url: info.url, ...(socket ? { socket } : {}) }));
    const snap = await cli(a, 'snapshot', 'disk');
    assert.equal(snap.code, 0, snap.stderr);
  }
  // Run locally, each of these would meet the store held by the server (ERR_STORE_BUSY):
  // two snapshots taken means both were forwarded.
  const snaps = await cli(a, 'snapshots', 'disk');
  assert.equal(snaps.code, 0, snaps.stderr);
  assert.equal(snaps.json.length, 2);
  // A command's failure comes back as it is, exit code included, and is not run again elsewhere.
  writeFileSync(join(a.dir, 'run', 'server.json'), JSON.stringify(info));
  const missing = await cli(a, 'snapshot', 'nope');
  assert.equal(missing.code, 1);
  assert.equal(missing.json.error.code, 'ERR_VOLUME_NOT_FOUND');

  // The socket asks for the admin token like the network does; the peer token runs no command.
  const body = JSON.stringify({ argv: ['node', 'appliance', '--home', a.dir, 'volume', 'list'] });
  const req = (auth: string) => `POST /v1/cli HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\n${auth}content-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
  assert.match(await rawStatus(info.socket!, req('')), /^HTTP\/1\.1 401 /);
  assert.match(await rawStatus(info.socket!, req('authorization: Bearer wrong\r\n')), /^HTTP\/1\.1 401 /);
  assert.match(await rawStatus(info.socket!, req(`authorization: Bearer ${a.token}\r\n`)), /^HTTP\/1\.1 403 /);
  const admin = readFileSync(join(a.dir, 'admin.token'), 'utf8').trim();
  assert.match(await rawStatus(info.socket!, req(`authorization: Bearer ${admin}\r\n`)), /^HTTP\/1\.1 200 /);

  assert.equal(await served.stop(), 0);
  assert.equal(existsSync(info.socket!), false, 'the socket goes with the server');
  assert.equal(existsSync(join(a.dir, 'run', 'server.json')), false);
  const local = await cli(a, 'snapshots', 'disk');
  assert.equal(local.code, 0, 'no server: the command runs here');
});

test('a server killed with -9 leaves its socket; the next one replaces it and commands reach it', async (t) => {
  const a = await initHome(t, 'fwd-kill');
  const first = await startServe(t, a);
  const sock = serverInfo(a.dir).socket!;
  await first.kill('SIGKILL');
  assert.ok(existsSync(sock), 'a killed server cannot clean up');
  const stale = await cli(a, 'volume', 'list');
  assert.equal(stale.code, 0, `a dead server's files are ignored: ${stale.stderr}`);
  await startServe(t, a);
  assert.equal(serverInfo(a.dir).socket, sock);
  const r = await cli(a, 'peer', 'list');
  assert.equal(r.code, 0, r.stderr);
});

test('a home whose socket path would pass the 107-byte limit is served without one; commands go over HTTPS', async (t) => {
  const base = tempDir(t, 'tandem-fwd-long-');
  const dir = join(base, 'x'.repeat(Math.max(1, 110 - base.length)), 'home');
  assert.ok(join(dir, 'run', 'cli.sock').length > 107);
  assert.equal((await cli(dir, 'init', '--name', 'long')).code, 0);
  await startServe(t, dir);
  assert.equal(serverInfo(dir).socket, undefined);
  const r = await cli(dir, 'peer', 'list');
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.json, { peers: [] });
  // Forwarded, not run here: run here, it would meet the server's store (ERR_STORE_BUSY).
  const verified = await cli(dir, 'verify');
  assert.equal(verified.code, 0, verified.stderr);
});

test('parseAnswer: a body by length, by chunks or to the end; anything else is no answer', () => {
  const result = { exitCode: 3, stdout: 'out\n', stderr: 'é' };
  const json = JSON.stringify(result);
  const len = Buffer.byteLength(json);
  assert.deepEqual(parseAnswer(Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${len}\r\n\r\n${json}`)), result);
  assert.deepEqual(parseAnswer(Buffer.from(`HTTP/1.1 200 OK\r\n\r\n${json}`)), result);
  const half = Math.floor(json.length / 2);
  const chunked = `${half.toString(16)}\r\n${json.slice(0, half)}\r\n${(Buffer.byteLength(json) - Buffer.byteLength(json.slice(0, half))).toString(16)}\r\n${json.slice(half)}\r\n0\r\n\r\n`;
  assert.deepEqual(parseAnswer(Buffer.from(`HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n${chunked}`)), result);
  for (const bad of [
    `HTTP/1.1 401 Unauthorized\r\nContent-Length: ${len}\r\n\r\n${json}`,
    `HTTP/1.1 200 OK\r\nContent-Length: ${len + 1}\r\n\r\n${json}`, // cut short
    `HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\n${json}`, // cut short
    `HTTP/1.1 200 OK\r\nContent-Length: ${len}\r\n`, // no end of headers
    'HTTP/1.1 200 OK\r\n\r\n{"exitCode":"0","stdout":"","stderr":""}',
    'HTTP/1.1 200 OK\r\n\r\nnot json',
    '',
  ]) assert.equal(parseAnswer(Buffer.from(bad)), null, bad);
});

test('the audit log records each command that may change the appliance, run here or forwarded: who, the command (no secret), how it ended; reads are not recorded', async (t) => {
  const a = await initHome(t, 'audited');
  const img = join(a.dir, '..', 'disk.img');
  writeFileSync(img, Buffer.alloc(256 * 1024, 7));
  const me = userInfo().username;
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', '64KiB')).code, 0);
  assert.equal((await cli(a, 'status')).code, 0); // a read: not recorded
  assert.equal((await cli(a, 'volume', 'remove', 'nope')).code, 1);
  const served = await startServe(t, a);
  assert.equal((await cli(a, 'snapshot', 'vol')).code, 0); // forwarded to the server
  const snaps = await cli(a, 'snapshots', 'vol'); // a read, forwarded
  assert.equal((await cli(a, 'snapshots', 'vol', '--hold', snaps.json[0].id, '--reason', 'before the upgrade')).code, 0);
  assert.equal((await cli(a, 'peer', 'add', 'x', '--url', 'https://127.0.0.1:1', '--token', 's3cret-token-value-1234', '--fingerprint', 'AB'.repeat(32), '--no-check')).code, 0);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'x', '--dry-run')).code, 1); // a dry run: not recorded

  const log = await cli(a, 'audit');
  assert.equal(log.code, 0, log.stderr);
  const entries = log.json.entries as Array<{ user: string; forwarded?: boolean; command: string[]; exitCode: number; error?: string }>;
  const words = (c: string[]) => c.filter((w) => !w.startsWith('--home') && !w.startsWith('/') && w !== '--json').slice(0, 2).join(' ');
  assert.deepEqual(entries.map((e) => [words(e.command), e.exitCode, e.error ?? null, e.forwarded === true]), [
    ['init --name', 0, null, false],
    ['volume add', 0, null, false],
    ['volume remove', 1, 'ERR_VOLUME_NOT_FOUND', false],
    ['snapshot vol', 0, null, true],
    ['snapshots vol', 0, null, true],
    ['peer add', 0, null, true],
  ]);
  assert.ok(entries.every((e) => e.user === me), 'the CLI user, also for forwarded commands');
  assert.ok(!JSON.stringify(entries).includes('s3cret'), 'the token is not recorded');
  assert.deepEqual(entries.at(-1)!.command.slice(entries.at(-1)!.command.indexOf('--token'), entries.at(-1)!.command.indexOf('--token') + 2), ['--token', '…']);
  assert.equal(statSync(join(a.dir, 'audit.log')).mode & 0o777, 0o600);
  // --since and --limit narrow it; bad values are usage errors.
  assert.deepEqual((await cli(a, 'audit', '--limit', '2')).json.entries.map((e: { command: string[] }) => words(e.command)), ['snapshots vol', 'peer add']);
  assert.equal((await cli(a, 'audit', '--limit', 'x')).code, 2);
  assert.equal((await cli(a, 'audit', '--since', 'soon')).code, 2);
  // A line torn by a crash mid-write: skipped, and the next record is on a line of its own.
  appendFileSync(join(a.dir, 'audit.log'), '{"at":"2026-12-05T00:00:00.000Z","user":"x","pid":1,"comm');
  assert.equal((await cli(a, 'peer', 'remove', 'x')).code, 0);
  assert.deepEqual((await cli(a, 'audit', '--limit', '2')).json.entries.map((e: { command: string[] }) => words(e.command)), ['peer add', 'peer remove']);
  await served.stop();
});

/** A home whose volume v (1 MiB) has hooks that log to LOG: the pre hook sleeps `preSleep` seconds after logging. */
async function hookedHome(t: Parameters<typeof initHome>[0], preSleep: number, moreConfig = ''): Promise<{ a: Awaited<ReturnType<typeof initHome>>; log: string }> {
  const a = await initHome(t, 'fwdhook');
  const dir = tempDir(t, 'tandem-fwd-hook-');
  const img = join(dir, 'v.img');
  writeFileSync(img, Buffer.alloc(1024 * 1024, 3));
  assert.equal((await cli(a, 'volume', 'add', 'v', '--path', img)).code, 0);
  const log = join(dir, 'hook.log');
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: fwdhook }
groups:
  g:
    volumes: [v]
    hooks: { pre: "echo pre >> ${log}; sleep ${preSleep}", post: "echo post >> ${log}", timeout: 60s }
${moreConfig}`);
  return { a, log };
}

async function until(what: string, cond: () => boolean): Promise<void> {
  for (let i = 0; i < 300 && !cond(); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(cond(), `never: ${what}`);
}

const logLines = (log: string) => (existsSync(log) ? readFileSync(log, 'utf8').trim().split('\n') : []);

/** A served hooked home whose CLI snapshot of v is forwarded and has run its pre hook (which then sleeps `preSleep` s). */
async function forwardedHookedSnapshot(t: Parameters<typeof initHome>[0], preSleep: number, moreConfig = '') {
  const { a, log } = await hookedHome(t, preSleep, moreConfig);
  const served = await startServe(t, a);
  const snap = startCli(a, 'snapshot', 'v');
  await until('the pre hook ran', () => logLines(log).includes('pre'));
  return { a, log, served, snap };
}

test('serve stopped (SIGTERM) during a forwarded hooked snapshot: the snapshot finishes, its post hook runs, the CLI gets its answer; a command sent meanwhile is refused', async (t) => {
  const { a, log, served, snap } = await forwardedHookedSnapshot(t, 2);
  const stopped = served.stop();
  // Stopping: a command that arrives now is not run (and not run by the CLI either).
  await until('the server is stopping', () => served.stderr().includes('SIGTERM: shutting down'));
  const late = await cli(a, 'volume', 'list');
  assert.equal(late.code, 1, late.stderr);
  assert.equal(late.json?.error?.code, 'ERR_SERVER_STOPPING', late.stdout);
  const r = await snap.done;
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await stopped, 0, served.stderr());
  assert.deepEqual(logLines(log), ['pre', 'post'], 'thawed once, before the server ended');
  // Run here now that no server holds the home: exactly the one snapshot, the one the CLI was told of.
  const list = await cli(a, 'snapshots', 'v');
  assert.equal(list.code, 0, list.stderr);
  assert.deepEqual(list.json.map((s: { id: string }) => s.id), [r.json.snapshot.id]);
});

test('serve killed (-9) during a forwarded hooked snapshot: the CLI says the answer was lost and does not run it again; the next serve runs the owed post hook', async (t) => {
  const { a, log, served, snap } = await forwardedHookedSnapshot(t, 5);
  await served.kill('SIGKILL');
  const r = await snap.done;
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json?.error?.code, 'ERR_FORWARD_LOST', r.stdout);
  assert.match(r.stderr, /was not run again here/);
  const list = await cli(a, 'snapshots', 'v');
  assert.equal(list.code, 0, list.stderr);
  assert.deepEqual(list.json, [], 'no snapshot: the server died before committing and the CLI ran none');
  assert.deepEqual(logLines(log), ['pre'], 'still frozen');
  const again = await startServe(t, a);
  assert.match(again.stderr(), /ran the post hook `echo post >> .*` an interrupted snapshot owed/);
  assert.deepEqual(logLines(log), ['pre', 'post']);
  assert.equal(await again.stop(), 0);
});

test('serve stopped during a forwarded hooked snapshot that outlasts the grace (config.yaml shutdown.grace, read at the stop): the pre hook is stopped, the post hook runs, the CLI is told, nothing is committed', async (t) => {
  // A 2 s grace instead of the default 30 s: the test waits it out, and an answer well before
  // 30 s shows that the configured grace, not the default, held.
  const { a, log, served, snap } = await forwardedHookedSnapshot(t, 120, 'shutdown: { grace: 2s }\n');
  const t0 = Date.now();
  const stopped = served.stop();
  const r = await snap.done;
  const waited = Date.now() - t0;
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json?.error?.code, 'ERR_HOOK_FAILED', r.stdout);
  assert.match(r.json.error.message, /SIGTERM arrived between the hooks: the post hook ran, no snapshot was taken/);
  assert.ok(waited >= 1_900 && waited < 25_000, `answered after the 2 s grace: ${waited} ms`);
  assert.equal(await stopped, 0, served.stderr());
  assert.deepEqual(logLines(log), ['pre', 'post']);
  const list = await cli(a, 'snapshots', 'v');
  assert.deepEqual(list.json, []);
});

test('a command sent to a running server runs on the home this CLI resolved ($TANDEM_HOME, not the server\'s own environment); support-bundle writes into the caller\'s directory', async (t) => {
  const a = await initHome(t, 'onprem');
  const other = await initHome(t, 'other');
  // The server's environment names another home: a command without --home must not reach it.
  await startServe(t, a, '127.0.0.1:0', { TANDEM_HOME: other.dir });
  const img = join(tempDir(t), 'v.img');
  writeFileSync(img, Buffer.alloc(1024 * 1024, 1));
  const added = await cliJson(['volume', 'add', 'only-in-a', '--path', img], { env: { TANDEM_HOME: a.dir } });
  assert.equal(added.code, 0, added.stderr);
  const listed = await cliJson(['volume', 'list'], { env: { TANDEM_HOME: a.dir } });
  assert.deepEqual((listed.json as Array<{ name: string }>).map((v) => v.name), ['only-in-a']);
  assert.deepEqual((await cli(other, 'volume', 'list')).json, [], 'the other home is untouched');
  const here = tempDir(t);
  const bundle = await cliJson(['support-bundle'], { env: { TANDEM_HOME: a.dir }, cwd: here });
  assert.equal(bundle.code, 0, bundle.stderr);
  assert.ok(existsSync(bundle.json.file) && bundle.json.file.startsWith(here), `written into the caller's directory: ${bundle.json.file}`);
  assert.ok(statSync(bundle.json.file).size > 0);
});
