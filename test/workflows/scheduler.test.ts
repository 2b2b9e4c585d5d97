import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync, existsSync, openSync, writeSync, closeSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Home } from '../../appliance/home.js';
import { addVolume } from '../../appliance/ops.js';
import { loadConfig, type Config } from '../../appliance/config/index.js';
import { FakeClock, Scheduler, applianceSteps, HOLD_PROBE_MS, expectedDurationMs, nextStart, readRates, readVolumeState, listCheckpoints, updateVolumeState, type Log } from '../../appliance/scheduler/index.js';
import { computeStatus, BreachNotifier } from '../../appliance/status.js';
import { createMetrics } from '../../appliance/metrics.js';
import { cli, initHome, pair, startServe, tempDir } from '../helpers/appliance.js';
import { createServer } from 'node:http';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';

const MiB = 1024 * 1024;
const H = 3_600_000;
/** Now, so snapshot times (wall clock) and the fake clock agree for retention. */
const START = Date.now();

const quietLog = (lines: string[]): Log => ({
  info: (o, m) => void lines.push(`info ${m} ${JSON.stringify(o)}`),
  warn: (o, m) => void lines.push(`warn ${m} ${JSON.stringify(o)}`),
  error: (o, m) => void lines.push(`error ${m} ${JSON.stringify(o)}`),
});

