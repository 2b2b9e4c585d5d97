/**
 * A lost cloud appliance replaced by a new one: `appliance ebs adopt VOL` takes over the EBS
 * exports the old one made (the recovery points) and imports the newest as the very snapshot it
 * was exported from, so the on-prem appliance's next push sends only what changed since and the
 * next export is incremental. Real appliances and the AWS emulator on loopback.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, initHome, pair, startServe, tempDir, type TestHome } from '../helpers/appliance.js';
import { emulator, fillBlock, makeImage, type Emulator } from './helpers.js';
import { cloudConfig } from '../recovery/helpers.js';
import { snapshotIdTime } from '../../store/index.js';

let emu: Emulator;
before(async () => {
  emu = await emulator();
  process.env.AWS_ENDPOINT_URL_EC2 = emu.url;
});
after(async () => { await emu.close(); });

async function ok(home: TestHome, ...args: string[]): Promise<any> {
  const r = await cli(home, ...args);
  assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
  return r.json;
}

test('a new cloud appliance adopts the exports of the lost one: same snapshot and root, incremental push and export after', async (t) => {
  // The on-prem appliance and the cloud appliance about to be lost.
  const [onprem, lost] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  const image = join(tempDir(t), 'db.img');
  let img = makeImage(24, { seed: 9, zeroEvery: 5 });
  writeFileSync(image, img);
  await ok(onprem, 'volume', 'add', 'db', '--path', image);
  const lostServed = await startServe(t, lost);
  await pair(onprem, 'cloud', lost, lostServed);
  const points: string[] = [];
  const sizes: number[] = [];
  for (let i = 0; i < 3; i++) {
    if (i > 0) {
      img = Buffer.from(img);
      fillBlock(img, 3 * i, 70 + i);
      // The disk grows before the last export: the older points keep their own size.
      if (i === 2) img = Buffer.concat([img, makeImage(1, { seed: 77 })]);
      writeFileSync(image, img);
    }
    sizes.push(img.length);
    const pushed = await ok(onprem, 'sync', 'db', '--peer', 'cloud');
    points.push(pushed.snapshot);
    await ok(lost, 'ebs', 'export', 'db');
  }
  const exported = (await ok(lost, 'ebs', 'list', 'db')).exports.map((e: { ebsSnapshotId: string }) => e.ebsSnapshotId);
  const lostRoot = (await ok(lost, 'snapshots', 'db')).at(-1).root;
  await lostServed.kill('SIGKILL');

  // Its replacement.
  const cloud = await initHome(t, 'cloud-2');
  const dry = await ok(cloud, 'ebs', 'adopt', 'db', '--dry-run');
  assert.deepEqual(dry.adopted.map((f: { ebsSnapshotId: string }) => f.ebsSnapshotId), exported);
  assert.deepEqual(dry.adopted.map((f: { tandemSnapshot: string }) => f.tandemSnapshot), points);
  assert.deepEqual(dry.adopted.map((f: { appliance: string }) => f.appliance), ['cloud', 'cloud', 'cloud']);
  assert.equal((await ok(cloud, 'ebs', 'list', 'db')).exports.length, 0, 'a dry run records nothing');

  const adopted = await ok(cloud, 'ebs', 'adopt', 'db');
  assert.equal(adopted.imported.snapshot.id, points[2], 'the newest export comes back as the snapshot it was made from');
  assert.equal(adopted.imported.snapshot.root, lostRoot, 'with the same tree');
  assert.equal(adopted.imported.snapshot.size, img.length, 'and the byte size its tag recorded');
  const list = await ok(cloud, 'ebs', 'list', 'db');
  assert.deepEqual(list.exports.map((e: { ebsSnapshotId: string }) => e.ebsSnapshotId), exported);
  assert.deepEqual(list.exports.map((e: { tandemSnapshot: string }) => e.tandemSnapshot), points);
  const again = await cli(cloud, 'ebs', 'adopt', 'db');
  assert.equal(again.code, 2);
  assert.equal(again.json.error.code, 'ERR_USAGE', 'adopting twice is refused');

  // The on-prem appliance pairs with it: nothing to send for what the export held.
  const served = await startServe(t, cloud);
  await pair(onprem, 'cloud-2', cloud, served);
  const first = await ok(onprem, 'sync', 'db', '--peer', 'cloud-2');
  assert.equal(first.blocksSent, 0, 'the blocks came from EBS, not over the WAN');
  // A change: the push and the next export carry only it.
  img = Buffer.from(img);
  fillBlock(img, 20, 99);
  writeFileSync(image, img);
  const second = await ok(onprem, 'sync', 'db', '--peer', 'cloud-2');
  assert.equal(second.blocksSent, 1);
  await emu.resetStats();
  const exp = await ok(cloud, 'ebs', 'export', 'db');
  assert.equal(exp.parentEbsSnapshotId, exported[2], 'incremental on the adopted newest export');
  assert.equal(exp.blocksUploaded, 1);
  assert.equal((await emu.stats()).operations.PutSnapshotBlock, 1);

  // The oldest adopted export is still a recovery point: a drill from its time launches from it.
  writeFileSync(join(cloud.dir, 'config.yaml'), cloudConfig('db').replace('name: cloud', 'name: cloud-2'));
  const at = new Date(snapshotIdTime(points[0]!)!).toISOString();
  const drill = await ok(cloud, 'drill', 'db', '--point', at);
  assert.equal(drill.points[0].ebsSnapshotId, exported[0]);
  assert.equal(drill.points[0].pointTime, at, 'its time is the snapshot it was made from');
  assert.equal(drill.points[0].size, sizes[0], 'and its size, not the volume size of today');
  assert.notEqual(sizes[0], sizes[2]);
  assert.equal(drill.status, 'torn-down');
});

test('exports of a volume by two appliances: adopt asks which one, and takes only its exports', async (t) => {
  const [a, b] = await Promise.all([initHome(t, 'site-a'), initHome(t, 'site-b')]);
  const dir = tempDir(t);
  for (const [home, seed] of [[a, 1], [b, 2]] as const) {
    const image = join(dir, `${home.name}.img`);
    writeFileSync(image, makeImage(4, { seed }));
    await ok(home, 'volume', 'add', 'shared', '--path', image);
    await ok(home, 'snapshot', 'shared');
    await ok(home, 'ebs', 'export', 'shared');
  }
  const fresh = await initHome(t, 'cloud-3');
  const r = await cli(fresh, 'ebs', 'adopt', 'shared');
  assert.equal(r.code, 2);
  assert.equal(r.json.error.code, 'ERR_USAGE');
  assert.match(r.json.error.message, /2 appliances \(site-a, site-b\).*--appliance NAME/);
  const onlyB = await ok(fresh, 'ebs', 'adopt', 'shared', '--appliance', 'site-b');
  assert.deepEqual(onlyB.adopted.map((f: { appliance: string }) => f.appliance), ['site-b']);
  assert.equal(onlyB.imported.snapshot.root, (await ok(b, 'snapshots', 'shared'))[0].root);
  const none = await cli(await initHome(t, 'cloud-4'), 'ebs', 'adopt', 'nothing-here');
  assert.equal(none.json.error.code, 'ERR_EBS_NOT_EXPORTED');
});
