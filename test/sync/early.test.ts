/**
 * Early sending (sync/early.ts) between two real local stores: blocks travel while the scan
 * goes on, the engine afterwards sends only the rest, a failing target never fails the sync, and
 * early sending ends with the scan.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { SnapshotRecord, Store } from '../../store/index.js';
import { twoStores } from '../helpers/stores.js';
import type { BlockFrame, ReplicaStore, VolumeReader } from '../../store/types.js';
import { copySnapshot } from '../../sync/engine.js';
import { EarlySender } from '../../sync/early.js';

const BS = 4096;
/** The scan reads 8 MiB at a time: 2048 blocks of 4 KiB. */
const CHUNK_BLOCKS = 2048;

/** A volume in memory whose reads after the first wait `delayMs`: a scan that takes a while. */
function slowReader(data: Buffer, delayMs: number): VolumeReader {
  let reads = 0;
  return {
    size: data.length,
    async read(buf, pos) {
      if (reads++ > 0) await sleep(delayMs);
      return data.copy(buf, 0, pos, Math.min(data.length, pos + buf.length));
    },
    async close() {},
  };
}

/** The target's copy of the snapshot, read back block by block, is `data` byte for byte. */
async function assertExact(b: Store, snap: SnapshotRecord, data: Buffer, bs: number): Promise<void> {
  const back = Buffer.alloc(data.length);
  for await (const { index, hash } of b.blockHashes(snap)) (await b.getBlock(hash, bs)).copy(back, index * bs);
  assert.ok(back.equals(data), 'byte-exact');
}

/**
 * A full scan of `data` into `a` whose new blocks go to `early` with their bytes, wired as a
 * push wires it (appliance/replicate.ts); `check` sees what each onNewBlocks call was given and
 * what early sending returned.
 */
function scanSending(a: Store, data: Buffer, bs: number, early: EarlySender, check?: (kept: boolean | undefined, returned: void | Promise<void>) => void): Promise<SnapshotRecord> {
  return a.scanVolume(slowReader(data, 0), {
    volume: 'v',
    blockSize: bs,
    onNewBlocks: (h, direct, replaced, views, kept) => {
      const returned = early.add(h, direct, replaced, views, kept);
      check?.(kept, returned);
      return returned;
    },
    keepViewsUntil: early.done,
    onScanned: () => early.scanned(),
  });
}

function stores(t: { after(fn: () => Promise<void> | void): void }): Promise<[Store, Store]> {
  return twoStores(t, 'tandem-early-');
}

/** The target as a ReplicaStore that counts the block frames it really receives, each one by hash. */
function receiving(inner: Store, opts: { frameDelayMs?: number; failPut?: boolean; askDelayMs?: number } = {}) {
  const seen = new Map<string, number>();
  const target: ReplicaStore = {
    hasBlocks: async (h) => {
      if (opts.askDelayMs) await sleep(opts.askDelayMs);
      return inner.hasBlocks(h);
    },
    getBlocks: (h) => inner.getBlocks(h),
    putBlocks: async (frames) => {
      if (opts.failPut) throw new Error('the peer is unreachable');
      async function* each(): AsyncGenerator<BlockFrame> {
        for await (const f of frames) {
          if (opts.frameDelayMs) await sleep(opts.frameDelayMs);
          const k = f.hash.toString('hex');
          seen.set(k, (seen.get(k) ?? 0) + 1);
          yield f;
        }
      }
      return inner.putBlocks(each());
    },
    hasNodes: (h) => inner.hasNodes(h),
    getNodes: (h) => inner.getNodes(h),
    putNodes: (n) => inner.putNodes(n),
    latestSnapshot: (v) => inner.latestSnapshot(v),
    getSnapshot: (v, id) => inner.getSnapshot(v, id),
    commitSnapshot: (r) => inner.commitSnapshot(r),
  };
  const total = () => [...seen.values()].reduce((s, n) => s + n, 0);
  return { target, seen, total };
}

