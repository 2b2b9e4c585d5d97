/** Property tests of the block stream framing: round trip, and every corruption or truncation refused. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { hashBlock } from '../../store/index.js';
import type { BlockFrame } from '../../store/types.js';
import { BufferPool, coalesce, decodeFrames, encodeFrames, sampleEntropy, takeRelease, CODEC_DEFLATE, HEADER_BYTES } from '../../sync/framing.js';
import { Store } from '../../store/index.js';
import { tempDir } from '../store/helpers.js';
import { throttle } from '../../sync/bwlimit.js';

async function* from<T>(xs: readonly T[]): AsyncGenerator<T> {
  for (const x of xs) yield x;
}

async function encode(blocks: Buffer[]): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of encodeFrames(from(blocks.map((data) => ({ hash: hashBlock(data), data }))))) parts.push(c);
  return Buffer.concat(parts);
}

async function decode(wire: Buffer, chunk = 1000): Promise<BlockFrame[]> {
  const pieces: Buffer[] = [];
  for (let i = 0; i < wire.length; i += chunk) pieces.push(wire.subarray(i, i + chunk));
  const out: BlockFrame[] = [];
  for await (const f of decodeFrames(from(pieces), { verify: true })) out.push(f);
  return out;
}

const blockArb = fc.oneof(
  fc.integer({ min: 1, max: 40000 }).map((n) => randomBytes(n)),
  fc.tuple(fc.integer({ min: 1, max: 40000 }), fc.integer({ min: 0, max: 255 })).map(([n, v]) => Buffer.alloc(n, v)),
  fc.integer({ min: 1, max: 30000 }).map((n) => Buffer.from('tandem '.repeat(n))),
);

test('frames round-trip in any chunking; compressible blocks are deflated, random ones are not', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(blockArb, { maxLength: 6 }), fc.integer({ min: 1, max: 5000 }), async (blocks, chunk) => {
      const wire = await encode(blocks);
      const got = await decode(wire, chunk);
      assert.equal(got.length, blocks.length);
      got.forEach((f, i) => assert.ok(f.data.equals(blocks[i]!)));
    }),
    { numRuns: 60 },
  );
  const text = Buffer.from('x'.repeat(100000));
  const wire = await encode([text]);
  assert.equal(wire[1], CODEC_DEFLATE);
  assert.ok(wire.length < 5000);
  const rnd = await encode([randomBytes(100000)]);
  assert.equal(rnd[1], 0, 'incompressible blocks go raw');
});

test('any flipped byte or any truncation of a stream is refused with ERR_BLOCK_CORRUPT', async () => {
  const blocks = [randomBytes(3000), Buffer.from('abc'.repeat(3000)), randomBytes(10)];
  const wire = await encode(blocks);
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 0, max: wire.length - 1 }), fc.boolean(), async (pos, truncate) => {
      const bad = truncate ? wire.subarray(0, pos) : Buffer.from(wire);
      if (!truncate) bad[pos]! ^= 0xff;
      await assert.rejects(decode(bad), (e: { code?: string }) => e.code === 'ERR_BLOCK_CORRUPT');
    }),
    { numRuns: 300 },
  );
});

test('an error frame from the sender is raised with its code', async () => {
  async function* failing(): AsyncGenerator<BlockFrame> {
    const d = randomBytes(100);
    yield { hash: hashBlock(d), data: d };
    throw Object.assign(new Error('disk gone'), { code: 'EIO' });
  }
  const parts: Buffer[] = [];
  for await (const c of encodeFrames(failing(), { errorFrames: true })) parts.push(c);
  await assert.rejects(decode(Buffer.concat(parts)), (e: { code?: string; message: string }) => e.code === 'ERR_INTERNAL' && /disk gone/.test(e.message));
  assert.equal(HEADER_BYTES, 42);
});

test('throttle keeps a stream near its rate', async () => {
  const rate = 4 * 1024 * 1024;
  const started = performance.now();
  let n = 0;
  for await (const c of throttle(from(Array.from({ length: 16 }, () => Buffer.alloc(128 * 1024))), rate)) n += c.length;
  const secs = (performance.now() - started) / 1000;
  assert.equal(n, 2 * 1024 * 1024);
  // 2 MiB at 4 MiB/s with a 1 MiB burst: at least ~0.25 s, and not much more than 0.5 s.
  assert.ok(secs >= 0.2 && secs < 2, `took ${secs} s`);
});

test("a throttle's wait for tokens ends when its signal is aborted (an upload whose request is over): at once, not when the cap would have let the bytes through", async () => {
  const over = new AbortController();
  // 1 KiB/s: the first 64 KiB slice goes (a bucket starts full), the next would wait ~64 s.
  const it = throttle(from(Array.from({ length: 4 }, () => Buffer.alloc(64 * 1024))), 1024, over.signal)[Symbol.asyncIterator]();
  assert.equal((await it.next()).value?.length, 64 * 1024);
  const started = performance.now();
  const next = it.next();
  setTimeout(() => over.abort(), 100);
  await assert.rejects(next, (e: Error) => e.name === 'AbortError');
  const ms = performance.now() - started;
  assert.ok(ms < 1000, `stopped after ${ms.toFixed(0)} ms`);
});

test('a throttle whose rate is a schedule follows it as the stream runs: capped, then uncapped within a second', async () => {
  let rate = 256 * 1024;
  const started = performance.now();
  let n = 0;
  let switchedAt = 0;
  // 8 MiB: 32 s at the first rate; the cap is lifted once 512 KiB went through.
  for await (const c of throttle(from(Array.from({ length: 64 }, () => Buffer.alloc(128 * 1024))), () => rate)) {
    n += c.length;
    if (n >= 512 * 1024 && rate > 0) {
      rate = 0;
      switchedAt = performance.now();
    }
  }
  const capped = (switchedAt - started) / 1000;
  const after = (performance.now() - switchedAt) / 1000;
  assert.equal(n, 8 * 1024 * 1024);
  // 512 KiB at 256 KiB/s with a 64 KiB burst: about 1.75 s; then 7.5 MiB with no cap within the rate's next look.
  assert.ok(capped >= 1.2 && capped < 5, `the capped part took ${capped} s`);
  assert.ok(after < 2.5, `the uncapped part took ${after} s`);
});

test("throttle: chunks go whole and give their pooled buffers back while no cap is in force (a schedule) or under a high cap, each once the next is asked; under a low cap they are sliced and kept", async () => {
  // Two 512 KiB random blocks (not deflated: the payload is the frame's own buffer), each with a release.
  const released: number[] = [];
  const frames = () => from([0, 1].map((i) => {
    const data = randomBytes(512 * 1024);
    return { hash: hashBlock(data), data, release: () => void released.push(i) };
  }));
  let rate = 0;
  const sizes: number[] = [];
  /** How many payloads had been given back when each payload was yielded. */
  const backBefore: number[] = [];
  for await (const c of throttle(encodeFrames(frames()), () => rate)) {
    sizes.push(c.length);
    if (c.length === 512 * 1024) backBefore.push(released.length);
  }
  assert.equal(sizes.filter((n) => n === 512 * 1024).length, 2, `whole payloads: ${sizes.join()}`);
  assert.deepEqual(backBefore, [0, 1], 'a payload is given back only once the chunk after it is asked');
  assert.deepEqual(released, [0, 1]);
  // A cap of 4 MiB/s: 64 KiB slices (1/64 s of traffic is less), and the buffers are not given back.
  for (const [cap, whole] of [[4 * 1024 * 1024, false], [64 * 1024 * 1024, true]] as const) {
    released.length = 0;
    rate = cap;
    sizes.length = 0;
    for await (const c of throttle(encodeFrames(frames()), () => rate)) sizes.push(c.length);
    // At 64 MiB/s a slice is 1/64 s of traffic, 1 MiB: payloads go whole and are given back.
    assert.equal(Math.max(...sizes), whole ? 512 * 1024 : 64 * 1024, `largest chunk at ${cap} B/s`);
    assert.deepEqual(released, whole ? [0, 1] : []);
  }
});

