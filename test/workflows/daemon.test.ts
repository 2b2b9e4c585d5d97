/**
 * The daemon as a real process: snapshots a group between its hooks, survives
 * kill -9 in the middle of a job (the restarted daemon resumes the same job), serves /v1/status
 * and /metrics behind the token, and stops cleanly on SIGTERM. Runs dist/ (`npm run build`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:https';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { readFileSync, writeFileSync, existsSync, watch, rmSync, readdirSync, openSync, readSync, writeSync, closeSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { userInfo } from 'node:os';
import type { ChildProcess } from 'node:child_process';
import { initHome, startServe, pair, pairedWithVolume, cli, damageBlock, tempDir, type TestHome } from '../helpers/appliance.js';
import { spawnCli, cli as cliText, smallTmpfs } from '../helpers/cli.js';

const MiB = 1024 * 1024;
/** Upper bound for any one wait below (cold starts on a loaded 2-core machine). */
const WAIT_MS = 60_000;

interface Daemon {
  readonly child: ChildProcess;
  readonly url: string;
  /** Resolves when a stderr (pino JSON) line satisfies `pred`. */
  logLine(pred: (o: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
  stderr(): string;
  readonly exited: Promise<[number | null, NodeJS.Signals | null]>;
}

async function startDaemon(t: { after(fn: () => unknown): void }, home: TestHome): Promise<Daemon> {
  const child = spawnCli(['--home', home.dir, '--json', 'daemon', '--listen', '127.0.0.1:0']);
  let err = '';
  const waiters: Array<{ pred: (o: Record<string, unknown>) => boolean; resolve: (o: Record<string, unknown>) => void }> = [];
  const seen: Record<string, unknown>[] = [];
  let partial = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    partial += d.toString();
    let nl;
    while ((nl = partial.indexOf('\n')) >= 0) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      try {
        const o = JSON.parse(line) as Record<string, unknown>;
        seen.push(o);
        for (const w of [...waiters]) if (w.pred(o)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(o); }
      } catch { /* not a log line */ }
    }
  });
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  t.after(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); });
  const [line] = await Promise.race([
    once(child.stdout!, 'data') as Promise<[Buffer]>,
    exited.then(() => { throw new Error(`daemon exited early: ${err}`); }),
  ]);
  const url = (JSON.parse(line.toString()) as { url: string }).url;
  return {
    child, url, exited, stderr: () => err,
    logLine: (pred) => {
      const hit = seen.find(pred);
      if (hit) return Promise.resolve(hit);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no such log line within ${WAIT_MS} ms:\n${err}`)), WAIT_MS);
        waiters.push({ pred, resolve: (o) => { clearTimeout(timer); resolve(o); } });
      });
    },
  };
}

function get(home: TestHome, url: string, path: string, token: string | null): Promise<{ status: number; body: string }> {
  const cert = readFileSync(join(home.dir, 'tls', 'cert.pem'), 'utf8');
  return new Promise((resolve, reject) => {
    const req = request(new URL(path, url), { ca: cert, checkServerIdentity: () => undefined, headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode!, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Resolves when `file` exists and has `lines` non-empty lines (watching its directory). */
function fileLines(dir: string, file: string, lines: number): Promise<string[]> {
  const read = () => (existsSync(join(dir, file)) ? readFileSync(join(dir, file), 'utf8').split('\n').filter(Boolean) : []);
  return new Promise((resolve, reject) => {
    const check = () => {
      const l = read();
      if (l.length >= lines) { w.close(); clearTimeout(timer); resolve(l); }
    };
    const w = watch(dir, check);
    const timer = setTimeout(() => { w.close(); reject(new Error(`${file} never reached ${lines} line(s)`)); }, WAIT_MS);
    check();
  });
}

/** An on-prem home paired with a cloud home whose server runs (its URL in `served`). */
async function pairedHomes(t: { after(fn: () => unknown): void }) {
  const a = await initHome(t, 'onprem');
  const b = await initHome(t, 'cloud');
  const served = await startServe(t, b);
  await pair(a, 'cloud', b, served);
  return { a, b, served };
}

/** `appliance snapshots VOL` on `home` (forwarded to its daemon, if one runs), oldest first. */
async function snapshotsOf(home: TestHome, volume: string): Promise<Array<{ id: string; root: string; labels?: Record<string, string> }>> {
  const listed = await cli(home, 'snapshots', volume);
  assert.equal(listed.code, 0, listed.stderr);
  return (Array.isArray(listed.json) ? listed.json : listed.json.snapshots) as Array<{ id: string; root: string; labels?: Record<string, string> }>;
}

/**
 * A local webhook receiver: its URL and the first JSON body POSTed to it with event `event` (a
 * machine whose disk is low also gets disk_low, whatever the test is about).
 */
async function webhook<T>(t: { after(fn: () => unknown): void }, event: string): Promise<{ url: string; first: Promise<T> }> {
  const hook = createServer();
  hook.listen(0, '127.0.0.1');
  await once(hook, 'listening');
  t.after(() => hook.close());
  const first = new Promise<T>((resolve) => {
    hook.on('request', (req, res) => {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        res.end();
        const o = JSON.parse(body) as { event?: string };
        if (o.event === event) resolve(o as T);
      });
    });
  });
  return { url: `http://127.0.0.1:${(hook.address() as { port: number }).port}/tandem`, first };
}

test('daemon: group snapshotted between hooks, kill -9 mid-job resumes the same job, status and metrics, clean SIGTERM', async (t) => {
  const work = tempDir(t, 'tandem-daemon-');
  const a = await initHome(t, 'onprem');
  const img = join(work, 'db-data.img');
  writeRandom(img, 4 * MiB);
  assert.equal((await cli(a, 'volume', 'add', 'db-data', '--path', img)).code, 0);
  // The pre hook records the job id and its process group, then blocks until `go` exists.
  const pre = `echo $TANDEM_JOB >> ${work}/pre.log; echo $$ > ${work}/hook.pid; [ -f ${work}/go ] || sleep 30`;
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
policies:
  gold:
    rpo: 1h
    rto: 30m
    retention: { last: 3 }
assign:
  - match: "db-*"
    policy: gold
groups:
  erp:
    volumes: [db-data]
    hooks:
      pre: '${pre}'
      post: 'echo $TANDEM_JOB >> ${work}/post.log'
      timeout: 45s
`);
  assert.equal((await cli(a, 'config', 'check')).code, 0);

  // 1. The first daemon starts the job (never protected: due now) and is killed inside the pre hook.
  const d1 = await startDaemon(t, a);
  const [jobId] = await fileLines(work, 'pre.log', 1);
  assert.match(jobId!, /^job-/);
  d1.child.kill('SIGKILL');
  await d1.exited;
  const hookPid = Number(readFileSync(join(work, 'hook.pid'), 'utf8'));
  try { process.kill(-hookPid, 'SIGKILL'); } catch { /* already gone */ }
  assert.equal(existsSync(join(work, 'post.log')), false, 'killed before the post hook');

  // 2. The restarted daemon resumes the same job and finishes it.
  writeFileSync(join(work, 'go'), '');
  const d2 = await startDaemon(t, a);
  const resumed = await d2.logLine((o) => o.msg === 'resuming a job interrupted by a restart');
  assert.equal(resumed.job, jobId);
  const done = await d2.logLine((o) => o.msg === 'job done' || o.msg === 'job failed');
  assert.equal(done.msg, 'job done', d2.stderr());
  assert.equal(done.job, jobId);
  const preLines = readFileSync(join(work, 'pre.log'), 'utf8').split('\n').filter(Boolean);
  assert.deepEqual(preLines, [jobId, jobId], 'same job, run again from its snapshot step');
  // The post hook the killed daemon owed ran first, at the restart (whatever its pre hook froze is
  // thawed before anything else), then the resumed job's own.
  await d2.logLine((o) => o.msg === 'ran the post hook an interrupted snapshot owed');
  assert.deepEqual(readFileSync(join(work, 'post.log'), 'utf8').split('\n').filter(Boolean), [jobId, jobId]);
  // The listing names each snapshot's group run (to restore a server's disks from one run).
  assert.match((await cliText(['--home', a.dir, 'snapshots', 'db-data'])).stdout, new RegExp(`\\bscan\\s+erp ${jobId}\\s`));

  // 3. Status and metrics over the API (token required), and the CLI forwarded to the daemon.
  assert.equal((await get(a, d2.url, '/metrics', null)).status, 401);
  const status = JSON.parse((await get(a, d2.url, '/v1/status', a.token)).body);
  const vol = status.volumes.find((v: { volume: string }) => v.volume === 'db-data');
  assert.equal(vol.rpoState, 'OK');
  assert.equal(vol.lastJob.id, jobId);
  assert.equal(vol.lastJob.ok, true);
  assert.ok(vol.lastSnapshot.id);
  assert.equal(JSON.parse((await get(a, d2.url, '/v1/status?volume=db-data', a.token)).body).volumes.length, 1);
  // A volume asked for by name that is not here: 404, as `appliance status VOL` exits 1.
  const nosuch = await get(a, d2.url, '/v1/status?volume=nosuch', a.token);
  assert.equal(nosuch.status, 404);
  assert.equal(JSON.parse(nosuch.body).error.code, 'ERR_VOLUME_NOT_FOUND');
  const metrics = await get(a, d2.url, '/metrics', a.token);
  assert.equal(metrics.status, 200);
  assert.match(metrics.body, /tandem_rpo_state\{volume="db-data",policy="gold",state="OK"\} 1/);
  // The monitor token reads /metrics and /v1/status, nothing else; rotated, the old one is refused at once.
  const monitor = (await cli(a, 'token', 'show', '--monitor')).json.token as string;
  assert.notEqual(monitor, a.token);
  assert.equal((await get(a, d2.url, '/metrics', monitor)).status, 200);
  assert.equal(JSON.parse((await get(a, d2.url, '/v1/status', monitor)).body).volumes.length, status.volumes.length);
  for (const path of ['/v1/volumes/db-data/snapshots/latest', '/v1/stats', '/v1/recovery/runs']) {
    const r = await get(a, d2.url, path, monitor);
    assert.equal(r.status, 403, path);
    assert.equal(JSON.parse(r.body).error.code, 'ERR_FORBIDDEN');
  }
  const rotated = await cli(a, 'token', 'rotate', '--monitor');
  assert.equal(rotated.code, 0, rotated.stderr);
  // A running server reads the token files again within a second (api/server.ts, TokenCheck).
  let oldStatus = 0;
  for (let i = 0; i < 40 && oldStatus !== 401; i++) {
    if (i > 0) await sleep(100);
    oldStatus = (await get(a, d2.url, '/metrics', monitor)).status;
  }
  assert.equal(oldStatus, 401, 'the replaced monitor token is refused within a second');
  assert.equal((await get(a, d2.url, '/metrics', rotated.json.token)).status, 200);
  assert.equal((await cli(a, 'token', 'rotate', '--monitor', '--admin')).code, 2);

  const viaCli = await cli(a, 'status', 'db-data');
  assert.equal(viaCli.code, 0, viaCli.stderr);
  assert.equal(viaCli.json.volumes[0].lastSnapshot.id, vol.lastSnapshot.id);

  // The snapshot is labelled with its group run (CLI forwarded to the daemon, which holds the store).
  const snaps = await snapshotsOf(a, 'db-data');
  assert.equal(snaps.length, 1, 'the killed attempt committed nothing');
  assert.deepEqual(snaps[0]!.labels, { group: 'erp', groupRun: jobId });

  // 4. SIGTERM: exits 0 and removes run/server.json.
  d2.child.kill('SIGTERM');
  const [code] = await d2.exited;
  assert.equal(code, 0, d2.stderr());
  assert.equal(existsSync(join(a.dir, 'run', 'server.json')), false);
});

test('daemon replicates to its peer before the RPO; the peer holds the snapshot; a breach calls the webhook', async (t) => {
  const work = tempDir(t, 'tandem-daemon-repl-');
  const { a, b, served } = await pairedHomes(t);
  const img = join(work, 'web.img');
  writeRandom(img, 3 * MiB);
  assert.equal((await cli(a, 'volume', 'add', 'web', '--path', img)).code, 0);
  // A volume whose image disappeared: its jobs fail, its RPO is breached, the webhook is called.
  const lost = join(work, 'lost.img');
  writeRandom(lost, MiB);
  assert.equal((await cli(a, 'volume', 'add', 'lost', '--path', lost)).code, 0);
  rmSync(lost);
  const { url: hookUrl, first: alert } = await webhook<{ event: string; volume: string; appliance: string }>(t, 'rpo_breached');
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
policies:
  silver: { rpo: 2h, retention: { last: 1 } }
assign:
  - match: "*"
    policy: silver
replication:
  peer: cloud
  schedule: [{ bwlimit: 1MiB }]   # a window of every day, all day
alerts: { webhook: "${hookUrl}" }
`);
  const d = await startDaemon(t, a);
  const done = await d.logLine((o) => o.unit === 'volume:web' && (o.msg === 'job done' || o.msg === 'job failed'));
  assert.equal(done.msg, 'job done', d.stderr());
  // The schedule's cap held the push: 3 MiB at 1 MiB/s after a 256 KiB burst is 2.75 s at least.
  const started = await d.logLine((o) => o.unit === 'volume:web' && o.msg === 'job started');
  const took = ((done.time as number) - (started.time as number)) / 1000;
  assert.ok(took >= 2.2, `the push took ${took} s: the scheduled cap was not applied`);
  // The job's blocks went while the volume was scanned (steps.ts EarlyPush), under the same cap:
  // all 6 new blocks (3 MiB) by early sending, none left to the engine.
  const replicated = await d.logLine((o) => o.unit === 'volume:web' && o.msg === 'replicated');
  assert.equal(replicated.peer, 'cloud');
  assert.equal(replicated.blocksSentEarly, 6, JSON.stringify(replicated));
  assert.equal(replicated.bytesSentEarly, 3 * MiB);
  assert.equal(replicated.bytesSent, 3 * MiB);
  // The peer's lock answer said it holds no damage: the push did not ask for the list.
  const routes = (JSON.parse((await get(b, served.url, '/v1/stats', b.token)).body) as { routes: Record<string, number> }).routes;
  assert.equal(routes['GET /v1/damage'], undefined, JSON.stringify(routes));
  assert.ok(routes['POST /v1/volumes/:vol/lock']! >= 1);
  assert.deepEqual(await alert.then((x) => [x.event, x.volume, x.appliance]), ['rpo_breached', 'lost', 'onprem']);
  const status = JSON.parse((await get(a, d.url, '/v1/status', a.token)).body);
  const vol = status.volumes.find((v: { volume: string }) => v.volume === 'web');
  const lostJob = await d.logLine((o) => o.unit === 'volume:lost' && o.msg === 'job failed');
  assert.equal((lostJob.err as { code: string }).code, 'ERR_VOLUME_UNREADABLE');
  assert.equal(vol.volume, 'web');
  assert.equal(vol.rpoState, 'OK');
  assert.equal(vol.lastReplicated.snapshot, vol.lastSnapshot.id);
  assert.deepEqual((await snapshotsOf(b, 'web')).map((s) => s.id), [vol.lastSnapshot.id], 'the peer holds the replicated snapshot');
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);
});

