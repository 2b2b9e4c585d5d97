import { test } from 'node:test';
import assert from 'node:assert/strict';
import { computeCost, retentionDays, resolvePrices, DEFAULT_PRICES, type CostInput } from '../../appliance/cost/index.js';

const GiB = 1024 ** 3;

const input = (over: Partial<CostInput> = {}): CostInput => ({
  prices: DEFAULT_PRICES,
  volumes: [{ name: 'db', sizeBytes: 100 * GiB, dataBytes: 40 * GiB, changedBytesPerDay: GiB, changeBasis: 'measured', rpoMs: 3_600_000, exportEbs: true, retentionDays: 28 }],
  plans: [{ name: 'erp', instanceType: 'r6i.xlarge', volumes: ['db'] }],
  ...over,
});

test('cost arithmetic: every line from quantity x unit price, totals and difference', () => {
  const r = computeCost(input());
  const byItem = new Map(r.dr.lines.map((l) => [l.item, l]));
  // 40 GiB of data + 1 GiB/day x 28 days of retention = 68 GB-month.
  assert.equal(byItem.get('db: EBS snapshot storage')!.quantity, 68);
  assert.equal(byItem.get('db: EBS snapshot storage')!.cost, 3.4);
  // 1 GiB/day x 30.4167 days / 512 KiB = 62293.333 PutSnapshotBlock at $0.006 per 1,000.
  assert.equal(byItem.get('db: EBS PutSnapshotBlock')!.quantity, 62293.333);
  assert.equal(byItem.get('db: EBS PutSnapshotBlock')!.cost, 0.3738);
  assert.equal(byItem.get('db: replica store on the cloud appliance (gp3)')!.cost, 5.44);
  assert.equal(byItem.get('cloud appliance instance (m6i.large)')!.cost, 70.08);
  assert.equal(r.dr.monthly, 79.29);
  assert.deepEqual(r.hotStandby.lines.map((l) => [l.item, l.cost]), [['erp: instance r6i.xlarge', 183.96], ['erp: gp3 volumes', 8]]);
  assert.equal(r.hotStandby.monthly, 191.96);
  assert.equal(r.savingsMonthly, 112.67);
  // One-off: the first export sends the 40 GiB of data once.
  assert.equal(r.oneOff[0]!.quantity, 81920);
  assert.equal(r.oneOff[0]!.cost, 0.4915);
  for (const l of [...r.dr.lines, ...r.hotStandby.lines, ...r.oneOff]) assert.ok(l.explain.length > 10, `${l.item} is explained`);
  assert.match(r.prices.note, /us-east-1 as of 2026-11-01/);
});

test('no EBS export: no snapshot or request lines; unknown instance types say how to price them', () => {
  const r = computeCost(input({
    volumes: [{ ...input().volumes[0]!, exportEbs: false, retentionDays: null }],
    plans: [{ name: 'erp', instanceType: 'x9.huge', volumes: ['db'] }],
  }));
  assert.deepEqual(r.dr.lines.map((l) => l.item), ['db: replica store on the cloud appliance (gp3)', 'cloud appliance instance (m6i.large)']);
  // Keep-everything counts 30 days of history.
  assert.equal(r.dr.lines[0]!.quantity, 70);
  assert.match(r.hotStandby.lines[0]!.explain, /add prices\.instances\["x9\.huge"\]/);
  assert.equal(r.hotStandby.lines[0]!.cost, 0);
});

test('prices: config overrides the dated defaults; retention windows in days', () => {
  const p = resolvePrices({ region: 'eu-west-1', date: '2026-12-01', snapshotGbMonth: 0.053, instances: { 'x9.huge': 2 } });
  assert.equal(p.region, 'eu-west-1');
  assert.equal(p.snapshotGbMonth, 0.053);
  assert.equal(p.instances['x9.huge'], 2);
  assert.equal(p.instances['m6i.large'], DEFAULT_PRICES.instances['m6i.large']);
  assert.equal(p.gp3GbMonth, DEFAULT_PRICES.gp3GbMonth);
  assert.equal(retentionDays({ hourly: 24, daily: 7, weekly: 4 }, 3_600_000), 28);
  assert.equal(retentionDays({ last: 12 }, 3_600_000), 0.5);
  assert.equal(retentionDays({ monthly: 3, daily: 7 }, null), 90);
  assert.equal(retentionDays(null, 1), null);
});
