/**
 * The sync engine between two real local stores (in-process): full copy, incremental copy,
 * dry run, dedup across volumes, resumption after an interruption, zero blocks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { Store } from '../../store/index.js';
import { twoStores } from '../helpers/stores.js';
import type { BlockFrame, Hash, ReplicaStore, SnapshotRecord, VolumeReader } from '../../store/types.js';
import { copySnapshot } from '../../sync/engine.js';
import { TandemError } from '../../common/errors.js';

const BS = 4096;

function memReader(data: Buffer): VolumeReader {
  return {
    size: data.length,
    async read(buf, pos) {
      return data.copy(buf, 0, pos, Math.min(data.length, pos + buf.length));
    },
    async close() {},
  };
}

function stores(t: { after(fn: () => Promise<void> | void): void }): Promise<[Store, Store]> {
  return twoStores(t, 'tandem-engine-');
}

/** A ReplicaStore wrapper that counts what the target really receives (tests count on the receiving side). */
function counting(inner: Store) {
  const c = { blocks: 0, nodes: 0, calls: 0 };
  const wrapped: ReplicaStore = {
    hasBlocks: (h) => (c.calls++, inner.hasBlocks(h)),
    getBlocks: (h) => inner.getBlocks(h),
    putBlocks: async (frames) => {
      c.calls++;
      async function* each(): AsyncGenerator<BlockFrame> {
        for await (const f of frames) {
          c.blocks++;
          yield f;
        }
      }
      return inner.putBlocks(each());
    },
    hasNodes: (h) => (c.calls++, inner.hasNodes(h)),
    getNodes: (h) => inner.getNodes(h),
    putNodes: (n) => ((c.calls++, (c.nodes += n.length)), inner.putNodes(n)),
    latestSnapshot: (v) => inner.latestSnapshot(v),
    getSnapshot: (v, id) => (c.calls++, inner.getSnapshot(v, id)),
    commitSnapshot: (r) => (c.calls++, inner.commitSnapshot(r)),
  };
  return { c, wrapped };
}

async function readAll(store: Store, snap: SnapshotRecord): Promise<Buffer> {
  const out = Buffer.alloc(snap.size);
  const hashes: { index: number; hash: Hash }[] = [];
  for await (const b of store.blockHashes(snap)) hashes.push(b);
  for (const { index, hash } of hashes) {
    const len = Math.min(snap.blockSize, snap.size - index * snap.blockSize);
    (await store.getBlock(hash, len)).copy(out, index * snap.blockSize);
  }
  return out;
}

test('full copy is exact, a second copy is a no-op, an incremental copy sends only changed blocks', async (t) => {
  const [a, b] = await stores(t);
  // 600 blocks (height 2 with fanout 256), a zero region, a short last block.
  const data = randomBytes(600 * BS - 100);
  data.fill(0, 100 * BS, 200 * BS);
  const s1 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS });
  const { c, wrapped } = counting(b);
  const r1 = await copySnapshot(a, wrapped, s1);
  assert.equal(r1.blocksSent, 500);
  assert.equal(c.blocks, 500);
  assert.equal(r1.bytesSent, 500 * BS - 100);
  assert.deepEqual(await b.getSnapshot('v', s1.id), s1);
  assert.ok((await readAll(b, s1)).equals(data));

  const again = await copySnapshot(a, wrapped, s1);
  assert.equal(again.alreadyPresent, true);
  assert.equal(again.requests, 2, 'getSnapshot and hasNodes(root), asked at once: one round trip');

  // Change 5 blocks with small writes.
  for (const i of [0, 7, 256, 257, 599]) randomBytes(64).copy(data, i * BS + 10);
  const s2 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS, parent: s1 });
  const before = c.blocks;
  const dry = await copySnapshot(a, wrapped, s2, { dryRun: true });
  assert.equal(dry.blocksSent, 5);
  assert.equal(c.blocks, before, 'a dry run sends nothing');
  assert.equal(await b.getSnapshot('v', s2.id), null, 'a dry run commits nothing');
  const r2 = await copySnapshot(a, wrapped, s2);
  assert.equal(r2.blocksSent, 5);
  assert.equal(c.blocks - before, 5);
  assert.ok((await readAll(b, s2)).equals(data));
  assert.equal((await b.verify()).problems.length, 0);
});

test('a second volume sharing data sends only the blocks the target lacks', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(300 * BS);
  const s1 = await a.scanVolume(memReader(data), { volume: 'one', blockSize: BS });
  await copySnapshot(a, b, s1);
  const copy = Buffer.from(data);
  randomBytes(BS).copy(copy, 42 * BS);
  const s2 = await a.scanVolume(memReader(copy), { volume: 'two', blockSize: BS });
  const { c, wrapped } = counting(b);
  const r = await copySnapshot(a, wrapped, s2);
  assert.equal(r.blocksSent, 1);
  assert.equal(c.blocks, 1);
  assert.ok((await readAll(b, s2)).equals(copy));
});