test('coalesce joins small chunks that are ready together (up to 64 KiB), passes large ones through uncopied, sends what it holds when the source waits, and keeps the bytes and their order', async () => {
  const small = (n: number, i: number) => Buffer.alloc(n, i);
  const big = Buffer.alloc(300 * 1024, 7);
  const t0 = performance.now();
  let resumed = Infinity;
  async function* source(): AsyncGenerator<Buffer> {
    // A job's frames at once: header and patches, header and patches...
    for (let i = 0; i < 30; i++) {
      yield small(44, i);
      yield small(4200, i);
    }
    yield big; // a whole block: through as it is
    yield small(44, 99);
    await new Promise((r) => setTimeout(r, 30)); // the next job is not ready: what is held goes now
    resumed = performance.now() - t0;
    yield small(44, 100);
  }
  const input: Buffer[] = [];
  async function* recorded(): AsyncGenerator<Buffer> {
    for await (const c of source()) {
      input.push(c);
      yield c;
    }
  }
  const out: Array<{ chunk: Buffer; at: number }> = [];
  for await (const chunk of coalesce(recorded())) out.push({ chunk, at: performance.now() - t0 });
  assert.ok(Buffer.concat(out.map((o) => o.chunk)).equals(Buffer.concat(input)), 'the same bytes in the same order');
  assert.ok(out.some((o) => o.chunk === big), 'the large chunk is not copied');
  assert.ok(out.every((o) => o.chunk === big || o.chunk.length <= 64 * 1024 + 4200), 'joined runs stop at about 64 KiB');
  assert.ok(out.length <= 8, `${input.length} chunks went out as ${out.length} writes`);
  const held = out.findIndex((o) => o.chunk.length === 44 && o.chunk[0] === 99);
  assert.ok(held > 0 && out[held]!.at < resumed, `the chunk before the pause went out before the source went on (${out[held]?.at.toFixed(1)} ms, ${resumed.toFixed(1)} ms)`);
});

