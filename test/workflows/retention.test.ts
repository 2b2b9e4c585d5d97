import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeRandom } from '../helpers/files.js';
import fc from 'fast-check';
import { selectRetained } from '../../appliance/policy/index.js';

const H = 3_600_000;
const D = 24 * H;
/** Monday 2026-11-02 00:00 UTC. */
const MONDAY = Date.parse('2026-11-02T00:00:00Z');

function snaps(times: number[]): Array<{ id: string; created: string }> {
  return times.map((t) => ({ id: `s${new Date(t).toISOString()}`, created: new Date(t).toISOString() }));
}
const idAt = (t: number) => `s${new Date(t).toISOString()}`;

test('hourly: the newest snapshot of each of the newest N hours', () => {
  // Every 15 minutes for 5 hours: 20 snapshots.
  const times = Array.from({ length: 20 }, (_, i) => MONDAY + i * 15 * 60_000);
  const keep = selectRetained(snaps(times), { hourly: 3 }, MONDAY + 6 * H);
  assert.deepEqual([...keep].sort(), [idAt(MONDAY + 2 * H + 45 * 60_000), idAt(MONDAY + 3 * H + 45 * 60_000), idAt(MONDAY + 4 * H + 45 * 60_000)].sort());
});

test('GFS: hourly 24, daily 7, weekly 4 over 6 weeks of hourly snapshots keeps exactly the expected set', () => {
  const start = MONDAY;
  const end = MONDAY + 42 * D; // 6 weeks, Monday 00:00 (exclusive)
  const times: number[] = [];
  for (let t = start; t < end; t += H) times.push(t);
  const keep = selectRetained(snaps(times), { hourly: 24, daily: 7, weekly: 4 }, end);
  const expected = new Set<string>();
  for (let i = 1; i <= 24; i++) expected.add(idAt(end - i * H)); // last 24 hours
  for (let d = 1; d <= 7; d++) expected.add(idAt(end - (d - 1) * D - H)); // 23:00 of each of the last 7 days
  for (let w = 1; w <= 4; w++) expected.add(idAt(end - (w - 1) * 7 * D - H)); // Sunday 23:00 of each of the last 4 weeks
  assert.deepEqual([...keep].sort(), [...expected].sort());
  assert.equal(keep.size, 24 + 6 + 3); // the newest day and week overlap with the hours
});

test('last N, monthly, pinned, newest and future snapshots are kept', () => {
  const times = [Date.parse('2026-08-15T00:00:00Z'), Date.parse('2026-09-10T00:00:00Z'), Date.parse('2026-09-20T00:00:00Z'), Date.parse('2026-10-05T00:00:00Z'), Date.parse('2026-10-06T00:00:00Z')];
  const now = Date.parse('2026-10-07T00:00:00Z');
  const all = snaps(times);
  assert.deepEqual([...selectRetained(all, { monthly: 2 }, now)].sort(), [idAt(times[2]!), idAt(times[4]!)].sort());
  assert.deepEqual([...selectRetained(all, { last: 2 }, now)].sort(), [idAt(times[3]!), idAt(times[4]!)].sort());
  // All zero: only the newest survives, plus what is pinned.
  assert.deepEqual([...selectRetained(all, {}, now, new Set([idAt(times[0]!)]))].sort(), [idAt(times[0]!), idAt(times[4]!)].sort());
  // A snapshot dated after now (clock skew) is kept.
  const future = snaps([now + D]);
  assert.ok(selectRetained([...all, ...future], { last: 1 }, now).has(future[0]!.id));
  // No retention: everything.
  assert.equal(selectRetained(all, null, now).size, all.length);
});