test('a copy interrupted mid-stream resumes and sends nothing the target already stored', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(400 * BS);
  const s1 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS });
  // A target whose block streams fail after 150 blocks in all, as a dropped connection would.
  const failing: ReplicaStore = Object.create(b) as ReplicaStore;
  let n = 0;
  failing.putBlocks = async (frames) => {
    async function* cut(): AsyncGenerator<BlockFrame> {
      for await (const f of frames) {
        if (n++ === 150) throw new Error('link down');
        yield f;
      }
    }
    return b.putBlocks(cut());
  };
  failing.hasBlocks = (h) => b.hasBlocks(h);
  failing.hasNodes = (h) => b.hasNodes(h);
  failing.getSnapshot = (v, id) => b.getSnapshot(v, id);
  await assert.rejects(copySnapshot(a, failing, s1), /link down/);
  assert.equal(await b.getSnapshot('v', s1.id), null, 'nothing is committed by a failed copy');
  const all: Buffer[] = [];
  for await (const ch of a.blockHashes(s1)) all.push(ch.hash);
  const kept = (await b.hasBlocks(all)).filter(Boolean).length;
  assert.ok(kept >= 150 && kept < 400, `the blocks that arrived before the cut are kept (${kept})`);
  const { c, wrapped } = counting(b);
  const r = await copySnapshot(a, wrapped, s1);
  assert.equal(r.blocksSent, 400 - kept, 'the rerun sends only what the target lacks');
  assert.equal(c.blocks, 400 - kept);
  assert.ok((await readAll(b, s1)).equals(data));
});

test('pull is the same engine with the roles swapped', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(50 * BS + 1);
  data[data.length - 1] |= 1; // a one-byte last block that is not a zero block (those are never sent)
  const s = await b.scanVolume(memReader(data), { volume: 'p', blockSize: BS });
  const r = await copySnapshot(b, a, s);
  assert.equal(r.blocksSent, 51);
  assert.ok((await readAll(a, s)).equals(data));
  assert.equal((await a.latestSnapshot('p'))?.root, s.root);
});

test('with a base the target holds, only blocks that differ from it are asked about; the result is the same', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(3000 * BS); // height 2 with fanout 256: 12 level-1 nodes
  const s1 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS });
  await copySnapshot(a, b, s1);
  for (const i of [5, 700, 2999]) randomBytes(BS).copy(data, i * BS);
  const s2 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS, parent: s1 });
  const asked: number[] = [];
  const watched: ReplicaStore = Object.create(b) as ReplicaStore;
  watched.hasBlocks = (h) => (asked.push(h.length), b.hasBlocks(h));
  watched.hasNodes = (h) => b.hasNodes(h);
  watched.getSnapshot = (v, id) => b.getSnapshot(v, id);
  watched.putBlocks = (f) => b.putBlocks(f);
  watched.putNodes = (n) => b.putNodes(n);
  watched.commitSnapshot = (r) => b.commitSnapshot(r);
  const r = await copySnapshot(a, watched, s2, { base: s1 });
  assert.equal(r.blocksSent, 3);
  assert.deepEqual(asked, [3], 'one question, about the three changed blocks only (without a base: every block under the three changed level-1 nodes)');
  assert.ok((await readAll(b, s2)).equals(data));
  // A pull's base is read from the target (the local store, which holds it in full): the source
  // may no longer hold it, and the target is still asked about the changed blocks only.
  for (const i of [9, 1500]) randomBytes(BS).copy(data, i * BS);
  const s3 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS, parent: s2 });
  await a.deleteSnapshot('v', s2.id);
  await a.deleteSnapshot('v', s1.id);
  await a.gc();
  await assert.rejects(copySnapshot(a, watched, s3, { base: s2 }), { code: 'ERR_NODE_MISSING' }, 'read from the source, the base is gone');
  asked.length = 0;
  const r3 = await copySnapshot(a, watched, s3, { base: s2, baseFrom: 'target' });
  assert.equal(r3.blocksSent, 2);
  assert.deepEqual(asked, [2]);
  assert.ok((await readAll(b, s3)).equals(data));
  // A base of another shape is ignored, not trusted.
  const [c, d] = await stores(t);
  const small = await c.scanVolume(memReader(data.subarray(0, 10 * BS)), { volume: 'v', blockSize: BS });
  const full = await c.scanVolume(memReader(data), { volume: 'v', blockSize: BS });
  await copySnapshot(c, d, small);
  const r2 = await copySnapshot(c, d, full, { base: small });
  assert.equal(r2.blocksSent, 3000 - 10);
  assert.ok((await readAll(d, full)).equals(data));
});

test('streams that fail at different times: the copy raises the failure that came first, whichever stream had it', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(48 * BS); // 3 streams of 16 blocks
  const s1 = await a.scanVolume(memReader(data), { volume: 'v', blockSize: BS });
  // The first stream's connection is cut 300 ms after it sent its blocks; the second is turned
  // away at its first block (as a busy peer answers); the third goes through.
  const target: ReplicaStore = Object.create(b) as ReplicaStore;
  let calls = 0;
  target.putBlocks = async (frames) => {
    const call = ++calls;
    if (call === 1) {
      for await (const f of frames) f.release?.();
      await new Promise((resolve) => setTimeout(resolve, 300));
      throw new TandemError('ERR_PEER_UNREACHABLE', 'other side closed');
    }
    if (call === 2) {
      for await (const f of frames) {
        f.release?.();
        throw new TandemError('ERR_SERVER_BUSY', 'peer is busy: rerun the sync shortly');
      }
    }
    return b.putBlocks(frames);
  };
  target.hasBlocks = (h) => b.hasBlocks(h);
  target.hasNodes = (h) => b.hasNodes(h);
  target.getSnapshot = (v, id) => b.getSnapshot(v, id);
  await assert.rejects(copySnapshot(a, target, s1), (e: TandemError) => e.code === 'ERR_SERVER_BUSY');
  assert.equal(calls, 3, 'three streams');
  assert.equal(await b.getSnapshot('v', s1.id), null, 'nothing is committed');
});
