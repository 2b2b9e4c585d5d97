import { test } from 'node:test';
import assert from 'node:assert/strict';
import { selectPlans, toPlan } from '../../appliance/recovery/plan.js';
import { drillChecks, type LaunchedServer } from '../../appliance/recovery/launch.js';
import { parsePoint, sizeGiB } from '../../appliance/recovery/points.js';
import { isTandemError } from '../../common/errors.js';
import type { RawRecoveryPlan } from '../../appliance/config/schema.js';

const web: RawRecoveryPlan = {
  instanceType: 't3.medium',
  subnet: 'subnet-prod1',
  securityGroups: ['sg-web'],
  rootVolume: { volume: 'web-root', device: '/dev/xvda' },
  drill: { subnet: 'subnet-iso1', securityGroups: ['sg-iso'] },
};
const db: RawRecoveryPlan = {
  instanceType: 'm6i.large',
  subnet: 'subnet-prod1',
  securityGroups: ['sg-db'],
  rootVolume: { volume: 'db-root', device: '/dev/xvda' },
  dataVolumes: [{ volume: 'db-data', device: '/dev/xvdb' }],
};
const config = { recovery: { web, db }, groups: { erp: { volumes: ['db-data'] } } };

test('plans are selected by volume, group, plan name, or all', () => {
  assert.deepEqual(selectPlans(config, { volume: 'db-data' }).map((p) => p.name), ['db']);
  assert.deepEqual(selectPlans(config, { volume: 'web-root' }).map((p) => p.name), ['web']);
  assert.deepEqual(selectPlans(config, { group: 'erp' }).map((p) => p.name), ['db']);
  assert.deepEqual(selectPlans(config, { plan: 'web' }).map((p) => p.name), ['web']);
  assert.deepEqual(selectPlans(config, {}).map((p) => p.name).sort(), ['db', 'web']);
});

test('the root disk comes first, then data disks in config order', () => {
  const p = toPlan('db', db);
  assert.deepEqual(p.disks.map((d) => [d.volume, d.device, d.root]), [['db-root', '/dev/xvda', true], ['db-data', '/dev/xvdb', false]]);
});

test('bad selections and plans are ERR_PLAN_INVALID with advice', () => {
  const cases: Array<() => unknown> = [
    () => selectPlans({}, { volume: 'x' }),
    () => selectPlans(config, { volume: 'nope' }),
    () => selectPlans(config, { group: 'nope' }),
    () => selectPlans(config, { plan: 'nope' }),
    () => toPlan('dup', { ...db, dataVolumes: [{ volume: 'db-data', device: '/dev/xvda' }] }),
  ];
  for (const c of cases) {
    assert.throws(c, (e: unknown) => isTandemError(e, 'ERR_PLAN_INVALID') && e.message.length > 20);
  }
});

test('drill checks fail when an instance is outside the drill subnet or misses a disk', () => {
  const plan = toPlan('web', web);
  const good: LaunchedServer = {
    plan: 'web', imageId: 'ami-1', instanceId: 'i-1', state: 'running', subnetId: 'subnet-iso1', privateIp: '10.9.0.5',
    disks: [{ device: '/dev/xvda', volume: 'web-root', ebsSnapshotId: 'snap-1', tandemSnapshot: 's1', ec2VolumeId: 'vol-1' }],
  };
  assert.ok(drillChecks([plan], [good]).every((c) => c.ok));
  const leaked = drillChecks([plan], [{ ...good, subnetId: 'subnet-prod1' }]);
  assert.equal(leaked.find((c) => c.name === 'web isolated')?.ok, false);
  const noDisk = drillChecks([plan], [{ ...good, disks: [{ ...good.disks[0]!, ec2VolumeId: null }] }]);
  assert.equal(noDisk.find((c) => c.name === 'web disks attached')?.ok, false);
  const stopped = drillChecks([plan], [{ ...good, state: 'stopped' }]);
  assert.equal(stopped.find((c) => c.name === 'web running')?.ok, false);
  assert.equal(drillChecks([plan], []).every((c) => !c.ok), true);
});

test('points: sizes round up to whole GiB, bad times are usage errors', () => {
  assert.equal(sizeGiB(1), 1);
  assert.equal(sizeGiB(1024 ** 3), 1);
  assert.equal(sizeGiB(1024 ** 3 + 1), 2);
  assert.equal(parsePoint(undefined), undefined);
  assert.equal(parsePoint('2026-11-25T09:30:00Z')?.toISOString(), '2026-11-25T09:30:00.000Z');
  assert.throws(() => parsePoint('yesterday-ish'), (e: unknown) => isTandemError(e, 'ERR_USAGE'));
});