async function setup(t: { after(fn: () => unknown): void }, configTail: string) {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-sched-'));
  const home = await Home.init(join(dir, 'home'), 'onprem');
  writeFileSync(home.paths.config, `appliance:\n  name: onprem\n${configTail}`);
  const store = await home.openStore();
  t.after(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { dir, home, store };
}

function image(dir: string, name: string, size: number): string {
  const p = join(dir, name);
  writeRandom(p, size);
  return p;
}

/**
 * Group g of one 1 MiB volume v under a 1 h RPO, whose pre hook writes \$ENV/pre (ENV: the
 * temp dir, in the environment variable `env`) and then runs `then`.
 */
async function groupWithPreHook(t: { after(fn: () => unknown): void }, env: string, then: string) {
  const made = await setup(t, `policies:
  p: { rpo: 1h }
groups:
  g:
    volumes: [v]
    hooks: { pre: "echo started > ${'$'}{${env}}/pre; ${then}", post: "true", timeout: 60s }
assign:
  - match: "*"
    policy: p
`);
  process.env[env] = made.dir;
  t.after(() => { delete process.env[env]; });
  await addVolume(made.store, { name: 'v', path: image(made.dir, 'v.img', MiB) });
  return made;
}

/** A webhook on loopback that keeps every alert POSTed to it (closed after the test). */
async function webhookSink<T>(t: { after(fn: () => unknown): void }): Promise<{ hooks: T[]; url: string }> {
  const hooks: T[] = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => { hooks.push(JSON.parse(body) as T); res.end(); });
  }).listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  return { hooks, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook` };
}

/**
 * A scheduler on a fake clock at START with the appliance's real job steps. `ends` gets
 * `UNIT:true|false|held` per job; `idle()` waits until it sleeps with no job running and returns
 * its wake time.
 */
function onFakeClock(home: Home, store: Awaited<ReturnType<Home['openStore']>>) {
  const clock = new FakeClock(START);
  let config: Config | null = null;
  const lines: string[] = [];
  const ends: string[] = [];
  const sched = new Scheduler({
    store, clock, log: quietLog(lines), steps: applianceSteps(home, store, () => config),
    loadConfig: async () => (config = await loadConfig(home)), rescanMs: 24 * H,
    onJobEnd: (unit, o) => void ends.push(`${unit}:${o.held ? 'held' : o.ok}`),
  });
  const idle = async (): Promise<number> => {
    for (let i = 0; i < 20; i++) {
      const until = await clock.nextSleep();
      if (sched.runningUnits().length === 0) return until;
    }
    throw new Error(`scheduler never went idle: ${lines.join('\n')}`);
  };
  return { clock, lines, ends, sched, idle, config: () => config };
}

test('scheduler with a fake clock: snapshots at once, then before each RPO deadline, and applies retention', async (t) => {
  const { dir, home, store } = await setup(t, `policies:
  hourly:
    rpo: 1h
    retention: { last: 2 }
assign:
  - match: "db-*"
    policy: hourly
`);
  await addVolume(store, { name: 'db-a', path: image(dir, 'a.img', 2 * MiB) });
  await addVolume(store, { name: 'scratch', path: image(dir, 's.img', MiB) }); // no policy: never scheduled
  const { clock, lines, ends, sched, idle, config: current } = onFakeClock(home, store);
  const config = () => current()!;
  const first = idle();
  sched.start();
  let wake = await first;
  assert.deepEqual(ends, ['volume:db-a:true'], lines.join('\n'));
  assert.equal((await store.listSnapshots('db-a')).length, 1);
  assert.equal((await store.listSnapshots('scratch')).length, 0);
  let st = await readVolumeState(store, 'db-a');
  assert.equal(st.lastGood, new Date(START).toISOString());
  const rates = await readRates(store, 'db-a');
  assert.equal(rates.samples, 1, 'the scan rate was measured');
  const expected = expectedDurationMs(rates, 2 * MiB, false);
  assert.equal(wake, nextStart(START, H, expected, START), 'sleeps until lastGood + RPO - expected duration');
  assert.ok(wake < START + H && wake > START + H / 2);

  for (let round = 2; round <= 4; round++) {
    const next = idle();
    clock.advanceTo(wake);
    const at = clock.now();
    wake = await next;
    st = await readVolumeState(store, 'db-a');
    assert.equal(st.lastGood, new Date(at).toISOString(), `round ${round}`);
    assert.ok(wake <= at + H);
  }
  assert.equal(ends.length, 4);
  const left = await store.listSnapshots('db-a');
  assert.equal(left.length, 2, 'retention last: 2');
  assert.equal(left[1]!.id, st.lastSnapshot, 'the newest is kept');
  // Status on the same clock: the point is fresh.
  const [s] = await computeStatus(store, config(), clock.now(), 'db-a');
  assert.equal(s!.rpoState, 'OK');
  assert.equal(s!.policy, 'hourly');
  await sched.stop(1000);
});

test('a recovery point dated in the future (the clock was set back since) does not put the next job off: it runs at once, and until then status counts the RPO as breached and says why', async (t) => {
  const { dir, home, store } = await setup(t, `policies:
  hourly:
    rpo: 1h
assign:
  - match: "db-*"
    policy: hourly
`);
  await addVolume(store, { name: 'db-a', path: image(dir, 'a.img', MiB) });
  // Taken while the clock ran 2 h ahead, then set right.
  const ahead = new Date(START + 2 * H).toISOString();
  await updateVolumeState(store, 'db-a', { lastGood: ahead });
  const { ends, sched, idle, lines } = onFakeClock(home, store);
  const [before] = await computeStatus(store, await loadConfig(home), START, 'db-a');
  assert.equal(before!.rpoState, 'BREACHED');
  assert.equal(before!.rpoAgeMs, null, 'its age is unknown');
  assert.equal(before!.pointAhead, ahead);
  const first = idle();
  sched.start();
  await first;
  assert.deepEqual(ends, ['volume:db-a:true'], `the job ran at once: ${lines.join('\n')}`);
  assert.equal((await readVolumeState(store, 'db-a')).lastGood, new Date(START).toISOString());
  const [after] = await computeStatus(store, await loadConfig(home), START, 'db-a');
  assert.equal(after!.rpoState, 'OK');
  assert.equal(after!.pointAhead, undefined);
  await sched.stop(1000);
});

test('updates of a volume\'s state at once (a job ending while `appliance pause` runs in the same daemon) each apply to the record as the other left it: none is lost', async (t) => {
  const { dir, store } = await setup(t, '');
  await addVolume(store, { name: 'v', path: image(dir, 'v.img', MiB) });
  const paused = { by: 'ops', at: new Date(START).toISOString(), until: null, reason: 'maintenance' };
  await Promise.all([
    updateVolumeState(store, 'v', { lastJob: { id: 'j1', ended: new Date(START).toISOString(), ok: true } }),
    updateVolumeState(store, 'v', { paused }),
    updateVolumeState(store, 'v', { lastGood: new Date(START).toISOString(), lastSnapshot: 's1' }),
    updateVolumeState(store, 'v', (st) => (st.paused ? null : { held: null })),
  ]);
  const st = await readVolumeState(store, 'v');
  assert.deepEqual(st.paused, paused, 'the pause was kept');
  assert.equal(st.lastJob?.id, 'j1');
  assert.equal(st.lastSnapshot, 's1');
});

test('a failing group pre hook aborts the job cleanly: no snapshot, post hook ran, error recorded', async (t) => {
  const { dir, home, store } = await setup(t, `policies:
  p: { rpo: 1h }
groups:
  erp:
    volumes: [db-root, db-data]
    hooks: { pre: "echo freeze failed >&2; exit 4", post: "touch ${'$'}{HOOKDIR}/thawed", timeout: 5s }
assign:
  - match: "db-*"
    policy: p
`);
  process.env.HOOKDIR = dir;
  t.after(() => { delete process.env.HOOKDIR; });
  await addVolume(store, { name: 'db-root', path: image(dir, 'r.img', MiB) });
  await addVolume(store, { name: 'db-data', path: image(dir, 'd.img', MiB) });
  const clock = new FakeClock(START);
  let config: Config | null = null;
  const ends: Array<{ unit: string; ok: boolean; error?: unknown }> = [];
  let sched: Scheduler | undefined;
  const jobEnded = new Promise<void>((resolve) => {
    sched = new Scheduler({
      store, clock, log: quietLog([]), steps: applianceSteps(home, store, () => config),
      loadConfig: async () => (config = await loadConfig(home)),
      onJobEnd: (unit, o) => { ends.push({ unit, ...o }); resolve(); },
    });
    sched.start();
  });
  await jobEnded;
  await sched!.stop(1000);
  assert.equal(ends[0]!.unit, 'group:erp');
  assert.equal(ends[0]!.ok, false);
  assert.equal((ends[0]!.error as { code?: string }).code, 'ERR_HOOK_FAILED');
  assert.ok(existsSync(join(dir, 'thawed')), 'post hook ran');
  assert.equal((await store.listSnapshots('db-root')).length, 0);
  assert.equal((await store.listSnapshots('db-data')).length, 0);
  const st = await readVolumeState(store, 'db-root');
  assert.equal(st.lastJob?.ok, false);
  assert.equal(st.lastJob?.error?.code, 'ERR_HOOK_FAILED');
  assert.match(st.lastJob!.error!.message, /freeze failed/);
  assert.equal(st.lastGood, null);
  assert.deepEqual(await listCheckpoints(store), [], 'a failed job leaves no checkpoint');
});

test('receiving side: each new replica is exported to EBS (incrementally) when the policy says so, then retention', async (t) => {
  const { emulator, makeImage } = await import('../ebs/helpers.js');
  const { openVolumeReader } = await import('../../appliance/volumes/index.js');
  const before = { ...process.env };
  const emu = await emulator(); // points this process's AWS SDK environment at the emulator
  process.env.AWS_ENDPOINT_URL_EC2 = emu.url; // retention deletes exports with EC2 DeleteSnapshot
  t.after(async () => {
    await emu.close();
    for (const k of Object.keys(process.env)) if (!(k in before)) delete process.env[k];
  });
  const { dir, home, store } = await setup(t, `policies:
  gold: { rpo: 15m, retention: { last: 1 }, export: ebs }
assign:
  - match: "*"
    policy: gold
`);
  const BS = 524288;
  const img = join(dir, 'db.img');
  const replica = async (seed: number) => {
    writeFileSync(img, makeImage(8, { seed, zeroEvery: 4 }));
    const reader = await openVolumeReader(img);
    try {
      return await store.scanVolume(reader, { volume: 'db', blockSize: BS, parent: await store.latestSnapshot('db'), origin: 'peer:onprem' });
    } finally {
      await reader.close();
    }
  };
  const first = await replica(1);
  assert.equal((await store.getVolume('db'))!.path, undefined, 'a replica: no local path');
  const clock = new FakeClock(START);
  let config: Config | null = null;
  const lines: string[] = [];
  const sched = new Scheduler({
    store, clock, log: quietLog(lines), steps: applianceSteps(home, store, () => config),
    loadConfig: async () => (config = await loadConfig(home)), rescanMs: 60_000,
  });
  const idle = async (): Promise<number> => {
    for (let i = 0; i < 20; i++) {
      const until = await clock.nextSleep();
      if (sched.runningUnits().length === 0) return until;
    }
    throw new Error(`scheduler never went idle: ${lines.join('\n')}`);
  };
  const p1 = idle();
  sched.start();
  const wake = await p1;
  let st = await readVolumeState(store, 'db');
  assert.equal(st.lastExported, first.id, lines.join('\n'));
  assert.equal(st.lastGood, first.created, 'the replica point is when it was taken');
  const second = await replica(2);
  const p2 = idle();
  clock.advanceTo(wake);
  await p2;
  st = await readVolumeState(store, 'db');
  assert.equal(st.lastExported, second.id, lines.join('\n'));
  const exports = (await store.getMeta<Array<{ ebsSnapshotId: string; tandemSnapshot: string; parentEbsSnapshotId: string | null }>>('ebs-exports', 'db'))!;
  assert.deepEqual(exports.map((e) => e.tandemSnapshot), [second.id], 'retention last: 1 applies to the exports too');
  const firstExport = exports[0]!.parentEbsSnapshotId;
  assert.ok(firstExport, 'incremental: the second export has the first as parent');
  const ebsState = await (await fetch(`${emu.url}/_emulator/state`)).json() as { snapshots: Array<{ id: string }> };
  assert.ok(!ebsState.snapshots.some((x) => x.id === firstExport), 'the first export is deleted in EBS');
  assert.ok(ebsState.snapshots.some((x) => x.id === exports[0]!.ebsSnapshotId));
  assert.deepEqual((await store.listSnapshots('db')).map((s) => s.id), [second.id], 'retention last: 1 after the export');
  const rates = await readRates(store, 'db');
  assert.ok((rates.exportBytesPerSec ?? 0) > 0, 'export rate measured');
  // Paused here too (`appliance pause` on the cloud appliance): a new replica waits for the resume.
  const { pauseVolumes, resumeVolumes } = await import('../../appliance/pause.js');
  await pauseVolumes(store, ['db'], { by: 'ops', now: clock.now() });
  const third = await replica(3);
  let p3 = idle();
  clock.advanceTo(clock.now() + 5 * 60_000);
  await p3;
  assert.equal((await readVolumeState(store, 'db')).lastExported, second.id, 'not exported while paused');
  p3 = idle();
  await resumeVolumes(store, ['db'], { now: clock.now() });
  await p3;
  assert.equal((await readVolumeState(store, 'db')).lastExported, third.id, lines.join('\n'));
  await sched.stop(1000);
});

test('stop() with a job blocked in its pre hook: bounded wait, hook killed, checkpoint kept for the next start', async (t) => {
  const { dir, home, store } = await groupWithPreHook(t, 'HOOKDIR2', 'sleep 30');
  const clock = new FakeClock(START);
  let config: Config | null = null;
  const lines: string[] = [];
  const ended = new Promise<{ ok: boolean }>((resolve) => {
    const sched = new Scheduler({
      store, clock, log: quietLog(lines), steps: applianceSteps(home, store, () => config),
      loadConfig: async () => (config = await loadConfig(home)),
      onJobEnd: (_u, o) => resolve(o),
    });
    sched.start();
    // Stop once the job is inside its hook (the first sleep starts after the launch).
    void clock.nextSleep().then(async () => {
      const t0 = Date.now();
      await sched.stop(200);
      lines.push(`stopped after ${Date.now() - t0} ms`);
    });
  });
  const o = await ended;
  assert.equal(o.ok, false);
  const cps = await listCheckpoints(store);
  assert.equal(cps.length, 1, lines.join('\n'));
  assert.equal(cps[0]!.unit, 'group:g');
  assert.equal(cps[0]!.step, 'snapshot');
  assert.equal((await store.listSnapshots('v')).length, 0);
  assert.ok(lines.some((l) => l.includes('job interrupted; checkpoint kept')), lines.join('\n'));
});

test('a peer that refuses pushes holds the volume: no snapshot or push until it takes them again (asked every minute); status, metrics and an alert say why', async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  // Another site pushed a volume of the same name first: the cloud refuses ours (ERR_VOLUME_NAME_TAKEN).
  const dir = tempDir(t, 'tandem-held-');
  const site2 = await initHome(t, 'site2');
  await pair(site2, 'cloud', b, sb);
  assert.equal((await cli(site2, 'volume', 'add', 'db', '--path', image(dir, 'site2.img', MiB))).code, 0);
  assert.equal((await cli(site2, 'sync', 'db', '--peer', 'cloud')).code, 0);

  const a = await initHome(t, 'onprem');
  await pair(a, 'cloud', b, sb);
  assert.equal((await cli(a, 'volume', 'add', 'db', '--path', image(dir, 'db.img', 2 * MiB))).code, 0);
  const home = Home.load(a.dir);
  writeFileSync(home.paths.config, 'appliance:\n  name: onprem\npolicies:\n  p: { rpo: 1h }\nassign:\n  - match: "*"\n    policy: p\nreplication: { peer: cloud }\n');
  const store = await home.openStore();
  t.after(() => store.close());

  const { hooks, url: hookUrl } = await webhookSink<{ event: string; status: { replicationHeld: { code: string } | null } }>(t);
  const notifier = new BreachNotifier('onprem');

  const { clock, lines, ends, sched, idle, config: current } = onFakeClock(home, store);
  const config = () => current()!;
  t.after(() => sched.stop(1000));

  // 1. The job snapshots, the push is refused: held, no backoff, next check a minute later.
  const first = idle();
  sched.start();
  let wake = await first;
  assert.deepEqual(ends, ['volume:db:false'], lines.join('\n'));
  let st = await readVolumeState(store, 'db');
  assert.equal(st.held?.code, 'ERR_VOLUME_NAME_TAKEN', lines.join('\n'));
  assert.equal(st.held?.peer, 'cloud');
  assert.equal(st.held?.since, new Date(START).toISOString());
  assert.equal(st.lastJob?.error?.code, 'ERR_VOLUME_NAME_TAKEN');
  assert.equal(wake, START + HOLD_PROBE_MS, 'asked again after a minute, not after the failure backoff');
  assert.ok(lines.some((l) => l.startsWith('warn replication held')), lines.join('\n'));
  assert.equal((await store.listSnapshots('db')).length, 1);
  let [s] = await computeStatus(store, config(), clock.now(), 'db');
  assert.equal(s!.replicationHeld?.code, 'ERR_VOLUME_NAME_TAKEN');
  const sent = await notifier.check([s!], hookUrl, clock.now());
  assert.deepEqual(sent.errors, []);
  assert.deepEqual(hooks.map((h) => h.event).sort(), ['replication_held', 'rpo_breached']);
  assert.equal(hooks.find((h) => h.event === 'replication_held')!.status.replicationHeld?.code, 'ERR_VOLUME_NAME_TAKEN');
  const m = createMetrics(async () => [s!], () => []);
  assert.match((await m.render()).body, /tandem_replication_held\{volume="db",policy="p"\} 1/);

  // 2. Still refused: the check is all that happens (no snapshot, no rescan of the volume).
  for (let round = 1; round <= 3; round++) {
    const next = idle();
    clock.advanceTo(wake);
    const at = clock.now();
    wake = await next;
    assert.equal(ends.at(-1), 'volume:db:held', lines.join('\n'));
    assert.equal(wake, at + HOLD_PROBE_MS);
    st = await readVolumeState(store, 'db');
    assert.equal(st.held?.checkedAt, new Date(at).toISOString());
    assert.equal(st.held?.since, new Date(START).toISOString());
  }
  assert.equal((await store.listSnapshots('db')).length, 1, 'no snapshot while held');
  assert.deepEqual((await notifier.check(await computeStatus(store, config(), clock.now(), 'db'), hookUrl, clock.now())).sent, [], 'one alert per hold');

  // 3. The cloud forgets the other site's volume: the next check finds pushes taken, the job runs.
  assert.equal((await cli(b, 'volume', 'remove', 'db')).code, 0);
  const next = idle();
  clock.advanceTo(wake);
  wake = await next;
  assert.equal(ends.at(-1), 'volume:db:true', lines.join('\n'));
  assert.ok(lines.some((l) => l.startsWith('info the peer takes pushes of the volume again')), lines.join('\n'));
  st = await readVolumeState(store, 'db');
  assert.equal(st.held, null);
  const snaps = await store.listSnapshots('db');
  assert.equal(snaps.length, 2);
  assert.equal(st.lastReplicated, snaps[1]!.id);
  const onCloud = await cli(b, 'snapshots', 'db');
  assert.equal(onCloud.json.at(-1).root, snaps[1]!.root, 'the cloud holds our snapshot now');
  assert.ok(wake > clock.now() + HOLD_PROBE_MS, 'back on the RPO schedule');
  [s] = await computeStatus(store, config(), clock.now(), 'db');
  assert.equal(s!.replicationHeld, null);
  assert.equal(s!.rpoState, 'OK');
});

test('a paused volume gets no scheduled job: a running one stops (checkpoint kept), a pause with an end lifts itself and the job goes on from its checkpoint, a resume runs an overdue job at once', async (t) => {
  // The hook blocks the first job only.
  const { dir, home, store } = await groupWithPreHook(t, 'PAUSEDIR', `if [ ! -f ${'$'}{PAUSEDIR}/once ]; then touch ${'$'}{PAUSEDIR}/once; sleep 30; fi`);
  const { clock, lines, ends, sched, idle, config } = onFakeClock(home, store);
  t.after(() => sched.stop(1000));
  const { pauseVolumes, resumeVolumes } = await import('../../appliance/pause.js');

  // 1. The first job blocks in its pre hook; pausing the volume stops it, its checkpoint kept.
  sched.start();
  for (let i = 0; !existsSync(join(dir, 'pre')); i++) {
    assert.ok(i < 400, `the job never reached its hook: ${lines.join('\n')}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const pausedAt = clock.now();
  const stopped = idle();
  await pauseVolumes(store, ['v'], { by: 'alice', now: pausedAt, forMs: 2 * H, reason: 'disk swap' });
  let wake = await stopped;
  assert.deepEqual(ends, ['group:g:false'], lines.join('\n'));
  assert.ok(lines.some((l) => l.includes('the volume was paused: stopping its running job')), lines.join('\n'));
  assert.ok(!lines.some((l) => l.includes('job interrupted')), 'not reported as an interruption');
  assert.equal((await listCheckpoints(store)).length, 1, 'checkpoint kept');
  assert.equal((await store.listSnapshots('v')).length, 0);
  assert.equal(wake, pausedAt + 2 * H, 'the next look is when the pause ends, not before the RPO');
  const [s] = await computeStatus(store, config()!, clock.now(), 'v');
  assert.deepEqual(s!.paused, { by: 'alice', at: new Date(pausedAt).toISOString(), until: new Date(pausedAt + 2 * H).toISOString(), reason: 'disk swap' });
  assert.match((await createMetrics(async () => [s!], () => []).render()).body, /tandem_replication_paused\{volume="v",policy="p"\} 1/);
  // The webhook is told once per pause: who, until when, why.
  const { hooks, url: hookUrl } = await webhookSink<{ event: string; volume: string; status: { paused: { by: string; reason: string } } }>(t);
  const notifier = new BreachNotifier('onprem');
  assert.deepEqual((await notifier.check([s!], hookUrl, clock.now())).errors, []);
  assert.deepEqual((await notifier.check([s!], hookUrl, clock.now())).sent, [], 'once per pause');
  const paused = hooks.filter((h) => h.event === 'replication_paused');
  assert.deepEqual(paused.map((h) => [h.volume, h.status.paused.by, h.status.paused.reason]), [['v', 'alice', 'disk swap']]);

  // 2. The pause ends by itself: the job goes on from its checkpoint and snapshots.
  let next = idle();
  clock.advanceTo(wake);
  wake = await next;
  assert.deepEqual(ends, ['group:g:false', 'group:g:true'], lines.join('\n'));
  assert.ok(lines.some((l) => l.includes('pause ended')) && lines.some((l) => l.includes('resuming a job a pause stopped')), lines.join('\n'));
  assert.equal((await store.listSnapshots('v')).length, 1);
  assert.equal((await readVolumeState(store, 'v')).paused, null);
  assert.equal((await listCheckpoints(store)).length, 0);

  // 3. Paused until resumed: three hours pass (the RPO is 1 h) without a job.
  await pauseVolumes(store, ['v'], { by: 'bob', now: clock.now() });
  next = idle();
  clock.advanceTo(clock.now() + 3 * H);
  await next;
  assert.equal(ends.length, 2, lines.join('\n'));
  assert.equal((await store.listSnapshots('v')).length, 1);
  const [late] = await computeStatus(store, config()!, clock.now(), 'v');
  assert.deepEqual([late!.paused?.by, late!.paused?.until, late!.rpoState], ['bob', null, 'BREACHED']);
  // A resume wakes the scheduler: the overdue job runs at once.
  next = idle();
  assert.deepEqual((await resumeVolumes(store, ['v'], { now: clock.now() })).map((r) => [r.volume, r.paused.by]), [['v', 'bob']]);
  await next;
  assert.deepEqual(ends, ['group:g:false', 'group:g:true', 'group:g:true'], lines.join('\n'));
  assert.equal((await store.listSnapshots('v')).length, 2);
  await assert.rejects(pauseVolumes(store, ['v', 'nope'], { by: 'x', now: clock.now() }), { code: 'ERR_VOLUME_NOT_FOUND' });
  assert.equal((await readVolumeState(store, 'v')).paused, null, 'nothing paused by a refused call');
});

