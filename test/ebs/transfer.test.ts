/**
 * EBS export and import against the AWS emulator on loopback (the real SDK, the real store).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, request, type Server } from 'node:http';
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import { EBSClient, StartSnapshotCommand, PutSnapshotBlockCommand, CompleteSnapshotCommand } from '@aws-sdk/client-ebs';
import { Store } from '../../store/index.js';
import { isTandemError } from '../../common/errors.js';
import { exportSnapshot, importSnapshot, listExports, lastExport, getPending } from '../../appliance/ebs/index.js';
import { NS_EXPORTS, putPending } from '../../appliance/ebs/lineage.js';
import { sha256Base64, LinearChecksum } from '../../appliance/ebs/checksum.js';
import { sha256 } from '../../appliance/ebs/checksum.js';
import { BS, emulator, makeImage, fillBlock, nonZeroBlocks, snapshotImage, assertSnapshotBytes, tmp, type Emulator } from './helpers.js';

let emu: Emulator;
before(async () => { emu = await emulator(); });
after(async () => { await emu.close(); });

async function openStore(t: { after(fn: () => void): void }, dir: string, name = 'store'): Promise<Store> {
  const p = join(dir, name);
  mkdirSync(p, { recursive: true });
  const s = await Store.open(p);
  t.after(() => void s.close().catch(() => {}));
  return s;
}

test('export then import is byte-exact; zero blocks are never uploaded', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(24, { tail: 1000, seed: 3 }); // 12 MiB + a short last block; every 4th block zero
  const snap = await snapshotImage(store, dir, 'db', img);
  await emu.resetStats();
  const r = await exportSnapshot(store, snap, { description: 'test export' });
  assert.match(r.ebsSnapshotId, /^snap-/);
  assert.equal(r.parentEbsSnapshotId, null);
  assert.equal(r.resumed, false);
  const stats = await emu.stats();
  assert.equal(stats.operations.PutSnapshotBlock, nonZeroBlocks(img), 'one PutSnapshotBlock per non-zero block, none for zero blocks');
  assert.equal(r.blocksUploaded, nonZeroBlocks(img));
  assert.equal(stats.operations.CompleteSnapshot, 1);
  assert.deepEqual((await listExports(store, 'db')).map((e) => e.ebsSnapshotId), [r.ebsSnapshotId]);
  assert.equal((await lastExport(store, 'db'))?.tandemSnapshot, snap.id);
  assert.equal(await getPending(store, 'db'), null);

  // Exporting the same snapshot again uploads nothing and answers the same EBS snapshot.
  await emu.resetStats();
  const again = await exportSnapshot(store, snap);
  assert.equal(again.ebsSnapshotId, r.ebsSnapshotId);
  assert.equal((await emu.stats()).operations.PutSnapshotBlock ?? 0, 0);

  // Another appliance (fresh store) imports it: every listed block fetched, content identical.
  const other = await openStore(t, dir, 'other');
  await emu.resetStats();
  const imp = await importSnapshot(other, r.ebsSnapshotId, 'db');
  assert.equal(imp.baseEbsSnapshotId, null);
  assert.equal(imp.blocksFetched, nonZeroBlocks(img));
  assert.equal(imp.snapshot.size, 1024 ** 3, 'no lineage here: the size is VolumeSize GiB');
  assert.equal(imp.snapshot.origin, `ebs:${r.ebsSnapshotId}`);
  await assertSnapshotBytes(other, imp.snapshot, img);
  const s2 = await emu.stats();
  assert.equal(s2.operations.ListSnapshotBlocks, 1, 'one List call for fewer than 10,000 blocks');
  assert.equal(s2.operations.GetSnapshotBlock, nonZeroBlocks(img));
});

test('a second export after a 1 % change uploads exactly the changed blocks; the child reads back whole through its parent', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(100, { seed: 5, zeroEvery: 10 });
  const first = await exportSnapshot(store, await snapshotImage(store, dir, 'web', img));
  const img2 = Buffer.from(img);
  fillBlock(img2, 17, 99); // changed: 1 % of the volume
  img2.fill(0, 40 * BS, 41 * BS); // became zero: written as zeros
  const snap2 = await snapshotImage(store, dir, 'web', img2);
  await emu.resetStats();
  const second = await exportSnapshot(store, snap2);
  assert.equal(second.parentEbsSnapshotId, first.ebsSnapshotId);
  const stats = await emu.stats();
  assert.equal(stats.operations.PutSnapshotBlock, 2, 'the changed block and the one that became zero');
  assert.equal(stats.operations.StartSnapshot, 1);
  assert.equal(stats.operations.CompleteSnapshot, 1);
  assert.equal(second.blocksUploaded, 2);
  assert.equal(second.requests, 4, 'StartSnapshot, two PutSnapshotBlock, CompleteSnapshot');
  assert.deepEqual((await listExports(store, 'web')).map((e) => e.parentEbsSnapshotId), [null, first.ebsSnapshotId]);

  const other = await openStore(t, dir, 'other');
  const imp = await importSnapshot(other, second.ebsSnapshotId, 'web');
  await assertSnapshotBytes(other, imp.snapshot, img2);
});

test('an import after blocks changed in EC2 fetches only the changed blocks and keeps the volume byte size', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(40, { tail: 4096, seed: 7 });
  const snap = await snapshotImage(store, dir, 'app', img);
  const exp = await exportSnapshot(store, snap);

  // "In EC2": a child snapshot of the export with three blocks rewritten and one zeroed.
  const ebs = new EBSClient({ maxAttempts: 1 });
  const child = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1, ParentSnapshotId: exp.ebsSnapshotId, Timeout: 60 }));
  const img2 = Buffer.from(img);
  fillBlock(img2, 2, 42);
  fillBlock(img2, 9, 42);
  fillBlock(img2, 33, 42);
  img2.fill(0, 5 * BS, 6 * BS);
  const agg = new LinearChecksum();
  for (const i of [2, 5, 9, 33]) {
    const data = img2.subarray(i * BS, (i + 1) * BS);
    agg.add(i, sha256(data));
    await ebs.send(new PutSnapshotBlockCommand({ SnapshotId: child.SnapshotId, BlockIndex: i, BlockData: data, DataLength: BS, Checksum: sha256Base64(data), ChecksumAlgorithm: 'SHA256' }));
  }
  await ebs.send(new CompleteSnapshotCommand({ SnapshotId: child.SnapshotId, ChangedBlocksCount: agg.count, Checksum: agg.digest(), ChecksumAlgorithm: 'SHA256', ChecksumAggregationMethod: 'LINEAR' }));

  await emu.resetStats();
  const imp = await importSnapshot(store, child.SnapshotId!, 'app');
  assert.equal(imp.baseEbsSnapshotId, exp.ebsSnapshotId);
  const stats = await emu.stats();
  assert.equal(stats.operations.ListChangedBlocks, 1);
  assert.equal(stats.operations.ListSnapshotBlocks ?? 0, 1, 'one small probe for blocks past the known size');
  assert.equal(stats.operations.GetSnapshotBlock, 4, 'only the changed blocks are read');
  assert.equal(imp.blocksFetched, 4);
  assert.equal(imp.snapshot.size, img.length, 'the lineage knows the exact byte size');
  assert.equal(imp.snapshot.parent, snap.id);
  await assertSnapshotBytes(store, imp.snapshot, img2);

  // Importing it again reads nothing.
  await emu.resetStats();
  const again = await importSnapshot(store, child.SnapshotId!, 'app');
  assert.equal(again.snapshot.id, imp.snapshot.id);
  assert.equal((await emu.stats()).operations.GetSnapshotBlock ?? 0, 0);
});

test('with 20 % of requests throttled, export and import complete with bounded retries', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(48, { seed: 11, zeroEvery: 1000 });
  const snap = await snapshotImage(store, dir, 'busy', img);
  await emu.faults({ throttlePercent: 20, seed: 7 });
  t.after(() => emu.faults({}));
  await emu.resetStats();
  const r = await exportSnapshot(store, snap);
  const other = await openStore(t, dir, 'other');
  const imp = await importSnapshot(other, r.ebsSnapshotId, 'busy');
  const stats = await emu.stats();
  assert.ok(stats.throttled > 0, 'the emulator throttled some requests');
  const answered = Object.values(stats.operations as Record<string, number>).reduce((a, b) => a + b, 0);
  const failed = Object.values(stats.errors as Record<string, number>).reduce((a, b) => a + b, 0);
  // 20 % throttled: about 1.25 attempts per request; 2x is a generous bound that still catches runaway retries.
  assert.ok(failed <= answered, `${failed} failed attempts for ${answered} answered`);
  assert.equal(r.requests, stats.operations.StartSnapshot + stats.operations.PutSnapshotBlock + stats.operations.CompleteSnapshot + (stats.errors.StartSnapshot ?? 0) + (stats.errors.PutSnapshotBlock ?? 0) + (stats.errors.CompleteSnapshot ?? 0));
  await emu.faults({});
  await assertSnapshotBytes(other, imp.snapshot, img);
});

test('an interrupted export resumes into the same pending EBS snapshot and never completes it partial', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(40, { seed: 13, zeroEvery: 1000 });
  const snap = await snapshotImage(store, dir, 'res', img);
  await emu.faults({ latencyMs: 5 });
  t.after(() => emu.faults({}));
  const ac = new AbortController();
  await emu.resetStats();
  await assert.rejects(exportSnapshot(store, snap, { signal: ac.signal, onProgress: (done) => { if (done >= 10) ac.abort(); } }));
  const pending = await getPending(store, 'res');
  assert.ok(pending && pending.ebsSnapshotId.startsWith('snap-'));
  assert.ok(pending.uploadedUpTo >= 1, `mark ${pending.uploadedUpTo}`);
  const s1 = await emu.stats();
  assert.equal(s1.operations.CompleteSnapshot ?? 0, 0, 'an interrupted export is not completed');
  const r = await exportSnapshot(store, snap);
  assert.equal(r.resumed, true);
  assert.equal(r.ebsSnapshotId, pending.ebsSnapshotId);
  assert.ok(r.blocksUploaded <= 40 - pending.uploadedUpTo, `${r.blocksUploaded} uploaded after mark ${pending.uploadedUpTo}`);
  assert.equal(await getPending(store, 'res'), null);
  const other = await openStore(t, dir, 'other');
  await assertSnapshotBytes(other, (await importSnapshot(other, r.ebsSnapshotId, 'res')).snapshot, img);
});

test('an export stopped after CompleteSnapshot, before it was recorded, is recorded by the rerun: nothing uploaded again, no second EBS snapshot', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(12, { seed: 21, zeroEvery: 1000 });
  const snap = await snapshotImage(store, dir, 'cmp', img);
  let captured: ReturnType<typeof getPending> | null = null;
  const first = await exportSnapshot(store, snap, { onProgress: () => void (captured ??= getPending(store, 'cmp')) });
  const pending = await captured!;
  assert.equal(pending?.ebsSnapshotId, first.ebsSnapshotId);
  // The state a kill right after CompleteSnapshot leaves: the export pending, not recorded.
  await putPending(store, 'cmp', pending!);
  await store.deleteMeta(NS_EXPORTS, 'cmp');
  await emu.resetStats();
  const again = await exportSnapshot(store, snap);
  assert.equal(again.ebsSnapshotId, first.ebsSnapshotId, 'the completed EBS snapshot is the export');
  assert.equal(again.blocksUploaded, 0);
  const stats = await emu.stats();
  assert.equal(stats.operations.PutSnapshotBlock ?? 0, 0, 'nothing uploaded again');
  assert.equal(stats.operations.CompleteSnapshot ?? 0, 0);
  assert.deepEqual((await listExports(store, 'cmp')).map((e) => e.ebsSnapshotId), [first.ebsSnapshotId]);
  assert.equal(await getPending(store, 'cmp'), null);
  // A key given now is not silently ignored.
  await assert.rejects(exportSnapshot(store, snap, { kmsKeyArn: 'arn:aws:kms:us-east-1:123456789012:key/other' }), (e: any) => e.code === 'ERR_USAGE' && /not with --kms-key/.test(e.message));
});

test('an export after the volume shrank is a full one: the parent\'s blocks past the new end do not show through', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(16, { seed: 23, zeroEvery: 1000 });
  const first = await exportSnapshot(store, await snapshotImage(store, dir, 'shr', img));
  const small = Buffer.from(img.subarray(0, 8 * BS));
  const second = await exportSnapshot(store, await snapshotImage(store, dir, 'shr', small));
  assert.equal(second.parentEbsSnapshotId, null, 'a new lineage, not a child of the larger one');
  assert.notEqual(second.ebsSnapshotId, first.ebsSnapshotId);
  const other = await openStore(t, dir, 'other');
  const imp = await importSnapshot(other, second.ebsSnapshotId, 'shr');
  await assertSnapshotBytes(other, imp.snapshot, small);
});

test('a block whose checksum from the server is wrong is rejected and nothing is committed', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const img = makeImage(8, { seed: 17 });
  const r = await exportSnapshot(store, await snapshotImage(store, dir, 'src', img));
  // A real HTTP hop in front of the emulator that damages the checksum of one block read.
  const proxy: Server = createServer((req, res) => {
    const up = new URL(emu.url);
    const fwd = request({ host: up.hostname, port: up.port, path: req.url, method: req.method, headers: req.headers }, (ur) => {
      const headers = { ...ur.headers };
      if (req.method === 'GET' && /\/blocks\/2\?/.test(req.url ?? '') && headers['x-amz-checksum']) headers['x-amz-checksum'] = sha256Base64(Buffer.from('not this block'));
      res.writeHead(ur.statusCode ?? 502, headers);
      ur.pipe(res);
    });
    req.pipe(fwd);
  });
  await new Promise<void>((res) => proxy.listen(0, '127.0.0.1', res));
  t.after(() => proxy.close());
  const port = (proxy.address() as { port: number }).port;
  const other = await openStore(t, dir, 'other');
  const client = new EBSClient({ maxAttempts: 1, endpoint: `http://127.0.0.1:${port}` });
  await assert.rejects(importSnapshot(other, r.ebsSnapshotId, 'copy', { client }), (e: unknown) => isTandemError(e, 'ERR_EBS_CHECKSUM') && /block 2/.test((e as Error).message));
  assert.equal(await other.latestSnapshot('copy'), null, 'no snapshot committed');
});

test('an unknown snapshot id, a malformed id and a volume with another block size are clear errors', async (t) => {
  const dir = tmp(t);
  const store = await openStore(t, dir);
  const started = Date.now();
  await assert.rejects(importSnapshot(store, 'snap-0123456789abcdef0', 'x'), (e: unknown) => isTandemError(e, 'ERR_AWS_NOT_FOUND') && /snap-0123456789abcdef0/.test((e as Error).message));
  assert.ok(Date.now() - started < 5000, 'an unknown id is reported at once, not retried');
  await assert.rejects(importSnapshot(store, 'vol-123', 'x'), (e: unknown) => isTandemError(e, 'ERR_BAD_REQUEST'));
  const path = join(dir, 'small.img');
  const { writeFileSync } = await import('node:fs');
  writeFileSync(path, makeImage(2));
  const { openVolumeReader } = await import('../../appliance/volumes/index.js');
  const reader = await openVolumeReader(path);
  const snap = await store.scanVolume(reader, { volume: 'small', blockSize: 65536 });
  await reader.close();
  await assert.rejects(exportSnapshot(store, snap), (e: unknown) => isTandemError(e, 'ERR_BLOCK_SIZE_INVALID') && /512KiB/.test((e as Error).message));
  assert.deepEqual(await listExports(store, 'small'), []);
  assert.equal(await getPending(store, 'small'), null);
});
