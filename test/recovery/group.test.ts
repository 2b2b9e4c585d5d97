/**
 * A server whose disks are snapshotted as a group comes back from one group run: when a
 * disaster cut the group's last replication short (one disk's snapshot arrived, the other's did
 * not), drill and failover use the newest run that every disk holds, not each disk's newest.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cliJson } from '../helpers/cli.js';
import { startCloud, type CloudSetup } from './helpers.js';

const MiB = 1024 * 1024;

let work: string;
let home: string;
let aws: CloudSetup['aws'];
let env: Record<string, string>;

async function ok(args: string[]): Promise<any> {
  const r = await cliJson(['--home', home, ...args], { env });
  assert.equal(r.code, 0, `appliance ${args.join(' ')} failed: ${r.stderr}`);
  return { ...r.json, stderr: r.stderr };
}

before(async () => {
  ({ work, home, aws, env } = await startCloud('tandem-group-'));
  writeFileSync(join(home, 'config.yaml'), `appliance:
  name: cloud
recovery:
  db:
    instanceType: t3.small
    subnet: subnet-0a1b2c3d4e5f60001
    securityGroups: [sg-0a1b2c3d]
    rootVolume: { volume: db-data, device: /dev/xvda }
    dataVolumes: [{ volume: db-log, device: /dev/xvdb }]
    drill: { subnet: subnet-0a1b2c3d4e5f60002, securityGroups: [sg-0d1e2f3a] }
`);
  for (const v of ['db-data', 'db-log']) {
    writeFileSync(join(work, `${v}.img`), randomBytes(2 * MiB));
    await ok(['volume', 'add', v, '--path', join(work, `${v}.img`)]);
  }
});

after(async () => {
  await aws?.close();
  rmSync(work, { recursive: true, force: true });
});

test('a group run cut short: drill and failover bring both disks back from the last run both hold', async () => {
  // Snapshots as the scheduler takes a group's: labelled with the group run. Run 2 reached only db-data.
  const { Home } = await import('../../appliance/home.js');
  const { snapshotVolumeLocked } = await import('../../appliance/ops.js');
  const store = await Home.load(home).openStore();
  const ids: Record<string, string> = {};
  try {
    for (const v of ['db-data', 'db-log']) ids[`${v}/1`] = (await snapshotVolumeLocked(store, v, { labels: { group: 'db', groupRun: 'job-1' } })).id;
    writeFileSync(join(work, 'db-data.img'), randomBytes(2 * MiB));
    ids['db-data/2'] = (await snapshotVolumeLocked(store, 'db-data', { labels: { group: 'db', groupRun: 'job-2' } })).id;
  } finally {
    await store.close();
  }
  await ok(['ebs', 'export', 'db-data', '--snapshot', ids['db-data/1']!]);
  await ok(['ebs', 'export', 'db-log']);
  await ok(['ebs', 'export', 'db-data']); // run 2's db-data: exported, and the newest of its volume

  const drill = await ok(['drill', 'db-data']);
  const points = (run: { points: Array<{ volume: string; tandemSnapshot: string }> }) => Object.fromEntries(run.points.map((p) => [p.volume, p.tandemSnapshot]));
  assert.deepEqual(points(drill), { 'db-data': ids['db-data/1'], 'db-log': ids['db-log/1'] }, 'both disks from run 1');
  assert.match(drill.stderr, /db: its disks come back from group run job-1, the newest that all of db-data, db-log hold: db-data has a newer snapshot that the others lack/);

  const failover = await ok(['failover', 'db-data']);
  assert.deepEqual(points(failover), { 'db-data': ids['db-data/1'], 'db-log': ids['db-log/1'] });
  await ok(['failover', 'db-data', '--end', '--terminate']);
});
