import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { once } from 'node:events';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Home } from '../../appliance/home.js';
import { addVolume, removeVolume, snapshotVolume } from '../../appliance/ops.js';
import { loadConfig } from '../../appliance/config/index.js';
import { computeStatus, objectiveState, BreachNotifier, DEFAULT_LAUNCH_MS, type VolumeStatus } from '../../appliance/status.js';
import { createMetrics } from '../../appliance/metrics.js';
import { recordSyncBase, SYNC_BASE_NS, type SyncBase } from '../../appliance/sync-base.js';
import { updateVolumeState } from '../../appliance/scheduler/state.js';
import { DEFAULT_RATES, updateRates } from '../../appliance/scheduler/index.js';
import { RATES_NS } from '../../appliance/scheduler/state.js';
import { cli, pairedWithVolume, startServe } from '../helpers/appliance.js';
import { cli as cliText } from '../helpers/cli.js';
import { pinnedSnapshots } from '../../appliance/policy/apply.js';

const MIN = 60_000;
const MiB = 1024 * 1024;

/** A home named `name` with `yaml` as its config.yaml and volume `db` on a random image of `bytes`; its store open (closed, and everything removed, after the test). */
async function homeWithDb(t: { after(fn: () => Promise<void>): void }, name: string, yaml: string, bytes = MiB) {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-status-'));
  const home = await Home.init(join(dir, 'home'), name);
  writeFileSync(home.paths.config, yaml);
  const store = await home.openStore();
  t.after(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const img = join(dir, 'db.img');
  const data = randomBytes(bytes);
  writeFileSync(img, data);
  await addVolume(store, { name: 'db', path: img });
  return { dir, home, store, img, data, config: await loadConfig(home) };
}

test('objective states: OK up to 80 %, AT RISK above, BREACHED past the objective or with no point', () => {
  assert.equal(objectiveState(48 * MIN, 60 * MIN), 'OK');
  assert.equal(objectiveState(48 * MIN + 1, 60 * MIN), 'AT_RISK');
  assert.equal(objectiveState(60 * MIN, 60 * MIN), 'AT_RISK');
  assert.equal(objectiveState(60 * MIN + 1, 60 * MIN), 'BREACHED');
  assert.equal(objectiveState(null, 60 * MIN), 'BREACHED');
  assert.equal(objectiveState(5, null), 'NONE');
});

test('status per volume: RPO age and state over time, RTO estimate from measurements, last drill; metrics and breach webhook', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-status-'));
  const home = await Home.init(join(dir, 'home'), 'onprem');
  writeFileSync(home.paths.config, `appliance: { name: onprem }
policies:
  gold: { rpo: 1h, rto: 10m }
assign:
  - match: "db*"
    policy: gold
`);
  const store = await home.openStore();
  t.after(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  for (const name of ['db', 'db2', 'misc']) {
    const p = join(dir, `${name}.img`);
    writeRandom(p, MiB);
    await addVolume(store, { name, path: p });
  }
  const snap = await snapshotVolume(home, store, 'db');
  await snapshotVolume(home, store, 'misc');
  const config = await loadConfig(home);
  const t0 = Date.parse(snap.created);
  const at = async (ms: number) => new Map((await computeStatus(store, config, t0 + ms)).map((s) => [s.volume, s]));

  let s = await at(10 * MIN);
  assert.equal(s.get('db')!.rpoState, 'OK');
  assert.equal(s.get('db')!.rpoAgeMs, 10 * MIN);
  assert.equal(s.get('db')!.lastSnapshot!.id, snap.id);
  assert.equal(s.get('db2')!.rpoState, 'BREACHED', 'protected by a policy but never snapshotted');
  assert.equal(s.get('db2')!.rpoAgeMs, null);
  assert.equal(s.get('misc')!.rpoState, 'NONE');
  assert.equal(s.get('misc')!.policy, null);
  assert.equal((await at(50 * MIN)).get('db')!.rpoState, 'AT_RISK');
  assert.equal((await at(61 * MIN)).get('db')!.rpoState, 'BREACHED');

  // RTO: default launch time + export of the 1 MiB of data (never exported): well within 10 m.
  const db = s.get('db')!;
  assert.ok(db.rtoEstimateMs! > DEFAULT_LAUNCH_MS && db.rtoEstimateMs! < DEFAULT_LAUNCH_MS + 1000, String(db.rtoEstimateMs));
  assert.equal(db.rtoState, 'OK');
  assert.match(db.rtoBasis, /default until a drill measures it/);
  assert.equal(db.lastDrill, null);
  // A drill measured 9.5 minutes: AT RISK; the drill is reported.
  await store.putMeta('rto', 'db', { mode: 'drill', run: 'drill-1', at: new Date(t0).toISOString(), rtoSeconds: 570, launchSeconds: 500 });
  await store.putMeta('drills', 'drill-1', { id: 'drill-1', at: new Date(t0).toISOString(), volumes: ['db'], passed: true, rtoSeconds: 570 });
  await store.putMeta('ebs-exports', 'db', [{ ebsSnapshotId: 'snap-0abc', tandemSnapshot: snap.id, created: new Date(t0).toISOString(), parentEbsSnapshotId: null, size: MiB, volumeSizeGiB: 1 }]);
  s = await at(10 * MIN);
  assert.equal(s.get('db')!.rtoEstimateMs, 570_000, 'newest point already exported: launch only');
  assert.equal(s.get('db')!.rtoState, 'AT_RISK');
  assert.deepEqual(s.get('db')!.lastDrill, { id: 'drill-1', at: new Date(t0).toISOString(), passed: true, rtoSeconds: 570 });
  assert.equal(s.get('db')!.lastExport!.ebsSnapshotId, 'snap-0abc');

  // A push of db to the peer that started and has not finished (appliance/push-attempts.ts).
  assert.deepEqual(s.get('db')!.pushesUnfinished, []);
  await store.putMeta('push-attempt', 'db@cloud', { snapshot: snap.id, root: snap.root, at: new Date(t0 + 5 * MIN).toISOString() });
  s = await at(10 * MIN);
  assert.deepEqual(s.get('db')!.pushesUnfinished, [{ peer: 'cloud', snapshot: snap.id, since: new Date(t0 + 5 * MIN).toISOString(), running: null }], 'no locks directory given: running or not, unknown');
  assert.deepEqual(s.get('db2')!.pushesUnfinished, [], 'another volume whose name starts the same is not concerned');
  // With the home's locks: running while a live process holds the volume for a sync, else stopped midway.
  const running = async () => (await computeStatus(store, config, t0 + 10 * MIN, 'db', home.paths.locks))[0]!.pushesUnfinished[0]!.running;
  assert.equal(await running(), false, 'nobody holds the volume: the push stopped midway');
  const release = home.lockVolume('db', 'sync');
  assert.equal(await running(), true, 'a sync holds the volume: the push runs');
  release();
  const releaseSnap = home.lockVolume('db', 'snapshot');
  assert.equal(await running(), false, 'a snapshot holds the volume, not a push');
  releaseSnap();

  // Metrics carry the same numbers. Jobs that end before the first scrape (prom-client is
  // loaded at it) are counted, and so are those after it.
  const metrics = createMetrics(async () => [...s.values()], () => []);
  metrics.jobEnded('db', 'ok');
  metrics.jobEnded('db', 'ok');
  metrics.jobEnded('db2', 'failed');
  const { body } = await metrics.render();
  assert.match(body, /tandem_jobs_total\{unit="db",result="ok"\} 2\n/);
  assert.match(body, /tandem_jobs_total\{unit="db2",result="failed"\} 1\n/);
  metrics.jobEnded('db', 'ok');
  assert.match((await metrics.render()).body, /tandem_jobs_total\{unit="db",result="ok"\} 3\n/);
  assert.match(body, /tandem_rpo_age_seconds\{volume="db",policy="gold"\} 600\n/);
  assert.match(body, /tandem_rpo_state\{volume="db2",policy="gold",state="BREACHED"\} 1\n/);
  assert.match(body, /tandem_rto_estimate_seconds\{volume="db",policy="gold"\} 570\n/);
  assert.match(body, /tandem_last_drill_passed\{volume="db",policy="gold"\} 1\n/);
  assert.match(body, new RegExp(`tandem_push_unfinished_since_timestamp_seconds\\{volume="db",policy="gold",peer="cloud",state="unknown"\\} ${(t0 + 5 * MIN) / 1000}\n`));
  assert.doesNotMatch(body, /tandem_push_unfinished_since_timestamp_seconds\{volume="db2"/);
  // With the home's locks (as the daemon computes it), the state label says running or stopped.
  const unfinishedState = async (): Promise<string | undefined> => {
    const withLocks = await computeStatus(store, config, t0 + 10 * MIN, undefined, home.paths.locks);
    const text = (await createMetrics(async () => withLocks, () => []).render()).body;
    return /tandem_push_unfinished_since_timestamp_seconds\{volume="db",policy="gold",peer="cloud",state="(\w+)"\} /.exec(text)?.[1];
  };
  assert.equal(await unfinishedState(), 'stopped');
  const holding = home.lockVolume('db', 'sync');
  assert.equal(await unfinishedState(), 'running');
  holding();

  // Webhook: one POST per transition to BREACHED.
  const received: Array<{ event: string; volume: string }> = [];
  const hook = createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      received.push(JSON.parse(body));
      res.end('ok');
    });
  });
  hook.listen(0, '127.0.0.1');
  await once(hook, 'listening');
  t.after(() => hook.close());
  const url = `http://127.0.0.1:${(hook.address() as { port: number }).port}/alert`;
  const notifier = new BreachNotifier('onprem');
  const round = async (ms: number) => notifier.check([...(await at(ms)).values()] as VolumeStatus[], url, t0 + ms);
  let r = await round(10 * MIN);
  assert.deepEqual(r.sent.map((a) => `${a.event}:${a.volume}`), ['rpo_breached:db2', 'rto_breached:db2']);
  r = await round(20 * MIN);
  assert.deepEqual(r.sent, [], 'still breached: no repeat');
  r = await round(61 * MIN);
  assert.deepEqual(r.sent.map((a) => `${a.event}:${a.volume}`), ['rpo_breached:db']);
  assert.equal(received.length, 3);
  assert.equal(received[2]!.volume, 'db');
  const down = await new BreachNotifier('onprem').check([...(await at(61 * MIN)).values()], 'http://127.0.0.1:9/closed', t0);
  assert.equal(down.sent.length, 0);
  assert.equal(down.errors.length, 3, 'delivery failures are reported, not thrown');
});

