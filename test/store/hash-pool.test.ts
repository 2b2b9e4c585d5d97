/**
 * Hash-worker pools (store/hash-pool.ts): idle ones kept for the next scan for a while, then
 * ended (with keepWarm, a running appliance, one for as long as the store is open); the record
 * checksums the workers compute; their direct reads (a device's) against their buffered ones.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { closeSync, constants, mkdtempSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { HashPools } from '../../store/hash-pool.js';
import { Store, hashBlock, ZERO_HASH } from '../../store/index.js';
import { scanLayout } from '../../store/scan.js';
import { localFileReader, makeImage, storeWithImage, writeImage } from './helpers.js';
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

test('a scan that starts while another runs in the process takes a lean pool (fewer slots, one worker); both snapshots are those of a scan alone', async (t) => {
  const bs = 512 * 1024;
  const a = makeImage(96, bs, { zeroEvery: 7 }); // 48 MiB: six chunks
  const b = makeImage(80, bs, { zeroEvery: 5, tail: 1000 });
  const { dir, path: pathA, store } = await storeWithImage(t, a);
  const pathB = join(dir, 'img-b');
  await writeImage(pathB, b);
  // The first scan's reads are slowed so that the second starts while it runs.
  const slowA = await localFileReader(pathA);
  const slowRead = slowA.read;
  const first = store.scanVolume({ ...slowA, read: async (buf, pos) => (await sleep(20), slowRead(buf, pos)) }, { volume: 'a', blockSize: bs });
  while (store.hashPools.inUse === 0) await sleep(5);
  const readerB = await localFileReader(pathB);
  const second = store.scanVolume(readerB, { volume: 'b', blockSize: bs });
  const [sa, sb] = await Promise.all([first, second]);
  await Promise.all([slowA.close(), readerB.close()]);
  const { poolBytes, leanPoolBytes } = scanLayout(bs);
  assert.ok(store.hashPools.hasIdle(leanPoolBytes), 'the second scan borrowed a lean pool');
  assert.ok(store.hashPools.hasIdle(poolBytes), 'the first a full one');
  assert.ok(leanPoolBytes < poolBytes / 2);
  // Each as a scan of its image alone would make it (a fresh store, one scan at a time).
  const alone = await Store.open(join(dir, 'alone'));
  t.after(() => alone.close());
  for (const [snap, path, volume] of [[sa, pathA, 'a'], [sb, pathB, 'b']] as const) {
    const reader = await localFileReader(path);
    assert.equal(snap.root, (await alone.scanVolume(reader, { volume, blockSize: bs })).root);
    await reader.close();
  }
  assert.equal((await store.verify()).problems.length, 0);
});