test("a group's job sends each volume's new blocks during its scan, between the group's hooks, and pushes both snapshots", async (t) => {
  const work = tempDir(t, 'tandem-daemon-group-');
  const { a, b, served } = await pairedHomes(t);
  for (const [name, size] of [['db-data', 3], ['db-log', 2]] as const) {
    const img = join(work, `${name}.img`);
    writeRandom(img, size * MiB);
    assert.equal((await cli(a, 'volume', 'add', name, '--path', img)).code, 0);
  }
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
policies:
  gold: { rpo: 1h, retention: { last: 2 } }
assign:
  - match: "db-*"
    policy: gold
groups:
  erp:
    volumes: [db-data, db-log]
    hooks:
      pre: 'echo pre >> ${work}/hooks.log'
      post: 'echo post >> ${work}/hooks.log'
replication:
  peer: cloud
`);
  const d = await startDaemon(t, a);
  const done = await d.logLine((o) => o.unit === 'group:erp' && (o.msg === 'job done' || o.msg === 'job failed'));
  assert.equal(done.msg, 'job done', d.stderr());
  assert.deepEqual(readFileSync(join(work, 'hooks.log'), 'utf8').split('\n').filter(Boolean), ['pre', 'post']);
  // Every block of both volumes went by early sending (the first job: all are new), none by the engine.
  for (const [name, size] of [['db-data', 3], ['db-log', 2]] as const) {
    const r = await d.logLine((o) => o.msg === 'replicated' && o.volume === name);
    assert.equal(r.blocksSentEarly, (size * MiB) / (512 * 1024), JSON.stringify(r));
    assert.equal(r.bytesSent, size * MiB);
    const ids = async (home: TestHome) => (await snapshotsOf(home, name)).map((s) => `${s.id} ${s.root}`);
    assert.deepEqual(await ids(b), await ids(a), `the peer holds ${name}'s snapshot`);
  }
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);
});