test("the daemon's push step sends a new snapshot's changed blocks as deltas of the peer's latest, asking about nothing else", async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  const a = await initHome(t, 'onprem');
  await pair(a, 'cloud', b, sb);
  const dir = tempDir(t, 'tandem-push-step-');
  const img = image(dir, 'db.img', 4 * MiB);
  assert.equal((await cli(a, 'volume', 'add', 'db', '--path', img, '--block-size', '64KiB')).code, 0);
  const home = Home.load(a.dir);
  const store = await home.openStore();
  t.after(() => store.close());
  const { snapshotVolume } = await import('../../appliance/ops.js');
  const { RemotePeer } = await import('../../api/client.js');
  const peerB = new RemotePeer({ url: sb.url, token: b.token, fingerprint: b.fingerprint, name: 'cloud' });
  t.after(() => peerB.close());
  const { pushSnapshot } = await import('../../appliance/scheduler/steps.js');

  await pushSnapshot(home, store, await snapshotVolume(home, store, 'db'), 'cloud');
  const fd = openSync(img, 'r+');
  for (const blk of [5, 33, 60]) writeSync(fd, randomBytes(4096), 0, 4096, blk * 64 * 1024 + 2048);
  closeSync(fd);
  const snap = await snapshotVolume(home, store, 'db');
  const s0 = await peerB.stats();
  const r = await pushSnapshot(home, store, snap, 'cloud');
  const s1 = await peerB.stats();
  assert.equal(s1.blocksStored - s0.blocksStored, 3, 'the 3 changed blocks');
  assert.equal(s1.deltasReceived - s0.deltasReceived, 3, 'each as a delta of the block it replaced');
  assert.equal(r.bytesSent, 3 * 64 * 1024, 'counted as the blocks built there');
  const asked = Object.fromEntries(Object.entries(s1.routes).map(([k, n]) => [k, n - (s0.routes[k] ?? 0)]).filter(([, n]) => n !== 0));
  // Nothing about the snapshot or its nodes; the blocks asked about are the 3 changed ones.
  assert.deepEqual(asked, {
    'POST /v1/volumes/:vol/lock': 1, 'POST /v1/blocks/has': 1, 'POST /v1/blocks/put': 1,
    'POST /v1/snapshots/commit': 1, // with the nodes
    // No GET /v1/damage: the lock answer said the peer's verify found nothing to heal (damaged: 0).
  });
  assert.equal((await peerB.latestSnapshot('db'))?.root, snap.root);
  const out = join(dir, 'r.img');
  assert.equal((await cli(b, 'restore', 'db', '--to', out)).code, 0);
  assert.ok(sameBytes(out, img), 'byte-exact');
});

