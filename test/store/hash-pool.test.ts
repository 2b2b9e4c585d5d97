/**
 * Hash-worker pools (store/hash-pool.ts): idle ones kept for the next scan for a while, then
 * ended (with keepWarm, a running appliance, one for as long as the store is open); the record
 * checksums the workers compute; their direct reads (a device's) against their buffered ones;
 * one pool shared by the scans running at once, and left to the others by one that fails.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { closeSync, constants, mkdtempSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { HashPools } from '../../store/hash-pool.js';
import { Store, hashBlock, ZERO_HASH, type SnapshotRecord, type VolumeReader } from '../../store/index.js';
import { scanLayout } from '../../store/scan.js';
import { fileReader, localFileReader, makeImage, storeWithImage, writeImage } from './helpers.js';
import { CODEC_RAW, encodeRecordParts } from '../../store/pack.js';

const BYTES = 1024 * 1024;
const IDLE_MS = 100;

/** Borrow a pool, hash one block with it (so its workers have started), give it back. */
async function useOnce(pools: HashPools): Promise<void> {
  const pool = pools.borrow(BYTES);
  const block = Buffer.from(pool.sab, 0, 65536).fill(7);
  assert.ok((await pool.hash(0, 65536, 65536)).hashes.equals(hashBlock(block)));
  await pools.giveBack(pool);
}

test('an idle pool is kept for the next scan, then ended after the idle time', async (t) => {
  const pools = new HashPools(IDLE_MS);
  t.after(() => pools.close());
  await useOnce(pools);
  assert.equal(pools.hasIdle(BYTES), true, 'kept for the next scan');
  await sleep(IDLE_MS * 4);
  assert.equal(pools.hasIdle(BYTES), false, 'ended once idle for longer than the idle time');
});

test('keepWarm keeps one idle pool past the idle time, and only one', async (t) => {
  const pools = new HashPools(IDLE_MS);
  t.after(() => pools.close());
  pools.keepWarm();
  // Two scans at once: two pools; both given back, only one is kept without a time limit.
  const a = pools.borrow(BYTES);
  const b = pools.borrow(BYTES);
  await pools.giveBack(a);
  await pools.giveBack(b);
  await sleep(IDLE_MS * 4);
  assert.equal(pools.hasIdle(BYTES), true, 'the warm pool is still there');
  const again = pools.borrow(BYTES);
  assert.equal(again, a, 'the pool kept warm is the one reused');
  assert.equal(pools.hasIdle(BYTES), false, 'the second pool was ended after the idle time');
  await pools.giveBack(again);
  await useOnce(pools);
});