test('the recovery point the peer holds: the newer of the daemon\'s last push and a push by hand; one that found the peer up to date counts from the snapshot it took', async (t) => {
  const { home, store, img, config } = await homeWithDb(t, 'onprem', `appliance: { name: onprem }
policies:
  gold: { rpo: 1h }
assign:
  - match: "*"
    policy: gold
replication: { peer: cloud }
`);
  const point = async (now: number) => {
    const [s] = await computeStatus(store, config, now, 'db');
    return { ...s!.lastReplicated!, age: s!.rpoAgeMs };
  };

  // A push that sent s1.
  const s1 = await snapshotVolume(home, store, 'db');
  await recordSyncBase(store, 'db', 'cloud', s1, 'push', s1);
  const t1 = Date.parse(s1.created);
  assert.deepEqual(await point(t1 + 10 * MIN), { snapshot: s1.id, at: s1.created, age: 10 * MIN });

  // Nothing changed: the next push takes s2 (the same tree) and finds the peer up to date. Its
  // base stays the peer's s1, but the peer holds the volume as s2 found it.
  await new Promise((r) => setTimeout(r, 5));
  const s2 = await snapshotVolume(home, store, 'db');
  assert.equal(s2.root, s1.root);
  assert.ok(s2.created > s1.created);
  await recordSyncBase(store, 'db', 'cloud', s1, 'push', s2);
  assert.equal((await store.getMeta<SyncBase>(SYNC_BASE_NS, 'db@cloud'))!.snapshot, s1.id, 'the base is what both hold');
  const pins = await pinnedSnapshots(store, 'db');
  assert.ok(pins.has(s1.id) && !pins.has(s2.id), 'the base is kept from retention, the point is not');
  const t2 = Date.parse(s2.created);
  assert.deepEqual(await point(t2 + 10 * MIN), { snapshot: s2.id, at: s2.created, age: 10 * MIN });

  // The daemon's last good push, older than the push by hand: the push by hand counts.
  await updateVolumeState(store, 'db', { lastReplicated: s1.id, lastGood: s1.created });
  assert.deepEqual(await point(t2 + 10 * MIN), { snapshot: s2.id, at: s2.created, age: 10 * MIN });
  // A push to another peer (a lab, a second site) is no point at the replication peer.
  await new Promise((r) => setTimeout(r, 5));
  const lab = await snapshotVolume(home, store, 'db');
  await recordSyncBase(store, 'db', 'lab', lab, 'push', lab);
  assert.deepEqual(await point(t2 + 10 * MIN), { snapshot: s2.id, at: s2.created, age: 10 * MIN });
  // A newer one of the daemon's counts.
  const later = new Date(t2 + MIN).toISOString();
  await updateVolumeState(store, 'db', { lastReplicated: s2.id, lastGood: later });
  assert.deepEqual(await point(t2 + 10 * MIN), { snapshot: s2.id, at: later, age: 9 * MIN });

  // Nor does the daemon's last push once replication goes to a peer that holds nothing of the volume.
  const moved = await loadConfig(home).then((c) => ({ ...c, replication: { ...c.replication!, peer: 'cloud2' } }));
  const [elsewhere] = await computeStatus(store, moved, t2 + 10 * MIN, 'db');
  assert.equal(elsewhere!.lastReplicated, null);
  assert.equal(elsewhere!.rpoState, 'BREACHED');

  // The volume removed and added again under its name: nothing of it is replicated any more.
  await removeVolume(home, store, 'db');
  await addVolume(store, { name: 'db', path: img });
  const [fresh] = await computeStatus(store, config, t2 + 10 * MIN, 'db');
  assert.equal(fresh!.lastReplicated, null);
  assert.equal(fresh!.rpoState, 'BREACHED', 'never protected');

  // A record written before `point` existed: the base's own snapshot time.
  const s3 = await snapshotVolume(home, store, 'db');
  await store.putMeta(SYNC_BASE_NS, 'db@cloud', { snapshot: s3.id, root: s3.root, direction: 'push', at: new Date().toISOString() });
  const t3 = Date.parse(s3.created);
  assert.deepEqual(await point(t3 + 10 * MIN), { snapshot: s3.id, at: s3.created, age: 10 * MIN });
});

