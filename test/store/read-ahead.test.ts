/**
 * The process-wide bound on blocks read ahead (store/ahead-budget.ts): Store.getBlocks streams
 * running at once hold no more of them than the budget (plus at most one each), a lone stream
 * still reads its full depth ahead, and a stream never waits for the buffers that stalled streams
 * hold. The budget counts them itself (readAheadBudget).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { hashBlock, Store } from '../../store/index.js';
import { readAheadBudget } from '../../store/store.js';
import { AlignedBuffers } from '../../common/io-buffers.js';
import type { Hash } from '../../store/types.js';
import { tempDir } from './helpers.js';

/** Blocks of 512 KiB, read with O_DIRECT into the pooled buffers the bound is about. */
const BLOCK = 512 * 1024;
const STREAMS = 6;
const PER_STREAM = 24;

async function storeWith(t: import('node:test').TestContext, n: number): Promise<{ store: Store; hashes: Hash[] }> {
  const store = await Store.open(join(await tempDir(t), 'store'));
  t.after(() => store.close());
  const blocks = Array.from({ length: n }, () => randomBytes(BLOCK));
  await store.putBlocks((async function* () {
    for (const data of blocks) yield { hash: hashBlock(data), data };
  })());
  return { store, hashes: blocks.map(hashBlock) };
}

/** Read `hashes` with a consumer slower than the reads (so read-ahead fills up); the bytes are checked. */
async function slowRead(store: Store, hashes: Hash[], pauseMs: number): Promise<void> {
  let i = 0;
  for await (const f of store.getBlocks(hashes, { direct: true })) {
    assert.ok(hashBlock(f.data).equals(hashes[i++]!));
    f.release?.();
    await delay(pauseMs);
  }
  assert.equal(i, hashes.length);
}

test('a lone getBlocks stream reads its full depth (8) ahead; six at once hold at most the budget (24) plus one each, and give it all back', async (t) => {
  const { store, hashes } = await storeWith(t, STREAMS * PER_STREAM);
  assert.equal(readAheadBudget.inUse, 0);
  readAheadBudget.resetPeak();
  await slowRead(store, hashes.slice(0, PER_STREAM), 5);
  assert.equal(readAheadBudget.peak, readAheadBudget.maxDepth, 'a lone stream reads 8 blocks ahead');
  assert.equal(readAheadBudget.inUse, 0);

  readAheadBudget.resetPeak();
  let top = 0;
  const sampler = setInterval(() => (top = Math.max(top, readAheadBudget.inUse)), 1);
  try {
    await Promise.all(Array.from({ length: STREAMS }, (_, s) => slowRead(store, hashes.slice(s * PER_STREAM, (s + 1) * PER_STREAM), 5)));
  } finally {
    clearInterval(sampler);
  }
  // Six streams of depth 8 held 48 ahead before the budget.
  assert.ok(readAheadBudget.peak <= readAheadBudget.limit + STREAMS, `six streams held ${readAheadBudget.peak} blocks read ahead at once (budget ${readAheadBudget.limit} + ${STREAMS})`);
  assert.ok(readAheadBudget.peak >= readAheadBudget.limit, `the streams used the budget (peak ${readAheadBudget.peak})`);
  assert.ok(top <= readAheadBudget.limit + STREAMS);
  assert.equal(readAheadBudget.inUse, 0, 'every stream gave back what it held');
  assert.equal(readAheadBudget.streams, 0);
});

test('a stream runs to its end while three others hold the whole budget and read no further (their consumers stalled), and one stopped early gives its share back', async (t) => {
  const { store, hashes } = await storeWith(t, 4 * PER_STREAM);
  const stalled = [0, 1, 2].map((s) => store.getBlocks(hashes.slice(s * PER_STREAM, (s + 1) * PER_STREAM), { direct: true }));
  // Each stalled stream hands out one block and then is never asked again: its read-ahead stays held.
  for (const it of stalled) (await it.next()).value!.release?.();
  await delay(50);
  assert.equal(readAheadBudget.inUse, readAheadBudget.limit, 'the stalled streams hold the whole budget');
  const timeout = new AbortController();
  await Promise.race([
    slowRead(store, hashes.slice(3 * PER_STREAM), 0),
    delay(30_000, undefined, { signal: timeout.signal }).then(() => assert.fail('a stream waited for the buffers of stalled streams')),
  ]).finally(() => timeout.abort());
  for (const it of stalled) await it.return(undefined);
  assert.equal(readAheadBudget.inUse, 0);
  assert.equal(readAheadBudget.streams, 0);
});

test('aligned buffers given back are reused, whatever size within the same 64 KiB pages was asked; at most `kept` of a size are kept', () => {
  const pool = new AlignedBuffers(2, 4);
  const a = pool.take(528384);
  assert.equal(a.buf.length, 528384);
  assert.equal(a.buf.byteOffset % 4096, 0);
  a.release();
  a.release(); // once only
  assert.equal(pool.idle, 1);
  const b = pool.take(524296); // an early sending copy (512 KiB + 8): the same 576 KiB buffer
  assert.equal(b.buf.buffer, a.buf.buffer);
  const c = pool.take(524296);
  const d = pool.take(524296);
  assert.notEqual(c.buf.buffer, b.buf.buffer);
  for (const x of [b, c, d]) x.release();
  assert.equal(pool.idle, 2);
});