test('the workers checksum the pack record of each block a scan may store, as the store would', async (t) => {
  const pools = new HashPools(IDLE_MS);
  t.after(() => pools.close());
  const pool = pools.borrow(BYTES);
  t.after(() => pools.giveBack(pool));
  const bs = 65536;
  const region = Buffer.from(pool.sab, 0, 4 * bs);
  region.fill(0);
  region.fill(1, 0, bs); // block 0: ones; block 1: zeros; block 2: random; block 3: a short last block
  randomFillSync(region, 2 * bs, bs);
  randomFillSync(region, 3 * bs, 1000);
  const length = 3 * bs + 1000;
  const trailer = (i: number) => {
    const data = region.subarray(i * bs, Math.min(length, (i + 1) * bs));
    return encodeRecordParts(hashBlock(data), CODEC_RAW, data).trailer.readUInt32BE(0);
  };
  const withCrcs = await pool.hash(0, length, bs, undefined, true);
  assert.deepEqual([0, 2, 3].map((i) => withCrcs.crcs!.readUInt32BE(i * 4)), [0, 2, 3].map(trailer));
  assert.equal(withCrcs.crcs!.readUInt32BE(4), 0, 'a zero block is never stored: no checksum');
  assert.equal((await pool.hash(0, length, bs)).crcs, undefined, 'not asked: none');

  // Read from a file with the parent's hashes: only blocks that differ from the parent get one.
  const dir = mkdtempSync(join(tmpdir(), 'tandem-hash-pool-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'image');
  writeFileSync(path, region.subarray(0, length));
  const expect = Buffer.concat([hashBlock(region.subarray(0, bs)), ZERO_HASH, Buffer.alloc(32, 9), Buffer.alloc(32, 9)]);
  const read = await pool.hash(0, length, bs, { path, position: 0, expect }, true);
  assert.equal(read.crcs!.readUInt32BE(0), 0, 'as in the parent: not stored, no checksum');
  assert.deepEqual([2, 3].map((i) => read.crcs!.readUInt32BE(i * 4)), [2, 3].map(trailer));
});

/** Whether files in `dir` take O_DIRECT reads (ext4, xfs: yes; some tmpfs: no). */
function takesDirect(dir: string): boolean {
  const probe = join(dir, 'probe');
  writeFileSync(probe, Buffer.alloc(8192, 1));
  try {
    const fd = openSync(probe, constants.O_RDONLY | constants.O_DIRECT);
    try {
      readSync(fd, Buffer.from(new WebAssembly.Memory({ initial: 1 }).buffer, 0, 4096), 0, 4096, 0);
      return true;
    } finally {
      closeSync(fd);
    }
  } catch {
    return false;
  }
}

test("direct reads (a device's) answer as buffered ones, the next block read while one is hashed: in order, scattered, against a parent; a volume that refuses them is read through the cache", async (t) => {
  const pools = new HashPools(IDLE_MS);
  t.after(() => pools.close());
  const pool = pools.borrow(2 * BYTES);
  t.after(() => pools.giveBack(pool));
  const bs = 65536;
  const n = 12;
  const data = Buffer.alloc(n * bs);
  randomFillSync(data);
  data.fill(0, 3 * bs, 4 * bs); // a zero block
  data.fill(5, 7 * bs, 8 * bs);
  const dir = mkdtempSync(join(tmpdir(), 'tandem-hash-pool-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'image');
  writeFileSync(path, data);
  const direct = takesDirect(dir);
  const hashesOf = (idx: number[]) => Buffer.concat(idx.map((i) => (i === 3 ? ZERO_HASH : hashBlock(data.subarray(i * bs, (i + 1) * bs)))));
  const region = Buffer.from(pool.sab, 0, n * bs);
  const all = Array.from({ length: n }, (_, i) => i);

  for (const how of [{ direct: true }, { direct: false }]) {
    region.fill(0xee);
    const r = await pool.hash(0, n * bs, bs, { path, position: 0, ...how }, true);
    assert.ok(r.hashes.equals(hashesOf(all)), `in order, direct ${how.direct}`);
    assert.ok(region.equals(data), 'every block is left in the shared buffer');
    assert.equal(r.direct === true, how.direct && direct);
    assert.equal(r.crcs!.readUInt32BE(3 * 4), 0, 'a zero block: no checksum');
  }
  // Scattered blocks, each from its own position (a change list).
  const picked = [9, 2, 7, 3, 11];
  const scattered = await pool.hash(0, picked.length * bs, bs, { path, position: 0, positions: picked.map((i) => i * bs), direct: true }, true);
  assert.ok(scattered.hashes.equals(hashesOf(picked)));
  assert.ok(region.subarray(0, picked.length * bs).equals(Buffer.concat(picked.map((i) => data.subarray(i * bs, (i + 1) * bs)))));
  // Against a parent that had blocks 0-5 as they are: the others differ, and only those are copied and checksummed.
  const expect = Buffer.concat(all.map((i) => (i < 6 ? hashesOf([i]) : Buffer.alloc(32, 9))));
  region.fill(0xee);
  const rescan = await pool.hash(0, n * bs, bs, { path, position: 0, expect, direct: true }, true);
  assert.ok(rescan.hashes.equals(hashesOf(all)));
  for (const i of all) {
    const block = region.subarray(i * bs, (i + 1) * bs);
    assert.equal(block.equals(data.subarray(i * bs, (i + 1) * bs)), i >= 6, `block ${i} copied only if it changed`);
    assert.equal(rescan.crcs!.readUInt32BE(i * 4) !== 0, i >= 6, `block ${i} checksummed only if it changed`);
  }
  // A short last block (1000 bytes: not a multiple of the sector size) refuses O_DIRECT: the
  // job is read again through the cache, with the same answer, and so is the next one.
  const shortPath = join(dir, 'short');
  writeFileSync(shortPath, data.subarray(0, 2 * bs + 1000));
  const short = await pool.hash(0, 2 * bs + 1000, bs, { path: shortPath, position: 0, direct: true });
  assert.ok(short.hashes.equals(Buffer.concat([hashesOf([0, 1]), hashBlock(data.subarray(2 * bs, 2 * bs + 1000))])));
  assert.equal(short.direct, undefined, 'read through the cache');
  const again = await pool.hash(0, bs, bs, { path: shortPath, position: bs, direct: true });
  assert.ok(again.hashes.equals(hashesOf([1])));
  assert.equal(again.direct, undefined, 'the volume is remembered as refusing direct reads');
  // A volume that ends early: the read's error, not a hang.
  await assert.rejects(pool.hash(0, 4 * bs, bs, { path, position: (n - 2) * bs, direct: true }), /ended at byte|before its size/);
});

/**
 * `reader` with every read first waiting for `gate` and then `ms`; then failing with the abort of
 * `signal`, or with an error from byte `failFrom` on.
 */
function slowed(reader: VolumeReader, ms: number, opts: { gate?: Promise<unknown>; signal?: AbortSignal; failFrom?: number; started?: { reads: number } } = {}): VolumeReader {
  return {
    ...reader,
    read: async (buf, pos) => {
      if (opts.started) opts.started.reads++;
      await opts.gate;
      await sleep(ms);
      opts.signal?.throwIfAborted();
      if (pos >= (opts.failFrom ?? Infinity)) throw new Error('the disk went away');
      return reader.read(buf, pos);
    },
  };
}

/** Wait (bounded) until `n` reads of a {@link slowed} reader have started. */
async function readsStarted(started: { reads: number }, n: number): Promise<void> {
  for (let i = 0; started.reads < n; i++) {
    assert.ok(i < 2000, `${n} reads started within 10 s`);
    await sleep(5);
  }
}

/** A promise and what settles it. */
function gate(): { opened: Promise<void>; open(): void } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { opened, open };
}

/** Each of `snaps` equals a scan of its image alone (a fresh store, one scan at a time). */
async function sameAsAlone(dir: string, bs: number, snaps: Array<[SnapshotRecord, string]>): Promise<void> {
  const alone = await Store.open(join(dir, `alone-${snaps.length}-${Date.now()}`));
  try {
    for (const [snap, path] of snaps) {
      const reader = await localFileReader(path);
      try {
        assert.equal(snap.root, (await alone.scanVolume(reader, { volume: snap.volume, blockSize: bs })).root, `${snap.volume} as a scan alone`);
      } finally {
        await reader.close();
      }
    }
  } finally {
    await alone.close();
  }
}

/**
 * Two images in one store's temp dir: `a` read on the calling thread (a reader without a path),
 * `b` by the pool's workers (a reader with its path). Readers closed after the test.
 */
async function twoImages(t: TestContext, a: Buffer, b: Buffer): Promise<{ dir: string; store: Store; pathA: string; pathB: string; readerA: VolumeReader; readerB: VolumeReader }> {
  const { dir, path: pathA, store } = await storeWithImage(t, a);
  const pathB = join(dir, 'img-b');
  await writeImage(pathB, b);
  const readerA = await fileReader(pathA);
  const readerB = await localFileReader(pathB);
  t.after(() => Promise.all([readerA.close(), readerB.close()]));
  return { dir, store, pathA, pathB, readerA, readerB };
}

/** Wait (bounded) until `store` has `n` scans sharing its pool. */
async function scansSharing(store: Store, n: number): Promise<void> {
  for (let i = 0; store.hashPools.scans !== n; i++) {
    assert.ok(i < 2000, `${n} scan(s) sharing the pool within 10 s`);
    await sleep(5);
  }
}

test('scans running at once in a process share one pool, its workers (one per core) and its slots; the one that joins gets its share while the other goes on; both snapshots are those of a scan alone', { timeout: 120_000 }, async (t) => {
  const bs = 512 * 1024;
  const a = makeImage(192, bs, { zeroEvery: 7 }); // 96 MiB: twelve chunks
  const b = makeImage(80, bs, { zeroEvery: 5, tail: 1000 });
  // The first scan reads on the calling thread (a reader without a path), each chunk slowly, so
  // the second starts while it runs; the second's workers read its file themselves (its slots
  // start at another offset in their pages: store/scan.ts SLOT_GAP).
  const { dir, store, pathA, pathB, readerA, readerB } = await twoImages(t, a, b);
  const ended: string[] = [];
  const first = store.scanVolume(slowed(readerA, 150), { volume: 'a', blockSize: bs }).finally(() => ended.push('a'));
  await scansSharing(store, 1);
  const second = store.scanVolume(readerB, { volume: 'b', blockSize: bs }).finally(() => ended.push('b'));
  await scansSharing(store, 2);
  const [sa, sb] = await Promise.all([first, second]);
  // The second took slots as the first gave them back, not once it had ended.
  assert.deepEqual(ended, ['b', 'a']);
  assert.equal(store.hashPools.lent, 1, 'one pool for both scans');
  assert.equal(store.hashPools.scans, 0);
  const { poolBytes } = scanLayout(bs);
  const pool = store.hashPools.borrow(poolBytes);
  assert.equal(pool.threads, availableParallelism(), 'one worker per core, not one more for the second scan');
  await store.hashPools.giveBack(pool);
  await sameAsAlone(dir, bs, [[sa, pathA], [sb, pathB]]);
  assert.equal((await store.verify()).problems.length, 0);
});

test('a scan that fails or is aborted while it shares the pool leaves it to the others: one waiting for a slot gets them once it has ended; one aborted while it waits ends at once', { timeout: 120_000 }, async (t) => {
  const bs = 512 * 1024;
  const a = makeImage(192, bs, { zeroEvery: 9 });
  const b = makeImage(64, bs, { zeroEvery: 4 });
  const { dir, store, pathA, pathB, readerA, readerB } = await twoImages(t, a, b);
  const { slots } = scanLayout(bs);
  // The first holds every slot (its reads wait) when the second starts and waits for one; then
  // the first fails, none of its chunks stored: the slots come back when it ends.
  const fails = async (how: 'aborted' | 'failed', volume: string): Promise<SnapshotRecord> => {
    const lent = store.hashPools.lent;
    const held = gate();
    const abort = new AbortController();
    const started = { reads: 0 };
    const first = store.scanVolume(slowed(readerA, 0, { gate: held.opened, signal: abort.signal, failFrom: 0, started }), { volume: 'a', blockSize: bs, signal: abort.signal });
    await readsStarted(started, slots); // a chunk is one read (a reader without a path is read on the calling thread)
    let waited = true;
    const second = store.scanVolume(readerB, { volume, blockSize: bs }).finally(() => (waited = false));
    await scansSharing(store, 2);
    await sleep(200);
    assert.ok(waited, 'the second waits for a slot');
    if (how === 'aborted') abort.abort();
    held.open();
    await assert.rejects(first, how === 'aborted' ? (e: Error) => e.name === 'AbortError' : /the disk went away/);
    const snap = await second;
    assert.equal(store.hashPools.scans, 0);
    assert.equal(store.hashPools.lent, lent + 1, 'both on one pool');
    return snap;
  };
  const sb = await fails('aborted', 'b');
  await sameAsAlone(dir, bs, [[sb, pathB]]);
  assert.equal((await fails('failed', 'b2')).root, sb.root);
  // A scan aborted while it waits for a slot ends then, not when a slot comes.
  const held = gate();
  const started = { reads: 0 };
  const holder = store.scanVolume(slowed(readerA, 0, { gate: held.opened, started }), { volume: 'a2', blockSize: bs });
  await readsStarted(started, slots);
  const abort = new AbortController();
  let waiting = true;
  const waiter = store.scanVolume(readerB, { volume: 'b3', blockSize: bs, signal: abort.signal }).finally(() => (waiting = false));
  await scansSharing(store, 2);
  await sleep(200); // it waits for a slot by now
  assert.ok(waiting);
  abort.abort();
  await assert.rejects(waiter, (e: Error) => e.name === 'AbortError');
  assert.equal(store.hashPools.scans, 1, 'the holder goes on');
  held.open();
  await sameAsAlone(dir, bs, [[await holder, pathA]]);
  assert.equal((await store.verify()).problems.length, 0);
});