test('a daemon killed (kill -9) while its job sends early resumes the job, and no block the peer stored travels again', async (t) => {
  const work = tempDir(t, 'tandem-daemon-kill-early-');
  const { a, b, served } = await pairedHomes(t);
  const img = join(work, 'web.img');
  writeRandom(img, 4 * MiB);
  assert.equal((await cli(a, 'volume', 'add', 'web', '--path', img)).code, 0);
  // 1 MiB/s: the 8 blocks take ~4 s, long enough to stop the daemon partway.
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
policies:
  silver: { rpo: 2h, retention: { last: 2 } }
assign:
  - match: "*"
    policy: silver
replication:
  peer: cloud
  bwlimit: 1MiB
`);
  const received = async (): Promise<number> => (JSON.parse((await get(b, served.url, '/v1/stats', b.token)).body) as { blocksReceived: number }).blocksReceived;
  const d1 = await startDaemon(t, a);
  await d1.logLine((o) => o.unit === 'volume:web' && o.msg === 'job started');
  const deadline = Date.now() + WAIT_MS;
  while ((await received()) < 2 && Date.now() < deadline) await sleep(20);
  d1.child.kill('SIGKILL');
  await d1.exited;
  const before = await received();
  assert.ok(before >= 2 && before < 8, `the peer received ${before} blocks before the kill`);

  const d2 = await startDaemon(t, a);
  const done = await d2.logLine((o) => o.unit === 'volume:web' && (o.msg === 'job done' || o.msg === 'job failed'));
  assert.equal(done.msg, 'job done', d2.stderr());
  const replicated = await d2.logLine((o) => o.unit === 'volume:web' && o.msg === 'replicated');
  assert.ok((replicated.bytesSent as number) <= 4 * MiB - before * 512 * 1024, JSON.stringify(replicated));
  assert.equal(await received(), 8, 'every block arrived at the peer once');
  const latest = async (home: TestHome) => (await snapshotsOf(home, 'web')).map((s) => `${s.id} ${s.root}`).at(-1);
  assert.deepEqual(await latest(b), await latest(a));
  assert.equal((await cli(b, 'verify')).code, 0);
  d2.child.kill('SIGTERM');
  assert.equal((await d2.exited)[0], 0);
});

test('daemon verifies the store on schedule, at its byte rate: a damaged block calls the webhook and shows in metrics and status; SIGTERM stops a running verify', async (t) => {
  const work = tempDir(t, 'tandem-daemon-verify-');
  const a = await initHome(t, 'onprem');
  const img = join(work, 'v.img');
  writeRandom(img, 8 * MiB);
  assert.equal((await cli(a, 'volume', 'add', 'v', '--path', img)).code, 0);
  const snap = await cli(a, 'snapshot', 'v');
  assert.equal(snap.code, 0, snap.stderr);
  // One byte flipped in the middle of the pack: the record of one of the 16 blocks.
  const packs = join(a.dir, 'store', 'packs');
  const pack = join(packs, readdirSync(packs).find((n) => n.endsWith('.pack'))!);
  const fd = openSync(pack, 'r+');
  const byte = Buffer.alloc(1);
  readSync(fd, byte, 0, 1, 4 * MiB + 12345);
  writeSync(fd, Buffer.from([byte[0]! ^ 0xff]), 0, 1, 4 * MiB + 12345);
  closeSync(fd);
  const { url: hookUrl, first: alert } = await webhook<{ event: string; appliance: string; run: { ok: boolean; problems: number; bytes: number; seconds: number; firstProblems: Array<{ code: string; volume: string; snapshot: string }> } }>(t, 'verify_failed');
  // No policy: the scheduler has nothing to do; the store is verified 2 s after the daemon
  // first started, then every 2 s, reading at most 4 MiB a second.
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
verify: { every: 2s, bwlimit: 4MiB }
alerts: { webhook: "${hookUrl}" }
`);
  const d = await startDaemon(t, a);
  const got = await alert;
  assert.equal(got.event, 'verify_failed');
  assert.equal(got.appliance, 'onprem');
  assert.equal(got.run.ok, false);
  assert.equal(got.run.problems, 1);
  assert.deepEqual([got.run.firstProblems[0]!.code, got.run.firstProblems[0]!.volume, got.run.firstProblems[0]!.snapshot], ['ERR_BLOCK_CORRUPT', 'v', snap.json.snapshot.id]);
  // 15 good blocks (7.5 MiB) re-hashed at no more than 4 MiB a second.
  assert.equal(got.run.bytes, 15 * 512 * 1024);
  assert.ok(got.run.seconds >= 7.5 / 4 - 0.05, `read ${got.run.bytes} bytes in ${got.run.seconds} s`);
  const metrics = (await get(a, d.url, '/metrics', a.token)).body;
  assert.match(metrics, /^tandem_verify_problems 1$/m);
  assert.match(metrics, /^tandem_verify_unhealed 1$/m); // no peer to heal from
  assert.match(metrics, /^tandem_verify_failed 0$/m);
  assert.ok(Number(/^tandem_verify_last_timestamp_seconds (\S+)$/m.exec(metrics)![1]) > Date.now() / 1000 - 60);
  const status = await cli(a, 'status');
  assert.equal(status.code, 0, status.stderr);
  assert.equal(status.json.verify.last.problems, 1);
  assert.equal(status.json.verify.every, '2s');
  const text = await cliText(['--home', a.dir, 'status']);
  assert.match(text.stdout, /store verify \d+s ago: 1 PROBLEMS, e\.g\. ERR_BLOCK_CORRUPT block of v@\S+ block \d+; heal them with `appliance repair --peer NAME`/);

  // The next run starts 2 s after this one ended; SIGTERM while it runs stops it and the daemon.
  await d.logLine((o) => o.msg === 'scheduled verify started' && seenStarts(d) >= 2);
  d.child.kill('SIGTERM');
  const [code] = await d.exited;
  assert.equal(code, 0, d.stderr());
  assert.match(d.stderr(), /scheduled verify stopped with the daemon/);
});