test('property: the newest and the pinned are always kept; more retention never keeps less', () => {
  fc.assert(fc.property(
    fc.uniqueArray(fc.integer({ min: 0, max: 90 * 24 }), { minLength: 1, maxLength: 60 }),
    fc.record({ last: fc.nat(5), hourly: fc.nat(30), daily: fc.nat(10), weekly: fc.nat(6), monthly: fc.nat(4) }),
    fc.nat(5),
    (hours, r, extra) => {
      const all = snaps(hours.map((h) => MONDAY + h * H));
      const now = MONDAY + 91 * D;
      const pinned = new Set([all[0]!.id]);
      const keep = selectRetained(all, r, now, pinned);
      const newest = all.reduce((a, b) => (a.created > b.created ? a : b));
      assert.ok(keep.has(newest.id) && keep.has(all[0]!.id));
      const more = selectRetained(all, { ...r, hourly: r.hourly + extra, daily: r.daily + extra }, now, pinned);
      for (const id of keep) assert.ok(more.has(id));
      // Order of input does not matter.
      assert.deepEqual([...selectRetained([...all].reverse(), r, now, pinned)].sort(), [...keep].sort());
    },
  ), { numRuns: 200 });
});

test('applyRetention on a real store deletes what the policy drops and never the sync base or the last EBS export', async (t) => {
  const { mkdtempSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const { Home } = await import('../../appliance/home.js');
  const { addVolume, snapshotVolume } = await import('../../appliance/ops.js');
  const { applyRetention, pinnedSnapshots, snapshotPins } = await import('../../appliance/policy/index.js');
  const dir = mkdtempSync(join(tmpdir(), 'tandem-ret-'));
  const home = await Home.init(join(dir, 'home'), 'onprem');
  const store = await home.openStore();
  t.after(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const img = join(dir, 'v.img');
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    writeRandom(img, 256 * 1024);
    if (i === 0) await addVolume(store, { name: 'v', path: img });
    ids.push((await snapshotVolume(home, store, 'v')).id);
  }
  // Formats written by appliance/replicate.ts and appliance/ebs (newest export last).
  await store.putMeta('sync-base', 'v@cloud', { snapshot: ids[1], root: 'x', direction: 'push', at: new Date().toISOString() });
  await store.putMeta('ebs-exports', 'v', [{ ebsSnapshotId: 'snap-1', tandemSnapshot: ids[0] }, { ebsSnapshotId: 'snap-2', tandemSnapshot: ids[2] }]);
  await store.putMeta('sync-base', 'vx@cloud', { snapshot: ids[3], root: 'y', direction: 'push', at: new Date().toISOString() });
  // The point an active failover runs from (appliance/recovery/launch.ts): failback builds on it.
  // One of a failover ended, and one of another volume, pin nothing.
  await store.putMeta('recovery-runs', 'run-1', { id: 'run-1', mode: 'failover', status: 'active', points: [{ volume: 'v', tandemSnapshot: ids[3], ebsSnapshotId: 'snap-3' }, { volume: 'w', tandemSnapshot: ids[0] }] });
  await store.putMeta('recovery-runs', 'run-0', { id: 'run-0', mode: 'failover', status: 'failed-back', points: [{ volume: 'v', tandemSnapshot: ids[0], ebsSnapshotId: 'snap-1' }] });
  assert.deepEqual([...await pinnedSnapshots(store, 'v')].sort(), [ids[1], ids[2], ids[3]].sort(), 'only v, only the newest export, only the active failover');
  const why = await snapshotPins(store, 'v');
  assert.match(why.get(ids[1]!)!.join(), /next incremental sync/);
  assert.match(why.get(ids[2]!)!.join(), /next incremental EBS export/);
  assert.match(why.get(ids[3]!)!.join(), /the point failover run-1 runs from/);
  const policy = { name: 'p', rpoMs: 3_600_000, rtoMs: null, retention: { last: 1 }, export: null };
  const r = await applyRetention(store, 'v', policy);
  assert.deepEqual(r.deleted.sort(), [ids[0]].sort());
  assert.deepEqual((await store.listSnapshots('v')).map((s) => s.id), [ids[1], ids[2], ids[3], ids[4]]);
  assert.deepEqual((await applyRetention(store, 'v', policy)).deleted, [], 'idempotent');
});
