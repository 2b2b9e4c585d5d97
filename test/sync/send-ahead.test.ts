/**
 * readAhead with an AheadBudget (store/ahead-budget.ts), as a peer upload's send-ahead runs it
 * (api/client.ts sendAheadBudget): streams at once share the budget, a lone one gets its full
 * depth, and none waits on another's items.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as delay } from 'node:timers/promises';
import { AheadBudget } from '../../store/ahead-budget.js';
import { readAhead } from '../../sync/framing.js';

/** `n` items produced at once, counting how many were taken from it and not yet handed to the consumer. */
function source(n: number, live: { ahead: number; top: number }): AsyncGenerator<number> {
  return (async function* () {
    for (let i = 0; i < n; i++) {
      live.ahead++;
      live.top = Math.max(live.top, live.ahead);
      yield i;
    }
  })();
}

async function consume(budget: AheadBudget, n: number, live: { ahead: number; top: number }, pauseMs: number): Promise<number[]> {
  const got: number[] = [];
  for await (const x of readAhead(source(n, live), budget)) {
    live.ahead--;
    got.push(x);
    await delay(pauseMs);
  }
  return got;
}

test('readAhead with a budget: a lone stream reads maxDepth ahead; eight at once hold at most the limit plus one each, every item in order', async () => {
  const budget = new AheadBudget(48, 16);
  const lone = { ahead: 0, top: 0 };
  assert.deepEqual(await consume(budget, 40, lone, 2), Array.from({ length: 40 }, (_, i) => i));
  assert.equal(budget.peak, 16);
  assert.ok(lone.top >= 16, `the source ran ${lone.top} items ahead`);

  budget.resetPeak();
  const live = { ahead: 0, top: 0 };
  const all = await Promise.all(Array.from({ length: 8 }, () => consume(budget, 40, live, 2)));
  for (const got of all) assert.deepEqual(got, Array.from({ length: 40 }, (_, i) => i));
  // Without the budget: 8 x 16 = 128 items ahead.
  assert.ok(budget.peak <= budget.limit + 8, `eight streams held ${budget.peak} items ahead (limit ${budget.limit})`);
  assert.ok(live.top <= budget.limit + 8 + 8, `the sources ran ${live.top} items ahead`);
  assert.equal(budget.inUse, 0);
  assert.equal(budget.streams, 0);
});

test('readAhead with a budget: a stream finishes while others hold the whole budget with stalled consumers; a stream stopped early leaves its share', async () => {
  const budget = new AheadBudget(7, 8);
  const stalled = readAhead(source(100, { ahead: 0, top: 0 }), budget);
  await stalled.next(); // it read 7 ahead, handed one out and is never asked again
  await delay(10);
  assert.equal(budget.inUse, 6);
  const peak = budget.peak;
  budget.resetPeak();
  const got = await consume(budget, 30, { ahead: 0, top: 0 }, 0);
  assert.equal(got.length, 30);
  assert.equal(peak, 7);
  assert.equal(budget.peak, 7, 'the other stream read ahead only what the limit left (one), and then one at a time');
  await stalled.return(undefined);
  assert.equal(budget.inUse, 0);
  assert.equal(budget.streams, 0);
});

test('AheadBudget: the fair share is limit / streams, between 1 and maxDepth', () => {
  const b = new AheadBudget(24, 8);
  const shares = [b.join()];
  assert.equal(b.depth(), 8);
  for (let i = 0; i < 5; i++) shares.push(b.join());
  assert.equal(b.depth(), 4);
  for (let i = 0; i < 30; i++) shares.push(b.join());
  assert.equal(b.depth(), 1);
  for (const s of shares) assert.equal(s.tryTake(), true, 'a stream holding nothing always gets one');
  assert.equal(shares[0]!.tryTake(), false);
  for (const s of shares) s.leave();
  assert.equal(b.inUse, 0);
  assert.equal(b.streams, 0);
});