test('blocks sent during the scan are not sent again by the engine; the copy is exact', async (t) => {
  const [a, b] = await stores(t);
  const blocks = 2 * CHUNK_BLOCKS + 100;
  const data = randomBytes(blocks * BS);
  const r = receiving(b);
  const early = new EarlySender(a, r.target);
  // The scan waits 500 ms before each later chunk: the first chunk's blocks go meanwhile.
  const snap = await a.scanVolume(slowReader(data, 500), { volume: 'v', blockSize: BS, onNewBlocks: (h) => early.add(h) });
  await early.finish();
  assert.equal(early.failure, null);
  assert.ok(early.blocks > 0, 'blocks went during the scan');
  assert.equal(early.bytes, early.blocks * BS);
  const copy = await copySnapshot(a, r.target, snap);
  assert.equal(copy.blocksSent + early.blocks, blocks, 'early and engine together sent each block once');
  assert.equal(r.seen.size, blocks);
  assert.equal(r.total(), blocks, 'no block arrived twice');
  await assertExact(b, snap, data, BS);
  assert.equal((await b.verify()).problems.length, 0);
});

test('a target that fails block uploads stops early sending, not the sync', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(300 * BS);
  const failing = receiving(b, { failPut: true });
  const early = new EarlySender(a, failing.target);
  const snap = await a.scanVolume(slowReader(data, 0), { volume: 'v', blockSize: BS, onNewBlocks: (h) => early.add(h) });
  await early.finish();
  assert.match(String((early.failure as Error)?.message), /unreachable/);
  assert.equal(early.blocks, 0);
  const r = receiving(b);
  const copy = await copySnapshot(a, r.target, snap);
  assert.equal(copy.blocksSent, 300, 'the engine sends everything');
  assert.deepEqual(await b.getSnapshot('v', snap.id), snap);
});

test('early sending ends with the scan: the frame in flight completes, the engine sends the rest', async (t) => {
  const [a, b] = await stores(t);
  const blocks = 400;
  const data = randomBytes(blocks * BS);
  // A slow link: 20 ms a block, 8 s for the whole volume; the scan takes a few milliseconds.
  const r = receiving(b, { frameDelayMs: 20 });
  const early = new EarlySender(a, r.target);
  const snap = await a.scanVolume(slowReader(data, 0), { volume: 'v', blockSize: BS, onNewBlocks: (h) => early.add(h) });
  const t0 = performance.now();
  await early.finish();
  const waited = performance.now() - t0;
  assert.ok(waited < 2000, `finish waited ${waited.toFixed(0)} ms, not for the whole queue`);
  assert.ok(early.blocks < blocks / 2, `${early.blocks} blocks went early`);
  // Every block early sending yielded was stored by the target: the engine skips them.
  const fast = receiving(b);
  const copy = await copySnapshot(a, fast.target, snap);
  assert.equal(copy.blocksSent, blocks - early.blocks);
  assert.equal(r.seen.size + fast.seen.size, blocks);
  assert.deepEqual(await b.getSnapshot('v', snap.id), snap);
});

test('nothing new, nothing sent: no block upload is opened', async (t) => {
  const [a, b] = await stores(t);
  const data = randomBytes(100 * BS);
  const s1 = await a.scanVolume(slowReader(data, 0), { volume: 'v', blockSize: BS });
  let uploads = 0;
  const r = receiving(b);
  const target: ReplicaStore = { ...r.target, putBlocks: (f) => (uploads++, r.target.putBlocks(f)) };
  const early = new EarlySender(a, target);
  await a.scanVolume(slowReader(data, 0), { volume: 'v', blockSize: BS, parent: s1, onNewBlocks: (h) => early.add(h) });
  await early.finish();
  assert.equal(uploads, 0);
  assert.equal(early.blocks, 0);
});

test('a short tail is sent early: the scan says it has read everything, finish sends the rest, the engine sends nothing', async (t) => {
  const [a, b] = await stores(t);
  const blocks = 40; // fewer than one batch: it goes when the scan has read everything, not after the linger
  const data = randomBytes(blocks * BS);
  const r = receiving(b, { frameDelayMs: 5 });
  const seen: Array<{ blocks: number; pending: number }> = [];
  const early: EarlySender = new EarlySender(a, r.target, () => seen.push({ blocks: early.blocks, pending: early.pending }));
  let latestWhenScanned: Promise<unknown> | undefined;
  const snap = await a.scanVolume(slowReader(data, 0), {
    volume: 'v',
    blockSize: BS,
    onNewBlocks: (h) => early.add(h),
    onScanned: () => {
      latestWhenScanned = a.latestSnapshot('v');
      early.scanned();
    },
  });
  assert.ok(latestWhenScanned, 'onScanned was called');
  assert.equal(await latestWhenScanned, null, 'onScanned comes before the commit');
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(early.blocks, blocks, 'the whole tail went early');
  // onSent follows every frame (what a sync shows as the tail's progress): counts up, pending down to 0.
  assert.deepEqual(seen.map((x) => x.blocks), Array.from({ length: blocks }, (_, i) => i + 1));
  assert.equal(seen.at(-1)!.pending, 0);
  assert.ok(seen.every((x, i) => i === 0 || x.pending <= seen[i - 1]!.pending));
  const fast = receiving(b);
  const copy = await copySnapshot(a, fast.target, snap);
  assert.equal(copy.blocksSent, 0);
  assert.equal(fast.total(), 0);
  assert.equal(r.total(), blocks, 'no block arrived twice');
  assert.deepEqual(await b.getSnapshot('v', snap.id), snap);
});

