/**
 * Idle hash-worker pools (store/hash-pool.ts): kept for the next scan for a while, then ended;
 * with keepWarm (a running appliance) one is kept for as long as the store is open.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { HashPools } from '../../store/hash-pool.js';
import { hashBlock } from '../../store/index.js';

const BYTES = 1024 * 1024;
const IDLE_MS = 100;

/** Borrow a pool, hash one block with it (so its workers have started), give it back. */
async function useOnce(pools: HashPools): Promise<void> {
  const pool = pools.borrow(BYTES);
  const block = Buffer.from(pool.sab, 0, 65536).fill(7);
  assert.ok((await pool.hash(0, 65536, 65536)).equals(hashBlock(block)));
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