test('a policy config.yaml does not define: `volume add --policy` refuses it, and a volume whose policy was renamed away shows BREACHED and says why, not unprotected by choice', async (t) => {
  const { cli: cliText } = await import('../helpers/cli.js');
  const dir = mkdtempSync(join(tmpdir(), 'tandem-policy-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const home = join(dir, 'home');
  assert.equal((await cliText(['init', '--home', home])).code, 0);
  writeFileSync(join(home, 'config.yaml'), 'appliance:\n  name: onprem\npolicies:\n  gold:\n    rpo: 15m\n');
  const img = join(dir, 'v.img');
  writeRandom(img, 1024 * 1024);
  const typo = await cliText(['volume', 'add', 'v', '--path', img, '--policy', 'glod', '--home', home, '--json']);
  assert.equal(typo.code, 1, typo.stdout);
  const err = JSON.parse(typo.stdout).error;
  assert.equal(err.code, 'ERR_POLICY_NOT_FOUND');
  assert.match(err.message, /no policy "glod" \(its policies: gold\)/);
  assert.equal(JSON.parse((await cliText(['volume', 'list', '--home', home, '--json'])).stdout).length, 0, 'nothing was registered');
  assert.equal((await cliText(['volume', 'add', 'v', '--path', img, '--policy', 'gold', '--home', home])).code, 0);
  // The operator renames the policy: the volume still names the old one.
  writeFileSync(join(home, 'config.yaml'), 'appliance:\n  name: onprem\npolicies:\n  gold-15m:\n    rpo: 15m\n');
  const st = await cliText(['status', '--home', home, '--json']);
  const v = JSON.parse(st.stdout).volumes[0];
  assert.equal(v.rpoState, 'BREACHED');
  assert.equal(v.policy, 'gold');
  assert.equal(v.policyMissing, true);
  assert.match((await cliText(['status', '--home', home])).stdout, /v: its policy "gold" is not defined in config\.yaml/);
});

test('status from the audit: a point dated ahead does not hide a later push dated right; no RTO while the DR site holds nothing; a peer removed or re-paired with another appliance holds no point, and the daemon is due at once', async (t) => {
  const { home, store, config } = await homeWithDb(t, 'onprem', `appliance: { name: onprem }
policies:
  gold: { rpo: 1h, rto: 1h }
assign:
  - match: "db*"
    policy: gold
replication: { peer: cloud }
`);
  const status = async (now: number) => (await computeStatus(store, config, now, 'db'))[0]!;

  // Taken, not replicated: nothing to fail over, so no RTO, whatever this appliance holds.
  const s1 = await snapshotVolume(home, store, 'db');
  const t1 = Date.parse(s1.created);
  const none = await status(t1 + MIN);
  assert.equal(none.lastReplicated, null);
  assert.equal(none.rtoEstimateMs, null);
  assert.equal(none.rtoState, 'BREACHED');
  assert.equal(none.local, true);

  // A push by hand dated an hour ahead (taken while the clock ran ahead), then the daemon's push
  // dated by this clock: the right one counts.
  const ahead = new Date(t1 + 60 * MIN).toISOString();
  await store.putMeta(SYNC_BASE_NS, 'db@cloud', { snapshot: s1.id, root: s1.root, direction: 'push', at: ahead, point: { snapshot: s1.id, at: ahead } });
  const pushedAt = new Date(t1 + 2 * MIN).toISOString();
  await updateVolumeState(store, 'db', { lastReplicated: s1.id, lastGood: pushedAt, lastReplicatedAt: pushedAt, lastReplicatedTo: 'cloud' });
  const right = await status(t1 + 3 * MIN);
  assert.equal(right.lastReplicated!.at, pushedAt);
  assert.equal(right.rpoAgeMs, MIN);
  assert.equal(right.rpoState, 'OK');
  assert.equal(right.pointAhead, undefined);
  assert.notEqual(right.rtoEstimateMs, null);

  // The peer removed (or re-paired under its name with another appliance): none of it counts.
  const { addPeer, forgetPeerPoints, removePeer, validatePeer } = await import('../../appliance/peers.js');
  await addPeer(store, validatePeer({ name: 'cloud', url: 'https://127.0.0.1:9', token: 'x'.repeat(32), fingerprint: 'AB'.repeat(32) }));
  await forgetPeerPoints(store, 'cloud');
  const gone = await status(t1 + 3 * MIN);
  assert.equal(gone.lastReplicated, null, 'status counts no point of the old peer');
  assert.equal(gone.rpoState, 'BREACHED');
  const { pushedPointAt, readVolumeState } = await import('../../appliance/scheduler/state.js');
  assert.equal(pushedPointAt(await readVolumeState(store, 'db'), 'cloud'), null, 'the daemon finds no push: its job is due now');
  await removePeer(store, 'cloud');
});

test('the RTO estimate counts the export still to do: what changed since the last export (a tree diff), not the last export\'s size', async (t) => {
  const { home, store, img, data, config } = await homeWithDb(t, 'cloud', `appliance: { name: cloud }\npolicies:\n  gold: { rpo: 1h, rto: 1h }\nassign:\n  - match: "*"\n    policy: gold\n`, 8 * 512 * 1024);
  const s1 = await snapshotVolume(home, store, 'db');
  await store.putMeta('ebs-exports', 'db', [{ ebsSnapshotId: 'snap-0123456789abcdef0', tandemSnapshot: s1.id, created: s1.created }]);
  const [exported] = await computeStatus(store, config, Date.now(), 'db');
  assert.match(exported!.rtoBasis, /newest point already exported/);
  for (const b of [1, 4, 6]) data.fill(b, b * 512 * 1024, b * 512 * 1024 + 100);
  writeFileSync(img, data);
  await new Promise((r) => setTimeout(r, 5));
  await snapshotVolume(home, store, 'db');
  const [pending] = await computeStatus(store, config, Date.now(), 'db');
  assert.match(pending!.rtoBasis, new RegExp(`export of ${3 * 512 * 1024} bytes`), pending!.rtoBasis);
});

test('on-prem status estimates the RTO from the DR site\'s facts, as its lock answers give them: its last EBS export, measured launch and export rate, last drill; not a full first export at default rates', async (t) => {
  const { a, b, sb, img } = await pairedWithVolume(t, 16); // 16 blocks of 64 KiB
  const cfg = join(a.dir, 'config.yaml');
  writeFileSync(cfg, `${readFileSync(cfg, 'utf8')}policies:\n  gold: { rpo: 1h, rto: 1h }\nassign:\n  - match: "*"\n    policy: gold\nreplication: { peer: cloud }\n`);
  const s1 = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(s1.code, 0, s1.stderr);
  let st = (await cli(a, 'status', 'vol')).json.volumes[0];
  assert.equal(st.lastExport, null, 'nothing exported at the DR site yet');
  assert.match(st.rtoBasis, new RegExp(`launch ${DEFAULT_LAUNCH_MS / 1000}s \\(default until a drill measures it\\) \\(as cloud reported at .*\\) \\+ export of ${16 * 65536} bytes at 50 MiB/s \\(default\\)`), st.rtoBasis);

  // The DR site exports that point, measures a launch and an export rate, passes a drill (its
  // records, as `appliance ebs export`, a drill and a failover leave them).
  await sb.stop();
  const cloud = Home.load(b.dir);
  const store = await cloud.openStore();
  const exportedAt = new Date().toISOString();
  await store.putMeta('ebs-exports', 'vol', [{ ebsSnapshotId: 'snap-0123456789abcdef0', tandemSnapshot: s1.json.snapshot, created: exportedAt, parentEbsSnapshotId: null }]);
  await store.putMeta('rto', 'vol', { at: exportedAt, rtoSeconds: 42 });
  await store.putMeta(RATES_NS, 'vol', updateRates(DEFAULT_RATES, { exportBytesPerSec: 100 * MiB }, new Date()));
  await store.putMeta('drills', 'drill-1', { id: 'drill-1', at: exportedAt, volumes: ['vol'], passed: true, rtoSeconds: 42 });
  await store.close();
  const sb2 = await startServe(t, b);
  assert.equal((await cli(a, 'peer', 'update', 'cloud', '--url', sb2.url)).code, 0);

  // One block changes and is pushed: the estimate is the DR site's launch plus the export of that block.
  const fd = openSync(img, 'r+');
  writeSync(fd, randomBytes(4096), 0, 4096, 3 * 65536);
  closeSync(fd);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  st = (await cli(a, 'status', 'vol')).json.volumes[0];
  assert.equal(st.lastExport.tandemSnapshot, s1.json.snapshot);
  assert.equal(st.lastExport.ebsSnapshotId, 'snap-0123456789abcdef0');
  assert.match(st.rtoBasis, new RegExp(`^launch 42s measured ${exportedAt} \\(as cloud reported at .*\\) \\+ export of 65536 bytes at 100 MiB/s \\(measured\\)$`), st.rtoBasis);
  assert.equal(st.rtoEstimateMs, 42_000 + Math.ceil((65536 / (100 * MiB)) * 1000));
  assert.equal(st.rtoState, 'OK');
  assert.deepEqual([st.lastDrill.id, st.lastDrill.passed], ['drill-1', true]);
  const text = (await cliText(['--home', a.dir, 'status'])).stdout;
  assert.match(text, /passed/, text);
});