test('a failed snapshot sends no tail: finish(false) ends the streams after the frame in flight', async (t) => {
  const [a, b] = await stores(t);
  const blocks = 40;
  const r = receiving(b, { frameDelayMs: 50 });
  const early = new EarlySender(a, r.target);
  await a.scanVolume(slowReader(randomBytes(blocks * BS), 0), { volume: 'v', blockSize: BS, onNewBlocks: (h) => early.add(h) });
  early.scanned();
  await sleep(120);
  await early.finish(false);
  assert.ok(early.blocks > 0 && early.blocks < blocks, `${early.blocks} of ${blocks} blocks went before the stop`);
});

/** Two stores, `blocks` random blocks of 512 KiB (a scan's full-size chunks) and a target receiving into b. */
async function bigBlocks(t: { after(fn: () => Promise<void> | void): void }, blocks: number, opts?: Parameters<typeof receiving>[1]) {
  const [a, b] = await stores(t);
  const bs = 512 * 1024;
  return { a, b, bs, data: randomBytes(blocks * bs), r: receiving(b, opts) };
}

test("a scan's new blocks are written directly and said so, and early sending reads them directly; the copy is exact", async (t) => {
  const blocks = 192; // 96 MiB
  const { a, b, bs, data, r } = await bigBlocks(t, blocks);
  // The source as early sending sees it: a's reads, with how each was asked for.
  const reads: boolean[] = [];
  const source: ReplicaStore = {
    ...r.target,
    getBlocks: (h, opts) => {
      reads.push(opts?.direct === true);
      return a.getBlocks(h, opts);
    },
  };
  const early = new EarlySender(source, r.target);
  const told: boolean[] = [];
  const snap = await a.scanVolume(slowReader(data, 0), {
    volume: 'v',
    blockSize: bs,
    onNewBlocks: (h, direct) => {
      told.push(...h.map(() => direct));
      early.add(h, direct);
    },
    onScanned: () => early.scanned(),
  });
  // The scan may have outrun early sending (a loaded machine): let it send everything before
  // finish(), which would leave a long tail to the engine.
  for (let waited = 0; early.pending > 0 && early.failure === null && waited < 30_000; waited += 20) await sleep(20);
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(early.blocks, blocks, 'early sending sent every block');
  assert.equal(told.length, blocks);
  assert.ok(told.every(Boolean), 'every new block went past the page cache');
  assert.ok(reads.length > 0 && reads.every(Boolean), `early sending read them so (${reads.join(',')})`);
  const copy = await copySnapshot(a, r.target, snap);
  assert.equal(copy.blocksSent + early.blocks, blocks);
  assert.equal(r.total(), blocks, 'no block arrived twice');
  await assertExact(b, snap, data, bs);
  assert.equal((await a.verify()).problems.length, 0);
});