test('a push by hand to the replication peer counts as the recovery point: the next job is due an RPO after it, not at once', async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  const lab = await initHome(t, 'lab');
  const sl = await startServe(t, lab);
  const a = await initHome(t, 'onprem');
  await pair(a, 'cloud', b, sb);
  await pair(a, 'lab', lab, sl);
  const dir = tempDir(t, 'tandem-manual-push-');
  assert.equal((await cli(a, 'volume', 'add', 'db', '--path', image(dir, 'db.img', 2 * MiB))).code, 0);
  assert.equal((await cli(a, 'volume', 'add', 'web', '--path', image(dir, 'web.img', MiB))).code, 0);
  const home = Home.load(a.dir);
  writeFileSync(home.paths.config, 'appliance:\n  name: onprem\npolicies:\n  p: { rpo: 1h }\nassign:\n  - match: "*"\n    policy: p\nreplication: { peer: cloud }\n');
  // db is pushed by hand to the replication peer; web only to the lab, which is no recovery point
  // at the DR site.
  assert.equal((await cli(a, 'sync', 'db', '--peer', 'cloud')).code, 0);
  assert.equal((await cli(a, 'sync', 'web', '--peer', 'lab')).code, 0);
  const store = await home.openStore();
  t.after(() => store.close());
  const pushed = (await store.listSnapshots('db')).at(-1)!;
  const { clock, lines, ends, sched, idle } = onFakeClock(home, store);
  t.after(() => sched.stop(1000));
  const first = idle();
  sched.start();
  let wake = await first;
  assert.deepEqual(ends, ['volume:web:true'], `web at once, db not: its point is fresh\n${lines.join('\n')}`);
  const due = nextStart(Date.parse(pushed.created), H, expectedDurationMs(await readRates(store, 'db'), 2 * MiB, true), START);
  assert.ok(due > START + H / 2);
  // db's job runs when an RPO (less its expected duration) has passed since the pushed snapshot.
  for (let i = 0; i < 5 && !ends.includes('volume:db:true'); i++) {
    assert.ok(wake <= due, `the scheduler slept past db's due time: ${wake} > ${due}`);
    const next = idle();
    clock.advanceTo(wake);
    const at = clock.now();
    wake = await next;
    if (ends.includes('volume:db:true')) assert.equal(at, due, "db's job ran at its due time");
  }
  assert.ok(ends.includes('volume:db:true'), lines.join('\n'));
  assert.equal((await readVolumeState(store, 'db')).lastReplicated, (await store.listSnapshots('db')).at(-1)!.id);
});

