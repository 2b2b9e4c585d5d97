/**
 * The store-wide budget of blocks putBlocks builds from delta frames (store/budget.ts): streams
 * that together want more than it all complete, each handing over what it built while it waits.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { diffBlock, hashBlock, Store } from '../../store/index.js';
import type { BlockFrame } from '../../store/types.js';
import { tempDir } from './helpers.js';

const BIG = 16 * 1024 * 1024;

test('two streams of 16 MiB deltas that each fill half the 128 MiB budget and then want more both complete: a stream waiting for budget first has what it built written', async (t) => {
  const store = await Store.open(join(await tempDir(t), 'store'));
  t.after(() => store.close());
  const base = randomBytes(BIG);
  const baseHash = hashBlock(base);
  await store.putBlocks((async function* () {
    yield { hash: baseHash, data: base };
  })());
  // 10 blocks, each the base with 4 KiB written somewhere: 5 a stream, delta frames of it.
  const frames: BlockFrame[] = Array.from({ length: 10 }, (_, i) => {
    const data = Buffer.from(base);
    randomBytes(4096).copy(data, i * 1024 * 1024);
    const d = diffBlock(data, baseHash, base)!;
    return { hash: hashBlock(data), data: d.subarray(32), delta: { base: baseHash, length: BIG } };
  });
  // Each stream's first 4 deltas take 64 MiB; its 5th is ready at once, when the budget is full.
  const stream = (mine: BlockFrame[]) => store.putBlocks((async function* () {
    yield* mine;
  })());
  const timeout = new AbortController();
  const results = await Promise.race([
    Promise.all([stream(frames.slice(0, 5)), stream(frames.slice(5))]),
    delay(60_000, undefined, { signal: timeout.signal }).then(() => assert.fail('two streams waited on each other\'s budget for 60 s')),
  ]).finally(() => timeout.abort());
  assert.deepEqual(results.map((r) => r.stored), [5, 5]);
  assert.equal(store.deltaBudget.inUse, 0, 'every block written gave its budget back');
  for (const f of frames) assert.equal((await store.getBlock(f.hash)).length, BIG);
});