test("a change list that fits the scan's buffers lends its new blocks' bytes to early sending; no other scan takes those buffers until early sending is done; the copy is exact", async (t) => {
  const [a, b] = await stores(t);
  const blocks = 600;
  const data = randomBytes(blocks * BS);
  const base = await a.scanVolume(slowReader(data, 0), { volume: 'v', blockSize: BS });
  await copySnapshot(a, b, base);
  const listed = Array.from({ length: 40 }, (_, i) => i * 15);
  for (const i of listed) randomBytes(BS).copy(data, i * BS);
  // Slow frames: early sending goes on long after the scan returned.
  const r = receiving(b, { frameDelayMs: 20 });
  let asked = 0;
  let lent = 0;
  const source: ReplicaStore = {
    ...r.target,
    getBlocks: (h, opts) => {
      asked += h.length;
      lent += h.filter((x) => opts?.held?.has(x.toString('latin1'))).length;
      return a.getBlocks(h, opts);
    },
  };
  const early = new EarlySender(source, r.target);
  const snap = await a.scanVolume(slowReader(data, 0), {
    volume: 'v',
    blockSize: BS,
    parent: base,
    changedBlocks: listed,
    onNewBlocks: (h, direct, replaced, views, kept) => {
      assert.equal(kept, true, 'lent where they are');
      return early.add(h, direct, replaced, views, kept);
    },
    keepViewsUntil: early.done,
    onScanned: () => early.scanned(),
  });
  // Meanwhile another volume is scanned on the same store: given the lent buffers, it would write
  // its own blocks over the bytes early sending still sends (the target refuses those).
  const other = randomBytes(blocks * BS);
  await a.scanVolume(slowReader(other, 0), { volume: 'w', blockSize: BS });
  await a.scanVolume(slowReader(other, 0), { volume: 'w', blockSize: BS, parent: (await a.latestSnapshot('w'))!, changedBlocks: listed });
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(early.blocks, listed.length, 'every new block went early');
  assert.equal(asked, listed.length);
  assert.equal(lent, asked, 'each was sent from the bytes the scan lent, not read back from the packs');
  const copy = await copySnapshot(a, r.target, snap);
  assert.equal(copy.blocksSent, 0);
  await assertExact(b, snap, data, BS);
});

/** A source that counts the blocks early sending asks for and how many of those it holds copies of (GetBlocksOptions.held). */
function counting(a: Store, r: ReturnType<typeof receiving>) {
  const counts = { asked: 0, held: 0 };
  const source: ReplicaStore = {
    ...r.target,
    getBlocks: (h, opts) => {
      counts.asked += h.length;
      counts.held += h.filter((x) => opts?.held?.has(x.toString('latin1'))).length;
      return a.getBlocks(h, opts);
    },
  };
  return { source, counts };
}

test("a full scan that outruns the transfer waits for it: every new block travels from a copy of the scan's buffer, none is read back; the copy is exact", async (t) => {
  const blocks = 192; // 96 MiB: three times the copies early sending keeps
  const { a, b, bs, data, r } = await bigBlocks(t, blocks, { frameDelayMs: 5 }); // a transfer slower than the scan
  const { source, counts } = counting(a, r);
  const early = new EarlySender(source, r.target);
  const snap = await scanSending(a, data, bs, early, (kept) => assert.equal(kept, false, 'a full scan reads into its buffers again: they are copied'));
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(early.blocks, blocks, 'every block went early (the scan kept pace with the transfer)');
  assert.equal(counts.asked, blocks);
  assert.equal(counts.held, blocks, 'each was sent from a copy, not read back from the packs');
  assert.equal((await copySnapshot(a, r.target, snap)).blocksSent, 0);
  assert.equal(r.total(), blocks, 'no block arrived twice');
  await assertExact(b, snap, data, bs);
});

test('a consumer that never gives copies back does not hold the scan up: copying stops, the rest is read back from the packs; the copy is exact', async (t) => {
  const blocks = 160;
  const { a, b, bs, data, r } = await bigBlocks(t, blocks);
  // Frames pass on without their release: no copy buffer ever comes back.
  const keeping: ReplicaStore = { ...r.target, putBlocks: (frames) => r.target.putBlocks((async function* () {
    for await (const f of frames) yield { hash: f.hash, data: Buffer.from(f.data), ...(f.base ? { base: f.base } : {}) };
  })()) };
  const { source, counts } = counting(a, { ...r, target: keeping });
  const early = new EarlySender(source, keeping);
  const t0 = performance.now();
  const snap = await scanSending(a, data, bs, early);
  const scanMs = performance.now() - t0;
  await early.finish();
  assert.equal(early.failure, null);
  assert.ok(scanMs < 10_000, `the scan took ${scanMs.toFixed(0)} ms`);
  assert.ok(counts.held > 0 && counts.held <= 64, `${counts.held} blocks sent from copies (at most the 32 MiB kept)`);
  const copy = await copySnapshot(a, keeping, snap);
  assert.equal(copy.blocksSent + early.blocks, blocks);
  await assertExact(b, snap, data, bs);
  assert.equal((await b.verify()).problems.length, 0);
});

