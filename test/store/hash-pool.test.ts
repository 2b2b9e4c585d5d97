/**
 * Idle hash-worker pools (store/hash-pool.ts): kept for the next scan for a while, then ended;
 * with keepWarm (a running appliance) one is kept for as long as the store is open.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { HashPools } from '../../store/hash-pool.js';
import { hashBlock, ZERO_HASH } from '../../store/index.js';
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