test('coalesce gives a pooled chunk back once it is copied into a joined one', async () => {
  const pool = new BufferPool(1000);
  const frames: BlockFrame[] = [0, 1, 2].map(() => {
    const { buf, release } = pool.take(1000);
    buf.fill(5);
    return { hash: hashBlock(buf), data: buf, release: release! };
  });
  let given = 0;
  for (const f of frames) {
    const r = f.release!;
    (f as { release: () => void }).release = () => {
      given++;
      r();
    };
  }
  const chunks: Buffer[] = [];
  for await (const c of coalesce(encodeFrames(from(frames), { compress: false }))) chunks.push(c);
  assert.equal(given, 3, 'each payload copied into the joined chunk was released');
  let decoded = 0;
  for await (const f of decodeFrames(from(chunks), { verify: true })) decoded += f.data.length;
  assert.equal(decoded, 3000);
});

test('readAhead keeps order, surfaces errors in place, and stops its source when the consumer stops', async () => {
  const { readAhead } = await import('../../sync/framing.js');
  const got: number[] = [];
  for await (const x of readAhead(from([1, 2, 3, 4, 5]), 3)) got.push(x);
  assert.deepEqual(got, [1, 2, 3, 4, 5]);
  async function* failing(): AsyncGenerator<number> {
    yield 1;
    yield 2;
    throw new Error('boom');
  }
  const seen: number[] = [];
  await assert.rejects(async () => {
    for await (const x of readAhead(failing(), 4)) seen.push(x);
  }, /boom/);
  assert.deepEqual(seen, [1, 2]);
  let finished = false;
  async function* endless(): AsyncGenerator<number> {
    try {
      for (let i = 0; ; i++) yield i;
    } finally {
      finished = true;
    }
  }
  for await (const x of readAhead(endless(), 2)) if (x === 3) break;
  assert.equal(finished, true);
});

test('pooled payloads: the store releases each frame after writing it, and the buffers are reused', async (t) => {
  const size = 512 * 1024; // putBlocks writes 8 of these per batch, then releases them
  const blocks = Array.from({ length: 40 }, () => randomBytes(size));
  const wire = await encode(blocks);
  const pieces: Buffer[] = [];
  for (let i = 0; i < wire.length; i += 65536) pieces.push(wire.subarray(i, i + 65536));
  const pool = new BufferPool(size, 8);
  const seen = new Set<ArrayBufferLike>();
  let released = 0;
  async function* watched(): AsyncGenerator<BlockFrame> {
    for await (const f of decodeFrames(from(pieces), { verify: true, pool })) {
      assert.ok(f.release, 'a raw frame of the pool size carries release');
      seen.add(f.data.buffer);
      yield { hash: f.hash, data: f.data, release: () => (released++, f.release!()) };
    }
  }
  const store = await Store.open(await tempDir(t));
  t.after(() => store.close());
  const r = await store.putBlocks(watched());
  assert.equal(r.stored, 40);
  assert.equal(released, 40, 'every frame released once written');
  assert.ok(seen.size < 40, `buffers were reused (${seen.size} distinct for 40 frames)`);
  for (const [i, b] of blocks.entries()) assert.ok((await store.getBlock(hashBlock(b), size)).equals(b), `block ${i} stored intact`);
});