test('a target that says it may drop frames\' releases (a capped peer upload) gets no copies: the blocks are read back from the packs, and the scan is not held up', async (t) => {
  const blocks = 96;
  const { a, b, bs, data, r } = await bigBlocks(t, blocks);
  const capped: ReplicaStore = { ...r.target, releasesFrames: false };
  const { source, counts } = counting(a, { ...r, target: capped });
  const early = new EarlySender(source, capped);
  const snap = await scanSending(a, data, bs, early, (_, returned) => assert.equal(returned, undefined, 'nothing to wait for'));
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(counts.held, 0, 'no copies');
  const copy = await copySnapshot(a, capped, snap);
  assert.equal(copy.blocksSent + early.blocks, blocks);
  await assertExact(b, snap, data, bs);
});

test('a peer that answers slowly (a long round trip) gets no copies after its first answers: the scan runs ahead, the rest is read back; the copy is exact', async (t) => {
  const blocks = 192;
  const { a, b, bs, data, r } = await bigBlocks(t, blocks, { askDelayMs: 60, frameDelayMs: 2 });
  const { source, counts } = counting(a, r);
  const early = new EarlySender(source, r.target);
  const snap = await scanSending(a, data, bs, early);
  for (let waited = 0; early.pending > 0 && early.failure === null && waited < 30_000; waited += 20) await sleep(20);
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(early.blocks, blocks);
  // Copies until the fourth answer came (the pool's 64 and what came back meanwhile), none after.
  assert.ok(counts.held > 0 && counts.held < blocks, `${counts.held} of ${blocks} blocks sent from copies`);
  assert.equal((await copySnapshot(a, r.target, snap)).blocksSent, 0);
  await assertExact(b, snap, data, bs);
});

test('blocks under 256 KiB are not copied (a peer upload gives a small payload back before the socket has taken it): they are read back from the packs', async (t) => {
  const [a, b] = await stores(t);
  const blocks = 3000;
  const data = randomBytes(blocks * BS);
  const r = receiving(b);
  const { source, counts } = counting(a, r);
  const early = new EarlySender(source, r.target);
  const snap = await scanSending(a, data, BS, early, (kept, returned) => {
    assert.equal(kept, false);
    assert.equal(returned, undefined, 'nothing to wait for');
  });
  await early.finish();
  assert.equal(early.failure, null);
  assert.equal(counts.held, 0, 'no copies');
  await copySnapshot(a, r.target, snap);
  await assertExact(b, snap, data, BS);
});

test('one pool of copies per process: a second early sender while the first goes on reads its blocks back from the packs; once the first is done, the next one copies again; every copy is exact', async (t) => {
  const blocks = 48;
  const runs = await Promise.all([bigBlocks(t, blocks), bigBlocks(t, blocks), bigBlocks(t, blocks)]);
  const senders = runs.map(({ a, r }) => {
    const c = counting(a, r);
    return { early: new EarlySender(c.source, r.target), counts: c.counts };
  });
  // The first scans and copies; its sender has not finished when the second scans.
  const s0 = await scanSending(runs[0]!.a, runs[0]!.data, runs[0]!.bs, senders[0]!.early);
  const s1 = await scanSending(runs[1]!.a, runs[1]!.data, runs[1]!.bs, senders[1]!.early);
  await senders[1]!.early.finish();
  await senders[0]!.early.finish();
  assert.ok(senders[0]!.counts.held > 0, 'the first sent from copies');
  assert.equal(senders[1]!.counts.held, 0, 'the second, while the first went on, read every block back from the packs');
  // The first is done: the next sender copies again.
  const s2 = await scanSending(runs[2]!.a, runs[2]!.data, runs[2]!.bs, senders[2]!.early);
  await senders[2]!.early.finish();
  assert.ok(senders[2]!.counts.held > 0, 'the pool was given back');
  for (const [i, snap] of [s0, s1, s2].entries()) {
    const { a, b, bs, data, r } = runs[i]!;
    assert.equal(senders[i]!.early.failure, null);
    assert.equal((await copySnapshot(a, r.target, snap)).blocksSent + senders[i]!.early.blocks, blocks);
    await assertExact(b, snap, data, bs);
  }
});
