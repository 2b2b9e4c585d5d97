/**
 * Retention of EBS exports on the cloud appliance: `appliance retention` applies the volume's
 * policy to its EBS snapshots as to its Tandem snapshots, deleting in EBS what it does not keep,
 * and never the newest export, one whose snapshot is held, or one an image maps; a DeleteSnapshot
 * that fails leaves the snapshot named in `ebs-deleting`, doctor warns, and the next run deletes
 * it. The exports kept still restore exactly after their parents were deleted.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { appendFileSync, closeSync, fstatSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { readFull } from '../helpers/files.js';
import { join } from 'node:path';
import { DescribeSnapshotsCommand, EC2Client, RegisterImageCommand } from '@aws-sdk/client-ec2';
import { cliJson } from '../helpers/cli.js';
import { awsEnv, emulator, fillBlock, makeImage, tmp, type Emulator } from './helpers.js';

let emu: Emulator;
before(async () => { emu = await emulator(); });
after(async () => { await emu.close(); });

const env = () => ({ ...awsEnv(emu.url), AWS_ENDPOINT_URL_EC2: emu.url });

async function ok(home: string, args: string[]): Promise<any> {
  const r = await cliJson([...args, '--home', home], { env: env() });
  assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
  return r.json;
}

/** Whether EBS still has the snapshot. */
async function inEbs(ec2: EC2Client, id: string): Promise<boolean> {
  try {
    await ec2.send(new DescribeSnapshotsCommand({ SnapshotIds: [id] }));
    return true;
  } catch (e) {
    assert.equal((e as { name?: string }).name, 'InvalidSnapshot.NotFound');
    return false;
  }
}

test('retention deletes in EBS the exports the policy does not keep; the newest, a held one and one an image maps stay; a failed delete is retried', async (t) => {
  const dir = tmp(t);
  const home = join(dir, 'home');
  const image = join(dir, 'db.img');
  let img = makeImage(16, { seed: 5 });
  writeFileSync(image, img);
  await ok(home, ['init', '--name', 'cloud']);
  appendFileSync(join(home, 'config.yaml'), `policies:\n  short:\n    rpo: 1h\n    retention: { last: 2 }\nassign:\n  - match: db\n    policy: short\n`);
  await ok(home, ['volume', 'add', 'db', '--path', image]);

  // Six exports, each of a changed volume, incremental on the one before.
  const snaps: string[] = [];
  const exports: string[] = [];
  const images: Buffer[] = [];
  for (let i = 0; i < 6; i++) {
    if (i > 0) {
      img = Buffer.from(img);
      fillBlock(img, i, 50 + i);
      writeFileSync(image, img);
    }
    images.push(img);
    snaps.push((await ok(home, ['snapshot', 'db'])).snapshot.id);
    exports.push((await ok(home, ['ebs', 'export', 'db'])).ebsSnapshotId);
  }
  // e0's snapshot is held; an image (an operator's AMI) maps e1.
  await ok(home, ['snapshots', 'db', '--hold', snaps[0]!, '--reason', 'audit']);
  const ec2 = new EC2Client({ region: 'us-east-1', endpoint: emu.url, credentials: { accessKeyId: 'test', secretAccessKey: 'test' } });
  t.after(() => ec2.destroy());
  await ec2.send(new RegisterImageCommand({ Name: 'operator-ami', RootDeviceName: '/dev/xvda', Architecture: 'x86_64', VirtualizationType: 'hvm', BlockDeviceMappings: [{ DeviceName: '/dev/xvda', Ebs: { SnapshotId: exports[1] } }] }));

  const dry = await ok(home, ['retention', 'db', '--dry-run']);
  assert.deepEqual(dry.volumes[0].ebs.deleted, [exports[2], exports[3]], 'a dry run lists what would go');
  assert.deepEqual(dry.volumes[0].ebs.inImages, [exports[1]], 'and what an image keeps');
  for (const id of exports) assert.ok(await inEbs(ec2, id), 'a dry run deletes nothing');

  // DeleteSnapshot fails (EC2 keeps answering 500): the exports leave the recovery points, stay
  // named for deletion, and doctor says so.
  await emu.faults({ errorPercent: 100, actions: ['DeleteSnapshot'] });
  const failed = await ok(home, ['retention', 'db']);
  await emu.faults({});
  assert.deepEqual(failed.volumes[0].ebs.inImages, [exports[1]]);
  assert.deepEqual(failed.volumes[0].ebs.failed.map((f: { ebsSnapshotId: string }) => f.ebsSnapshotId), [exports[2], exports[3]]);
  assert.deepEqual(failed.volumes[0].ebs.kept, [exports[0], exports[1], exports[4], exports[5]]);
  assert.ok(await inEbs(ec2, exports[2]!) && await inEbs(ec2, exports[3]!));
  const list = await ok(home, ['ebs', 'list', 'db']);
  assert.deepEqual(list.exports.map((e: { ebsSnapshotId: string }) => e.ebsSnapshotId), [exports[0], exports[1], exports[4], exports[5]], 'no recovery point names a snapshot being deleted');
  const doctor = await cliJson(['doctor', '--home', home], { env: env() });
  assert.match(JSON.stringify(doctor.json), new RegExp(`could not delete them in EBS yet.*${exports[2]}|${exports[2]}.*could not delete them in EBS yet`));

  // The next run deletes them first; it does so even once the volume has no retention policy any
  // more (which then keeps every export).
  writeFileSync(join(home, 'config.yaml'), readFileSync(join(home, 'config.yaml'), 'utf8').replace(/assign:[\s\S]*$/, ''));
  const done = await ok(home, ['retention', 'db']);
  assert.equal(done.volumes[0].policy, null);
  assert.deepEqual(done.volumes[0].ebs.deleted, [exports[2], exports[3]]);
  assert.deepEqual(done.volumes[0].ebs.failed, []);
  assert.ok(!(await inEbs(ec2, exports[2]!)) && !(await inEbs(ec2, exports[3]!)), 'deleted in EBS');
  for (const id of [exports[0]!, exports[1]!, exports[4]!, exports[5]!]) assert.ok(await inEbs(ec2, id), `${id} is kept`);
  const after = await cliJson(['doctor', '--home', home], { env: env() });
  assert.doesNotMatch(JSON.stringify(after.json), /could not delete/);

  // e4 was built on e3, now deleted: it still holds exactly the volume as snapshot 4 read it.
  await ok(home, ['ebs', 'import', exports[4]!, '--volume', 'check']);
  const restored = join(dir, 'check.img');
  await ok(home, ['restore', 'check', '--to', restored]);
  // The restored volume is EBS's whole GiB: read in pieces, the zeros compared 8 MiB at a time
  // (a byte-by-byte every() over the GiB took 20-30 s of CPU).
  const fd = openSync(restored, 'r');
  t.after(() => closeSync(fd));
  const head = Buffer.alloc(images[4]!.length);
  assert.equal(readFull(fd, head, 0), head.length);
  assert.ok(head.equals(images[4]!), 'the export kept restores the volume exactly');
  const zeros = Buffer.alloc(8 * 1024 * 1024);
  const piece = Buffer.alloc(zeros.length);
  const size = fstatSync(fd).size;
  assert.ok(size > head.length);
  for (let pos = head.length; pos < size; pos += piece.length) {
    const n = readFull(fd, piece, pos);
    assert.ok(n === Math.min(piece.length, size - pos) && piece.subarray(0, n).equals(zeros.subarray(0, n)), `past the volume, EBS holds zeros (at byte ${pos})`);
  }
});
