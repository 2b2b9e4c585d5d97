/**
 * The byte budget of received frames (sync/framing.ts DecodeOptions.budget, Store.putBlocks'
 * `budget`), as a receiving server wires it: each stream decodes into its read-ahead and stores
 * with putBlocks. Streams that together want more than the budget all complete, and every byte
 * taken is given back, whether a stream completes or fails.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { deflateRawSync } from 'node:zlib';
import { ByteBudget, hashBlock, Store } from '../../store/index.js';
import { BufferPool, decodeFrames, frameHeader, readAhead } from '../../sync/framing.js';
import { tempDir } from '../store/helpers.js';

const MiB = 1024 * 1024;
/** Blocks of 1.25 MiB: three (3.75 MiB) stay in putBlocks' batch (written at 4 MiB) until it is told to write them. */
const SIZE = 1.25 * MiB;
/** Four blocks' worth: two streams holding two each (or one holding three) have most of it. */
const LIMIT = 5 * MiB;


/** `n` distinct blocks of SIZE bytes, each one byte value but for 8 random bytes (~1.3 KB deflated). */
function blocks(n: number): Buffer[] {
  return Array.from({ length: n }, (_, i) => {
    const data = Buffer.alloc(SIZE, 1 + (i % 200));
    randomBytes(8).copy(data, (i * 4096) % (SIZE - 8));
    return data;
  });
}

/** The deflated (codec 1) frame of `data`. */
function frame(data: Buffer): Buffer {
  const payload = deflateRawSync(data);
  return Buffer.concat([frameHeader(0x42, 1, hashBlock(data), data.length, payload.length), payload]);
}

const end = (count: number) => frameHeader(0x45, 0, null, count, 0);

/** A sender: its frames, then (after `wait`, when given) the end frame. */
async function* sender(bs: Buffer[], wait?: Promise<unknown>): AsyncGenerator<Buffer> {
  for (const b of bs) yield frame(b);
  await wait;
  yield end(bs.length);
}

/** A stream received as the blocks/put route does: decoded into a read-ahead of 8, stored by putBlocks. */
function receive(store: Store, budget: ByteBudget, pool: BufferPool, source: AsyncIterable<Buffer>) {
  const decoded = decodeFrames(source, { pool, budget, deltas: true, upload: true });
  return store.putBlocks(readAhead(decoded, 8, (f) => f.release?.()), { budget });
}

async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  const timeout = new AbortController();
  return Promise.race([p, delay(ms, undefined, { signal: timeout.signal }).then(() => assert.fail(what))]).finally(() => timeout.abort());
}

async function setup(t: TestContext) {
  const store = await Store.open(await tempDir(t));
  t.after(() => store.close());
  return { store, budget: new ByteBudget(LIMIT), pool: new BufferPool(SIZE, 4) };
}

test('two streams that each fill half the budget of received frames and then want more both complete: each has what it holds written while it waits', async (t) => {
  const { store, budget, pool } = await setup(t);
  const [a, b] = [blocks(6), blocks(6).map((d) => Buffer.from(d.map((x) => x ^ 0x80)))];
  const results = await within(20_000, 'two streams waited on each other\'s budget for 20 s', Promise.all([receive(store, budget, pool, sender(a)), receive(store, budget, pool, sender(b))]));
  assert.deepEqual(results.map((r) => r.stored), [6, 6]);
  assert.equal(budget.inUse, 0, 'every frame written gave its bytes back');
  for (const d of [...a, ...b]) assert.ok((await store.getBlock(hashBlock(d), SIZE)).equals(d));
});

