/** The emulator's control routes: bad input changes nothing; latency is applied; reads match writes. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { RegisterImageCommand, RunInstancesCommand, DescribeSubnetsCommand } from '@aws-sdk/client-ec2';
import { BLOCK, block, emulator, writeSnapshot } from './helpers.js';

test('volume writes: bad input is refused and changes nothing; raw reads match', async (t) => {
  const { url, ebs, ec2, control } = await emulator(t, { instanceDelayMs: 0 });
  const snap = await writeSnapshot(ebs, 1, new Map([[1, block(5)]]));
  const img = await ec2.send(new RegisterImageCommand({ Name: 'ctl', RootDeviceName: '/dev/xvda', BlockDeviceMappings: [{ DeviceName: '/dev/xvda', Ebs: { SnapshotId: snap } }] }));
  const run = await ec2.send(new RunInstancesCommand({ ImageId: img.ImageId!, MinCount: 1, MaxCount: 1 }));
  const vol = run.Instances![0]!.BlockDeviceMappings![0]!.Ebs!.VolumeId!;

  const post = (path: string, body: string) => fetch(`${url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
  const gib = 1024 * 1024 * 1024;
  assert.equal((await post(`/_emulator/volumes/${vol}/write`, JSON.stringify({ offset: gib - 1, dataBase64: 'AAAA' }))).status, 400);
  assert.equal((await post(`/_emulator/volumes/${vol}/write`, JSON.stringify({ offset: 'x', dataBase64: 'AAAA' }))).status, 400);
  assert.equal((await post('/_emulator/volumes/vol-0123456789abcdef0/write', JSON.stringify({ offset: 0, dataBase64: 'AAAA' }))).status, 404);
  assert.equal((await post('/_emulator/faults', JSON.stringify({ latencyMs: -1 }))).status, 400);

  const raw = Buffer.from(await (await fetch(`${url}/_emulator/volumes/${vol}/read?offset=${BLOCK}&length=${BLOCK}&format=raw`)).arrayBuffer());
  assert.ok(raw.equals(block(5)), 'the volume still holds the snapshot’s block');
  const zeros = await control(`/_emulator/volumes/${vol}/read?offset=0&length=16`);
  assert.ok(Buffer.from(zeros.dataBase64, 'base64').equals(Buffer.alloc(16)));
  const w = await control(`/_emulator/volumes/${vol}/write`, { offset: BLOCK - 2, dataBase64: Buffer.from('abcd').toString('base64') });
  assert.equal(w.blocksChanged, 2, 'a write across a block boundary changes two blocks');

  const d = await control(`/_emulator/volumes/${vol}/digests?first=0&count=3`);
  for (const [i, digest] of d.digests.entries()) {
    const bytes = Buffer.from(await (await fetch(`${url}/_emulator/volumes/${vol}/read?offset=${i * BLOCK}&length=${BLOCK}&format=raw`)).arrayBuffer());
    assert.equal(digest, createHash('sha256').update(bytes).digest('hex'), `block ${i}'s digest is its bytes'`);
  }
  assert.equal(new Set(d.digests).size, 3, 'the written blocks 0 and 1 and the unwritten block 2 differ');
  assert.equal((await control(`/_emulator/volumes/${vol}/digests`)).digests.length, gib / BLOCK, 'by default to the end of the volume');
  assert.equal((await fetch(`${url}/_emulator/volumes/${vol}/digests?first=${gib / BLOCK}&count=1`)).status, 400);
  assert.equal((await fetch(`${url}/_emulator/volumes/${vol}/digests?first=-1`)).status, 400);

  const state = await control('/_emulator/state');
  assert.equal(state.instances.length, 1);
  assert.equal(state.instances[0].state, 'running');
  assert.deepEqual(state.volumes.map((v: { id: string }) => v.id), [vol]);
});

test('latency is added to AWS requests but not to control routes', async (t) => {
  const { ec2, control } = await emulator(t);
  await control('/_emulator/faults', { latencyMs: 150 });
  const t0 = Date.now();
  await ec2.send(new DescribeSubnetsCommand({}));
  assert.ok(Date.now() - t0 >= 150);
  const t1 = Date.now();
  await control('/_emulator/stats');
  assert.ok(Date.now() - t1 < 150);
  const stats = await control('/_emulator/stats/reset', {});
  assert.deepEqual(stats.operations, {});
});