test("the daemon's point is what it last pushed, dated by that push: local snapshots taken while replication was off in config.yaml do not make the replica look fresh, and a job runs at once when replication is back", async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  const a = await initHome(t, 'onprem');
  await pair(a, 'cloud', b, sb);
  const dir = tempDir(t, 'tandem-repl-back-');
  assert.equal((await cli(a, 'volume', 'add', 'db', '--path', image(dir, 'db.img', MiB))).code, 0);
  const home = Home.load(a.dir);
  writeFileSync(home.paths.config, 'appliance:\n  name: onprem\npolicies:\n  p: { rpo: 1h }\nassign:\n  - match: "*"\n    policy: p\nreplication: { peer: cloud }\n');
  const store = await home.openStore();
  t.after(() => store.close());
  // Pushed 2 h ago; local snapshots since, with replication off, moved lastGood to now.
  const pushedAt = new Date(START - 2 * H).toISOString();
  await updateVolumeState(store, 'db', { lastGood: new Date(START).toISOString(), lastReplicated: '20260101T000000.000Z-000001', lastReplicatedAt: pushedAt, lastReplicatedTo: 'cloud' });
  const [s] = await computeStatus(store, await loadConfig(home), START, 'db');
  assert.equal(s!.lastReplicated?.at, pushedAt, 'dated by its push');
  assert.equal(s!.rpoState, 'BREACHED');
  const { ends, sched, idle, lines } = onFakeClock(home, store);
  t.after(() => sched.stop(1000));
  const first = idle();
  sched.start();
  await first;
  assert.deepEqual(ends, ['volume:db:true'], `the job ran at once: ${lines.join('\n')}`);
  const st = await readVolumeState(store, 'db');
  assert.equal(st.lastReplicatedAt, new Date(START).toISOString());
  assert.equal(st.lastReplicatedTo, 'cloud');
  const [after] = await computeStatus(store, await loadConfig(home), START, 'db');
  assert.equal(after!.rpoState, 'OK');
});
