/** The EBS direct API of the emulator, driven by the real @aws-sdk/client-ebs. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { test } from 'node:test';
import {
  CompleteSnapshotCommand,
  GetSnapshotBlockCommand,
  ListChangedBlocksCommand,
  ListSnapshotBlocksCommand,
  PutSnapshotBlockCommand,
  StartSnapshotCommand,
  EBSClient,
} from '@aws-sdk/client-ebs';
import { DescribeSnapshotsCommand } from '@aws-sdk/client-ec2';
import { startAwsEmulator } from '../../emulators/aws/index.js';
import { aggregate, BLOCK, block, emulator, put, rejects, sha256, writeSnapshot } from './helpers.js';

async function read(ebs: EBSClient, snapshotId: string, index: number, token: string): Promise<Buffer> {
  const r = await ebs.send(new GetSnapshotBlockCommand({ SnapshotId: snapshotId, BlockIndex: index, BlockToken: token }));
  const data = Buffer.from(await r.BlockData!.transformToByteArray());
  assert.equal(r.DataLength, BLOCK);
  assert.equal(r.ChecksumAlgorithm, 'SHA256');
  assert.equal(r.Checksum, sha256(data).toString('base64'));
  return data;
}

test('full lifecycle: start, put, complete, list, get, changed blocks through a parent', async (t) => {
  const { ebs, control } = await emulator(t);
  const parentBlocks = new Map([[0, block(1)], [1, block(2)], [5, block(3)]]);
  const parent = await writeSnapshot(ebs, 1, parentBlocks);
  const childBlocks = new Map([[1, block(20)], [7, block(21)]]);
  const child = await writeSnapshot(ebs, 2, childBlocks, parent);

  const listed = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: child }));
  assert.deepEqual(listed.Blocks!.map((b) => b.BlockIndex), [0, 1, 5, 7]);
  assert.equal(listed.VolumeSize, 2);
  assert.equal(listed.BlockSize, BLOCK);
  assert.ok(listed.ExpiryTime instanceof Date && listed.ExpiryTime.getTime() > Date.now());
  assert.equal(listed.NextToken, undefined);
  const token = new Map(listed.Blocks!.map((b) => [b.BlockIndex!, b.BlockToken!]));
  assert.ok((await read(ebs, child, 0, token.get(0)!)).equals(block(1)), 'block 0 reads through the parent');
  assert.ok((await read(ebs, child, 1, token.get(1)!)).equals(block(20)), 'block 1 is the child’s own');
  assert.ok((await read(ebs, child, 7, token.get(7)!)).equals(block(21)));

  const changed = await ebs.send(new ListChangedBlocksCommand({ FirstSnapshotId: parent, SecondSnapshotId: child }));
  assert.deepEqual(changed.ChangedBlocks!.map((b) => b.BlockIndex), [1, 7]);
  const [c1, c7] = changed.ChangedBlocks!;
  assert.ok(c1!.FirstBlockToken && c1!.SecondBlockToken);
  assert.ok(!c7!.FirstBlockToken && c7!.SecondBlockToken);
  assert.ok((await read(ebs, parent, 1, c1!.FirstBlockToken!)).equals(block(2)));
  assert.ok((await read(ebs, child, 1, c1!.SecondBlockToken!)).equals(block(20)));
  // A token of the parent's block 1 does not name the child's block 1.
  const wrong = await rejects(read(ebs, child, 1, c1!.FirstBlockToken!));
  assert.equal(wrong.name, 'ValidationException');
  assert.equal(wrong.Reason, 'INVALID_BLOCK_TOKEN');

  const all = await ebs.send(new ListChangedBlocksCommand({ SecondSnapshotId: child }));
  assert.deepEqual(all.ChangedBlocks!.map((b) => b.BlockIndex), [0, 1, 5, 7]);

  // Completed snapshots are immutable.
  const late = await rejects(put(ebs, child, 3, block(9)));
  assert.equal(late.name, 'ValidationException');

  // Unrelated snapshots have no changed blocks to compare.
  const other = await writeSnapshot(ebs, 1, new Map([[0, block(5)]]));
  const unrelated = await rejects(ebs.send(new ListChangedBlocksCommand({ FirstSnapshotId: other, SecondSnapshotId: child })));
  assert.equal(unrelated.name, 'ValidationException');
  assert.equal(unrelated.Reason, 'UNRELATED_SNAPSHOTS');

  const stats = await control('/_emulator/stats');
  assert.equal(stats.PutSnapshotBlock, 6);
  assert.equal(stats.blockBytesIn, 6 * BLOCK);
});

test('StartSnapshot is idempotent per ClientToken and checks its parent', async (t) => {
  const { ebs } = await emulator(t);
  const a = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1, ClientToken: 'tok-1', Tags: [{ Key: 'volume', Value: 'db' }] }));
  assert.match(a.SnapshotId!, /^snap-[0-9a-f]{17}$/);
  assert.equal(a.Status, 'pending');
  assert.equal(a.BlockSize, BLOCK);
  const again = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1, ClientToken: 'tok-1', Tags: [{ Key: 'volume', Value: 'db' }] }));
  assert.equal(again.SnapshotId, a.SnapshotId);
  const conflict = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 2, ClientToken: 'tok-1' })));
  assert.equal(conflict.name, 'ConflictException');
  assert.equal(conflict.$metadata.httpStatusCode, 409);

  const pendingParent = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 1, ParentSnapshotId: a.SnapshotId })));
  assert.equal(pendingParent.name, 'ValidationException');
  const done = await writeSnapshot(ebs, 4, new Map([[0, block(1)]]));
  const smaller = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 2, ParentSnapshotId: done })));
  assert.equal(smaller.Reason, 'INVALID_VOLUME_SIZE');
  const badTimeout = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 1, Timeout: 5 })));
  assert.equal(badTimeout.name, 'ValidationException');
});

test('a block whose checksum does not match is rejected and not stored', async (t) => {
  const { ebs } = await emulator(t);
  const s = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  const data = block(1);
  const e = await rejects(ebs.send(new PutSnapshotBlockCommand({
    SnapshotId: s.SnapshotId!, BlockIndex: 0, BlockData: data, DataLength: BLOCK,
    Checksum: sha256(block(2)).toString('base64'), ChecksumAlgorithm: 'SHA256',
  })));
  assert.equal(e.name, 'ValidationException');
  assert.equal(e.$metadata.httpStatusCode, 400);
  const short = await rejects(ebs.send(new PutSnapshotBlockCommand({
    SnapshotId: s.SnapshotId!, BlockIndex: 0, BlockData: data.subarray(0, 4096), DataLength: 4096,
    Checksum: sha256(data.subarray(0, 4096)).toString('base64'), ChecksumAlgorithm: 'SHA256',
  })));
  assert.equal(short.name, 'ValidationException');
  const beyond = await rejects(put(ebs, s.SnapshotId!, 2048, data));
  assert.equal(beyond.Reason, 'INVALID_BLOCK');
  // Nothing was written: an empty snapshot completes with count 0.
  const r = await ebs.send(new CompleteSnapshotCommand({ SnapshotId: s.SnapshotId!, ChangedBlocksCount: 0 }));
  assert.equal(r.Status, 'completed');
});

test('CompleteSnapshot with a wrong aggregate or count fails and leaves the snapshot in error', async (t) => {
  const { ebs, ec2 } = await emulator(t);
  const blocks = new Map([[0, block(1)], [3, block(2)]]);
  const s = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  for (const [i, d] of blocks) await put(ebs, s.SnapshotId!, i, d);
  // The aggregate of the blocks in the wrong order is not the LINEAR one.
  const reversed = sha256(Buffer.concat([sha256(block(2)), sha256(block(1))])).toString('base64');
  const e = await rejects(ebs.send(new CompleteSnapshotCommand({
    SnapshotId: s.SnapshotId!, ChangedBlocksCount: 2, Checksum: reversed, ChecksumAlgorithm: 'SHA256', ChecksumAggregationMethod: 'LINEAR',
  })));
  assert.equal(e.name, 'ValidationException');
  const d = await ec2.send(new DescribeSnapshotsCommand({ SnapshotIds: [s.SnapshotId!] }));
  assert.equal(d.Snapshots![0]!.State, 'error');
  const retry = await rejects(ebs.send(new CompleteSnapshotCommand({ SnapshotId: s.SnapshotId!, ChangedBlocksCount: 2, Checksum: aggregate(blocks) })));
  assert.equal(retry.name, 'ValidationException', 'a snapshot in error cannot be completed');

  const s2 = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  await put(ebs, s2.SnapshotId!, 0, block(1));
  const count = await rejects(ebs.send(new CompleteSnapshotCommand({ SnapshotId: s2.SnapshotId!, ChangedBlocksCount: 2 })));
  assert.equal(count.name, 'ValidationException');
  const d2 = await ec2.send(new DescribeSnapshotsCommand({ SnapshotIds: [s2.SnapshotId!] }));
  assert.equal(d2.Snapshots![0]!.State, 'error');
});

test('pagination with small MaxResults, including an empty page that carries a NextToken', async (t) => {
  const { ebs } = await emulator(t);
  // Identical data is stored once; 101 blocks at the start and one far away (64 GiB volume:
  // the pages over the 8 GiB ranges in between hold no block).
  const same = block(7);
  const blocks = new Map<number, Buffer>();
  for (let i = 0; i <= 100; i++) blocks.set(i, same);
  blocks.set(100000, block(8));
  const snap = await writeSnapshot(ebs, 64, blocks);
  const seen: number[] = [];
  let pages = 0;
  let emptyWithToken = 0;
  let nextToken: string | undefined;
  do {
    const r = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snap, MaxResults: 100, NextToken: nextToken }));
    pages++;
    assert.ok(r.Blocks!.length <= 100);
    if (r.Blocks!.length === 0 && r.NextToken) emptyWithToken++;
    seen.push(...r.Blocks!.map((b) => b.BlockIndex!));
    nextToken = r.NextToken;
  } while (nextToken && pages < 50);
  assert.deepEqual(seen, [...blocks.keys()]);
  assert.ok(emptyWithToken >= 1, 'a page over a range without blocks is empty but has a NextToken');

  const start = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snap, StartingBlockIndex: 100, MaxResults: 100 }));
  assert.deepEqual(start.Blocks!.map((b) => b.BlockIndex), [100]);
  const small = await rejects(ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snap, MaxResults: 99 })));
  assert.equal(small.name, 'ValidationException');
  const forged = await rejects(ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snap, NextToken: 'AAAA' })));
  assert.equal(forged.Reason, 'INVALID_PAGE_TOKEN');
});

test('block tokens and page tokens expire', async (t) => {
  const { ebs } = await emulator(t, { blockTokenTtlMs: 1, nextTokenTtlMs: 1 });
  const blocks = new Map([[0, block(1)], [20000, block(2)]]);
  const snap = await writeSnapshot(ebs, 16, blocks);
  const r = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snap, MaxResults: 100 }));
  assert.ok(r.NextToken, 'block 20000 lies beyond the first page');
  // The tokens live 1 ms; wait for that time to pass.
  await new Promise((resolve) => setTimeout(resolve, 20));
  const e = await rejects(ebs.send(new GetSnapshotBlockCommand({ SnapshotId: snap, BlockIndex: 0, BlockToken: r.Blocks![0]!.BlockToken! })));
  assert.equal(e.name, 'ValidationException');
  assert.equal(e.Reason, 'INVALID_BLOCK_TOKEN');
  assert.match(e.message, /expired/);
  const p = await rejects(ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snap, MaxResults: 100, NextToken: r.NextToken })));
  assert.equal(p.Reason, 'INVALID_PAGE_TOKEN');
  assert.match(p.message, /expired/);
});

test('unknown snapshot → ResourceNotFoundException', async (t) => {
  const { ebs } = await emulator(t);
  for (const call of [
    () => ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: 'snap-0123456789abcdef0' })),
    () => ebs.send(new CompleteSnapshotCommand({ SnapshotId: 'snap-0123456789abcdef0', ChangedBlocksCount: 0 })),
    () => put(ebs, 'snap-0123456789abcdef0', 0, block(1)),
    () => ebs.send(new StartSnapshotCommand({ VolumeSize: 1, ParentSnapshotId: 'snap-0123456789abcdef0' })),
  ]) {
    const e = await rejects(call());
    assert.equal(e.name, 'ResourceNotFoundException');
    assert.equal(e.$metadata.httpStatusCode, 404);
    assert.equal(e.Reason, 'SNAPSHOT_NOT_FOUND');
  }
});

test('a client signing for another region gets a clear error', async (t) => {
  const { ebs } = await emulator(t, {}, { region: 'eu-west-1', maxAttempts: 1 });
  const e = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 1 })));
  assert.equal(e.name, 'InvalidSignatureException');
  assert.equal(e.$metadata.httpStatusCode, 403);
  assert.match(e.message, /eu-west-1/);
  assert.match(e.message, /us-east-1/);
});

test('a request without Authorization is refused with 403', async (t) => {
  const { url } = await emulator(t);
  const r = await fetch(`${url}/snapshots`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"VolumeSize":1}' });
  assert.equal(r.status, 403);
  assert.equal(r.headers.get('x-amzn-errortype'), 'AccessDeniedException');
  const body = (await r.json()) as { Message: string };
  assert.match(body.Message, /not signed/);
  const state = await (await fetch(`${url}/_emulator/state`)).json() as { snapshots: unknown[] };
  assert.equal(state.snapshots.length, 0, 'the refused request created nothing');
});

test('throttling, server-error and refusal faults surface as the SDK’s exceptions', async (t) => {
  const { ebs, ec2, control, url } = await emulator(t, {}, { maxAttempts: 1 });
  await control('/_emulator/faults', { throttlePercent: 100, seed: 7 });
  const names = new Set<string>();
  for (let i = 0; i < 4; i++) {
    const e = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 1 })));
    assert.equal(e.$metadata.httpStatusCode, 400);
    names.add(e.name);
  }
  assert.deepEqual([...names].sort(), ['ConcurrentLimitExceededException', 'RequestThrottledException', 'ThrottlingException']);
  await control('/_emulator/faults', { errorPercent: 100 });
  const e = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 1 })));
  assert.equal(e.name, 'InternalServerException');
  assert.equal(e.$fault, 'server');
  await control('/_emulator/faults', { denyPercent: 100, actions: ['StartSnapshot', 'DescribeSnapshots'] });
  const denied = await rejects(ebs.send(new StartSnapshotCommand({ VolumeSize: 1 })));
  assert.equal(denied.name, 'AccessDeniedException');
  assert.equal(denied.$metadata.httpStatusCode, 403);
  assert.equal(denied.Reason, 'UNAUTHORIZED_ACCOUNT');
  const deniedEc2 = await rejects(ec2.send(new DescribeSnapshotsCommand({ OwnerIds: ['self'] })));
  assert.equal(deniedEc2.name, 'UnauthorizedOperation');
  assert.equal(deniedEc2.$metadata.httpStatusCode, 403);
  await control('/_emulator/faults', {});
  const ok = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  assert.equal(ok.Status, 'pending');
  const stats = await control('/_emulator/stats');
  assert.equal(stats.throttled, 4);
  assert.equal(stats.injectedErrors, 1);
  assert.equal(stats.denied, 2);
  assert.equal(stats.StartSnapshot, 1);
  assert.equal(stats.errors.StartSnapshot, 6);
  const bad = await fetch(`${url}/_emulator/faults`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"throttlePercent":150}' });
  assert.equal(bad.status, 400);
});

test('holdAfter lets N requests through, holds the next unanswered, and answers it with a server error that changed nothing when the settings change', async (t) => {
  const { ebs, control, url } = await emulator(t, {}, { maxAttempts: 1 });
  const s = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  await control('/_emulator/faults', { holdAfter: 1, actions: ['PutSnapshotBlock'] });
  await put(ebs, s.SnapshotId!, 0, block(1));
  let settled = false;
  const second = put(ebs, s.SnapshotId!, 2, block(2)).finally(() => { settled = true; });
  second.catch(() => undefined);
  for (let i = 0; i < 200 && (await control('/_emulator/stats')).held < 1; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal((await control('/_emulator/stats')).held, 1);
  // Other operations are not held.
  await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(settled, false, 'the held request is not answered while the hold stands');
  await control('/_emulator/faults', {});
  const e = await rejects(second);
  assert.equal(e.name, 'InternalServerException');
  // CompleteSnapshot checks the count of written blocks: 1, so the held block 2 was not written.
  await ebs.send(new CompleteSnapshotCommand({ SnapshotId: s.SnapshotId!, ChangedBlocksCount: 1 }));
  const after = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: s.SnapshotId! }));
  assert.deepEqual(after.Blocks!.map((b) => b.BlockIndex), [0], 'the held block was not written');
  const bad = await fetch(`${url}/_emulator/faults`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"holdAfter":-1}' });
  assert.equal(bad.status, 400);
  // A request held when the emulator closes is answered, so closing does not wait for it.
  const other = await startAwsEmulator();
  const c = new EBSClient({ endpoint: other.url, maxAttempts: 1 });
  t.after(() => c.destroy());
  const o = await c.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  await fetch(`${other.url}/_emulator/faults`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"holdAfter":0}' });
  const held = put(c, o.SnapshotId!, 0, block(3));
  held.catch(() => undefined);
  const heldCount = async () => ((await (await fetch(`${other.url}/_emulator/stats`)).json()) as { held: number }).held;
  for (let i = 0; i < 200 && (await heldCount()) < 1; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(await heldCount(), 1);
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([other.close(), new Promise((_, reject) => { timer = setTimeout(() => reject(new Error('close waited for the held request')), 5000); })]);
  clearTimeout(timer);
  assert.equal((await rejects(held)).name, 'InternalServerException');
});

test('a pending snapshot past its timeout goes to error', async (t) => {
  // 0.002 minutes = 120 ms.
  const { ebs, ec2 } = await emulator(t, { pendingTimeoutMinutes: 0.002 });
  const s = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  await new Promise((resolve) => setTimeout(resolve, 200));
  const e = await rejects(put(ebs, s.SnapshotId!, 0, block(1)));
  assert.equal(e.name, 'ValidationException');
  const d = await ec2.send(new DescribeSnapshotsCommand({ SnapshotIds: [s.SnapshotId!] }));
  assert.equal(d.Snapshots![0]!.State, 'error');
});

test('with a data directory, snapshots and blocks survive a restart', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-emu-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const first = await startAwsEmulator({ dataDir: dir });
  const c1 = new EBSClient({ endpoint: first.url });
  const snap = await writeSnapshot(c1, 1, new Map([[2, block(4)]]));
  c1.destroy();
  await first.close();

  const again = await startAwsEmulator({ dataDir: dir });
  const c2 = new EBSClient({ endpoint: again.url });
  t.after(async () => {
    c2.destroy();
    await again.close();
  });
  const r = await c2.send(new ListSnapshotBlocksCommand({ SnapshotId: snap }));
  assert.deepEqual(r.Blocks!.map((b) => b.BlockIndex), [2]);
  assert.ok((await read(c2, snap, 2, r.Blocks![0]!.BlockToken!)).equals(block(4)));
});

test('main.ts runs alone, prints its URL and stops on SIGTERM', async (t) => {
  const child = spawn(process.execPath, ['--import', 'tsx', 'emulators/aws/main.ts', '--port', '0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  let out = '';
  child.stdout.setEncoding('utf8');
  const url = await new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (s: string) => {
      out += s;
      const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(out);
      if (m) resolve(m[1]!);
    });
    child.once('exit', (code) => reject(new Error(`exited ${code} before listening`)));
  });
  const state = await (await fetch(`${url}/_emulator/state`)).json() as { region: string };
  assert.equal(state.region, 'us-east-1');
  child.kill('SIGTERM');
  const [code] = await once(child, 'exit');
  assert.equal(code, 0);
});