test('a stream that holds most of the budget of received frames and waits for its sender does not keep it from another: what it holds is written once the other wants it', async (t) => {
  const { store, budget, pool } = await setup(t);
  const [idle, busy] = [blocks(3), blocks(8).map((d) => Buffer.from(d.map((x) => x ^ 0x80)))];
  let busyDone!: () => void;
  const busyDoneP = new Promise<void>((resolve) => (busyDone = resolve));
  // The idle stream's 3 blocks (3.75 of 5 MiB) sit in its write batch until the busy one is done.
  const idleStream = receive(store, budget, pool, sender(idle, busyDoneP));
  await delay(200);
  const r = await within(20_000, 'a stream waited 20 s for budget that an idle stream held', receive(store, budget, pool, sender(busy)));
  busyDone();
  assert.equal(r.stored, 8);
  assert.equal((await idleStream).stored, 3);
  assert.equal(budget.inUse, 0);
});

test('frames of a stream that fails give their bytes back: those read ahead, those in the write batch, the one being decoded', async (t) => {
  const { store, budget, pool } = await setup(t);
  const bs = blocks(10);
  const bad = Buffer.from(bs[4]!);
  bad[0]! ^= 1; // frame 4 inflates to a block that does not match its hash
  const framesOf = (i: number) => (i === 4 ? Buffer.concat([frameHeader(0x42, 1, hashBlock(bs[4]!), SIZE, deflateRawSync(bad).length), deflateRawSync(bad)]) : frame(bs[i]!));
  await assert.rejects(receive(store, budget, pool, (async function* () {
    for (let i = 0; i < bs.length; i++) yield framesOf(i);
    yield end(bs.length);
  })()), { code: 'ERR_BLOCK_CORRUPT' });
  // A stream cut in the middle of a frame, and one whose deflate data is garbage.
  await assert.rejects(receive(store, budget, pool, (async function* () {
    yield frame(bs[0]!);
    yield frame(bs[1]!).subarray(0, 100);
  })()), { code: 'ERR_BLOCK_CORRUPT' });
  await assert.rejects(receive(store, budget, pool, (async function* () {
    yield frame(bs[0]!);
    yield Buffer.concat([frameHeader(0x42, 1, hashBlock(bs[1]!), SIZE, 64), randomBytes(64)]);
    yield end(2);
  })()), { code: 'ERR_BLOCK_CORRUPT' });
  await delay(50); // frames dropped from the read-ahead are released as their decoding settles
  assert.equal(budget.inUse, 0, 'no byte of the budget is left taken');
  // The budget is whole: a stream of more than it holds completes.
  const r = await within(20_000, 'the budget was not given back', receive(store, budget, pool, sender(bs)));
  assert.equal(r.stored, 10 - 4); // blocks 0-3 were stored by the first stream, before its bad frame
});

test('repair streams hold received frames in their write batch within the budget too: two that each fill half of it and want more complete, and a failed one gives its bytes back', async (t) => {
  const { store, budget } = await setup(t);
  const [a, b] = [blocks(6), blocks(6).map((d) => Buffer.from(d.map((x) => x ^ 0x80)))];
  // A repair's batch is written at 8 MiB: without the handover, each would hold its 2.5 MiB and wait for more.
  const repair = (source: AsyncIterable<Buffer>) => store.repairBlocks(decodeFrames(source, { budget, upload: true }), undefined, { budget });
  const results = await within(20_000, 'two repair streams waited on each other\'s budget for 20 s', Promise.all([repair(sender(a)), repair(sender(b))]));
  assert.deepEqual(results, [6, 6]);
  assert.equal(budget.inUse, 0);
  for (const d of [...a, ...b]) assert.ok((await store.getBlock(hashBlock(d), SIZE)).equals(d));
  const c = blocks(3).map((d) => Buffer.from(d.map((x) => x ^ 0x40)));
  await assert.rejects(repair((async function* () {
    yield frame(c[0]!);
    yield frame(c[1]!);
    yield frame(c[2]!).subarray(0, 100);
  })()), { code: 'ERR_BLOCK_CORRUPT' });
  assert.equal(budget.inUse, 0, 'the frames of its unwritten batch gave their bytes back');
});