test('daemon heals what its scheduled verify finds with copies from its replication peer', async (t) => {
  const { a, img } = await pairedWithVolume(t, 64);
  const sync = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(sync.code, 0, sync.stderr);
  // Block 5's record damaged on this side only.
  damageBlock(a, readFileSync(img).subarray(5 * 65536, 6 * 65536));
  const { url: hookUrl, first: alert } = await webhook<{ event: string; run: { problems: number; repair: { peer: string; blocksRepaired: number; nodesRepaired: number; unrepaired: number } } }>(t, 'verify_failed');
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
replication: { peer: cloud }
verify: { every: 2s }
alerts: { webhook: "${hookUrl}" }
`);
  const d = await startDaemon(t, a);
  const got = await alert;
  assert.equal(got.event, 'verify_failed');
  assert.equal(got.run.problems, 1);
  assert.deepEqual(got.run.repair, { peer: 'cloud', blocksRepaired: 1, nodesRepaired: 0, unrepaired: 0 });
  assert.match((await get(a, d.url, '/metrics', a.token)).body, /^tandem_verify_unhealed 0$/m);
  const verify = await cli(a, 'verify');
  assert.equal(verify.code, 0, verify.stderr);
  const restored = join(a.dir, 'out.img');
  assert.equal((await cli(a, 'restore', 'vol', '--to', restored)).code, 0);
  assert.ok(sameBytes(restored, img));
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);
});

test("daemon's scheduled sync heals what the peer's verify found damaged, with this store's copies", async (t) => {
  const { a, b, img } = await pairedWithVolume(t, 64);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  // Block 9's record damaged in the cloud's store; its verify (forwarded to its server) finds it.
  damageBlock(b, readFileSync(img).subarray(9 * 65536, 10 * 65536));
  assert.equal((await cli(b, 'verify')).code, 1);
  // The push above is a recovery point the scheduler counts: its first job comes when the RPO
  // asks, a few seconds after it.
  writeFileSync(join(a.dir, 'config.yaml'), `appliance: { name: onprem }
policies:
  silver: { rpo: 3s }
assign:
  - { match: "*", policy: silver }
replication: { peer: cloud }
`);
  const d = await startDaemon(t, a);
  const healed = await d.logLine((o) => o.msg === "healed what the peer's verify found damaged, with this store's copies");
  assert.equal(healed.blocksRepaired, 1);
  const done = await d.logLine((o) => o.msg === 'job done' || o.msg === 'job failed');
  assert.equal(done.msg, 'job done', d.stderr());
  const verify = await cli(b, 'verify');
  assert.equal(verify.code, 0, verify.stdout);
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);
});

test('a scheduled verify the daemon\'s stop cut short resumes after the last snapshot it finished', async (t) => {
  const work = tempDir(t, 'tandem-daemon-verify-resume-');
  const a = await initHome(t, 'onprem');
  for (const v of ['v1', 'v2', 'v3']) {
    writeFileSync(join(work, `${v}.img`), randomBytes(4 * MiB));
    assert.equal((await cli(a, 'volume', 'add', v, '--path', join(work, `${v}.img`))).code, 0);
    assert.equal((await cli(a, 'snapshot', v)).code, 0);
  }
  // Three snapshots of 8 blocks each, read at 2 MiB/s: ~2 s each.
  writeFileSync(join(a.dir, 'config.yaml'), 'appliance: { name: onprem }\nverify: { every: 1s, bwlimit: 2MiB }\n');
  const d1 = await startDaemon(t, a);
  await d1.logLine((o) => o.msg === 'scheduled verify started');
  // Stopped once the first snapshot is done (its 8 blocks read and a 9th, of the second).
  for (let i = 0; i < 600; i++) {
    const s = JSON.parse((await get(a, d1.url, '/v1/status', a.token)).body);
    if ((s.verify.running?.blocksDone ?? 0) >= 9) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  d1.child.kill('SIGTERM');
  assert.equal((await d1.exited)[0], 0, d1.stderr());
  const stopped = await d1.logLine((o) => o.msg === 'scheduled verify stopped with the daemon; the next start resumes it');
  assert.ok((stopped.snapshotsDone as number) >= 1);

  const d2 = await startDaemon(t, a);
  const resumed = await d2.logLine((o) => o.msg === 'scheduled verify resumed where the daemon stopped it');
  assert.equal(resumed.snapshotsDone, stopped.snapshotsDone);
  const passed = await d2.logLine((o) => o.msg === 'scheduled verify passed');
  assert.equal(passed.snapshots, 3);
  assert.equal(passed.blocks, 24);
  assert.equal(passed.resumedAfter, resumed.after);
  // What the first daemon verified was not read again.
  assert.equal(passed.bytesThisProcess, (24 - 8 * (stopped.snapshotsDone as number)) * 512 * 1024);
  d2.child.kill('SIGTERM');
  assert.equal((await d2.exited)[0], 0);
});

/** How many scheduled verifies the daemon has started so far (from its log). */
function seenStarts(d: Daemon): number {
  return d.stderr().split('\n').filter((l) => l.includes('"msg":"scheduled verify started"')).length;
}

test("daemon watches the appliance itself: a low store disk calls the webhook once (disk_low), shows in /metrics, status and doctor", async (t) => {
  const mnt = smallTmpfs(t, '64m');
  if (!mnt) return;
  const dir = join(mnt, 'home');
  const init = await cli(dir, 'init', '--name', 'small');
  assert.equal(init.code, 0, init.stderr);
  const home: TestHome = { dir, name: 'small', token: init.json.token, fingerprint: init.json.fingerprint };
  const hooks: Array<{ event: string; appliance: string; health: { diskLow: boolean; storeFreeBytes: number } }> = [];
  const { url: hookUrl, first } = await webhook<(typeof hooks)[number]>(t, 'disk_low');
  writeFileSync(join(dir, 'config.yaml'), `appliance: { name: small }\nalerts: { webhook: "${hookUrl}" }\n`);
  const d = await startDaemon(t, home);
  const alert = await first;
  assert.deepEqual([alert.event, alert.appliance, alert.health.diskLow], ['disk_low', 'small', true]);
  assert.ok(alert.health.storeFreeBytes < 64 * MiB);
  await d.logLine((o) => o.msg === 'appliance alert sent' && o.event === 'disk_low');

  const metrics = (await get(home, d.url, '/metrics', home.token)).body;
  const free = Number(/^tandem_store_free_bytes (\S+)$/m.exec(metrics)?.[1]);
  assert.ok(free > 0 && free < 64 * MiB, metrics);
  const certEnd = Number(/^tandem_certificate_expiry_timestamp_seconds (\S+)$/m.exec(metrics)?.[1]);
  assert.ok(certEnd > Date.now() / 1000 + 9 * 365 * 86400, 'ten years ahead');
  const status = JSON.parse((await get(home, d.url, '/v1/status', home.token)).body);
  assert.equal(status.health.diskLow, true);
  const text = await cliText(['--home', dir, 'status']);
  assert.match(text.stdout, /the store's disk is low: .* free of .*appliance doctor/);
  const doctor = await cli(home, 'doctor');
  assert.equal(doctor.code, 1);
  assert.equal(doctor.json.checks.find((c: { check: string }) => c.check === 'store disk').status, 'fail');
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);
});

test("daemon follows its peer's certificate rotation: a staged certificate is learned and acknowledged at start, no pin set by hand", async (t) => {
  const { a, b } = await pairedWithVolume(t, 16);
  const staged = await cli(b, 'tls', 'rotate');
  assert.equal(staged.code, 0, staged.stderr);
  const d = await startDaemon(t, a);
  const logged = await d.logLine((o) => o.msg === 'peer certificate pins changed');
  assert.deepEqual([logged.peer, logged.certificate, logged.nextFingerprint], ['cloud', 'learned', staged.json.fingerprint]);
  const pins = (await cli(a, 'peer', 'list')).json.peers[0];
  assert.deepEqual([pins.fingerprint, pins.nextFingerprint], [b.fingerprint, staged.json.fingerprint]);
  // The acknowledgement follows the record's update: wait for it (bounded).
  let takenBy: Array<{ name: string }> = [];
  for (let i = 0; i < 50 && takenBy.length === 0; i++) {
    if (i > 0) await sleep(100);
    takenBy = (await cli(b, 'tls', 'show')).json.staged.takenBy;
  }
  assert.deepEqual(takenBy.map((p) => p.name), ['onprem']);
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0, d.stderr());
});

test('a daemon started with a volume paused runs no job for it; `appliance resume`, forwarded to it, runs the overdue job at once (not at the next rescan)', async (t) => {
  const a = await initHome(t, 'onprem');
  const work = tempDir(t, 'tandem-pause-');
  const img = join(work, 'web.img');
  writeRandom(img, MiB);
  assert.equal((await cli(a, 'volume', 'add', 'web', '--path', img)).code, 0);
  writeFileSync(join(a.dir, 'config.yaml'), 'appliance: { name: onprem }\npolicies:\n  silver: { rpo: 2h }\nassign:\n  - match: "*"\n    policy: silver\n');
  const paused = await cli(a, 'pause', 'web', '--reason', 'disk swap');
  assert.equal(paused.code, 0, paused.stderr);
  const d = await startDaemon(t, a);
  // Its first round has run once the status says the volume is paused and no job started.
  const status = JSON.parse((await get(a, d.url, '/v1/status', a.token)).body);
  assert.equal(status.volumes[0].paused.reason, 'disk swap');
  await sleep(1500);
  assert.ok(!d.stderr().includes('job started'), d.stderr());
  const metrics = (await get(a, d.url, '/metrics', a.token)).body;
  assert.match(metrics, /tandem_replication_paused\{volume="web",policy="silver"\} 1/);
  const asked = Date.now();
  const resumed = await cli(a, 'resume', 'web'); // forwarded to the daemon
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.equal(resumed.json.resumed[0].paused.by, userInfo().username);
  const done = await d.logLine((o) => o.unit === 'volume:web' && (o.msg === 'job done' || o.msg === 'job failed'));
  assert.equal(done.msg, 'job done', d.stderr());
  assert.ok((done.time as number) - asked < 30_000, 'run on the resume, not at the next rescan (60 s)');
  assert.equal((await cli(a, 'snapshots', 'web')).json.length, 1);
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);
});

test('kill -HUP re-reads config.yaml at once (a volume given a policy gets its job now, not at the next rescan); an invalid config is logged and kept running; serve ignores SIGHUP', async (t) => {
  const a = await initHome(t, 'onprem');
  const work = tempDir(t, 'tandem-hup-');
  const img = join(work, 'web.img');
  writeRandom(img, MiB);
  assert.equal((await cli(a, 'volume', 'add', 'web', '--path', img)).code, 0);
  const d = await startDaemon(t, a);
  await sleep(1000); // its first round: no policy, no job
  assert.ok(!d.stderr().includes('job started'), d.stderr());

  writeFileSync(join(a.dir, 'config.yaml'), 'appliance: { name: onprem }\npolicies:\n  silver: { rpo: 2h }\nassign:\n  - match: "*"\n    policy: silver\n');
  const asked = Date.now();
  d.child.kill('SIGHUP');
  await d.logLine((o) => o.msg === 'config.yaml re-read');
  const done = await d.logLine((o) => o.unit === 'volume:web' && (o.msg === 'job done' || o.msg === 'job failed'));
  assert.equal(done.msg, 'job done', d.stderr());
  assert.ok((done.time as number) - asked < 30_000, 'run on the SIGHUP, not at the next rescan (60 s)');

  writeFileSync(join(a.dir, 'config.yaml'), 'policies: [not, a, map]\n');
  d.child.kill('SIGHUP');
  const bad = await d.logLine((o) => o.msg === 'config.yaml is invalid: keeping the last valid configuration');
  assert.equal((bad.err as { code: string }).code, 'ERR_CONFIG_INVALID');
  const status = JSON.parse((await get(a, d.url, '/v1/status', a.token)).body);
  assert.equal(status.volumes[0].policy, 'silver', 'the last valid configuration is kept');
  d.child.kill('SIGTERM');
  assert.equal((await d.exited)[0], 0);

  const s = await startServe(t, a);
  s.child.kill('SIGHUP');
  await sleep(500);
  assert.equal(s.child.exitCode, null, 'serve is still running');
  assert.equal((await cli(a, 'volume', 'list')).code, 0, 'and answers (the command is forwarded to it)');
  assert.equal(await s.stop(), 0);
});