test('sampleEntropy tells random bytes from compressible ones', () => {
  assert.ok(sampleEntropy(randomBytes(512 * 1024)) > 7.9);
  assert.ok(sampleEntropy(Buffer.from('tandem replicates volumes '.repeat(20000))) < 5);
  assert.equal(sampleEntropy(Buffer.alloc(4096)), 0);
});

test('pooled pack reads: getBlocks frames carry release; a buffer is read into again only after its release', async (t) => {
  const size = 512 * 1024;
  const blocks = Array.from({ length: 24 }, () => randomBytes(size));
  const store = await Store.open(await tempDir(t));
  t.after(() => store.close());
  await store.putBlocks((async function* () {
    for (const b of blocks) yield { hash: hashBlock(b), data: b };
  })());
  await store.flush();
  const hashes = blocks.map((b) => hashBlock(b));
  // Held, never released: every frame keeps its own bytes, all intact to the end.
  const held: BlockFrame[] = [];
  for await (const f of store.getBlocks(hashes)) {
    assert.ok(f.release, 'a block-sized frame read from a pack carries release');
    held.push(f);
  }
  held.forEach((f, i) => assert.ok(f.data.equals(blocks[i]!), `held block ${i} intact`));
  assert.equal(new Set(held.map((f) => f.data.buffer)).size, blocks.length);
  // Released after use: the next reads reuse those buffers, and read correctly into them.
  for (const f of held) f.release!();
  const reused = new Set(held.map((f) => f.data.buffer));
  let again = 0;
  for await (const f of store.getBlocks(hashes)) {
    assert.ok(f.data.equals(blocks[again]!), `block ${again} read again intact`);
    assert.ok(reused.has(f.data.buffer), 'read into a released buffer');
    again++;
    f.release!();
  }
  assert.equal(again, blocks.length);
  // Encoded for the wire, a raw payload hands its release to whoever writes it out.
  let given = 0;
  const chunks: Buffer[] = [];
  for await (const c of encodeFrames((async function* () { yield { ...held[0]!, release: () => given++ }; })())) chunks.push(c);
  assert.equal(given, 0, 'not released by the encoder: the payload is still to be written');
  const r = chunks.map((c) => takeRelease(c)).filter((x) => x !== undefined);
  assert.equal(r.length, 1, 'exactly the payload chunk carries it');
  r[0]!();
  assert.equal(given, 1);
});

test('deflated frames are inflated into the pool\'s buffers, of any size, reused once released; one that would inflate past its length is refused', async () => {
  const pool = new BufferPool(512 * 1024, 8);
  const block = Buffer.alloc(3 * 1024 * 1024, 7); // not the pool's common size
  randomBytes(64).copy(block, 1000);
  const wire = await encode([block]);
  assert.equal(wire[1], CODEC_DEFLATE);
  const once = async () => {
    const got: BlockFrame[] = [];
    for await (const f of decodeFrames(from([wire]), { verify: true, pool })) got.push(f);
    assert.equal(got.length, 1);
    assert.ok(got[0]!.data.equals(block));
    assert.ok(got[0]!.release, 'an inflated frame carries the release of its pooled buffer');
    return got[0]!;
  };
  const first = await once();
  first.release!();
  const second = await once();
  assert.equal(second.data.buffer, first.data.buffer, 'inflated into the buffer the first frame gave back');
  // The same payload under a rawLen one byte short: the inflate stops there.
  const short = Buffer.from(wire);
  short.writeUInt32BE(block.length - 1, 34);
  await assert.rejects(async () => {
    for await (const _ of decodeFrames(from([short]), { pool })) void _;
  }, { code: 'ERR_BLOCK_CORRUPT', message: /does not inflate \(inflates past 3145727 bytes\)/ });
});
