/**
 * Blocks as deltas of a block the receiver holds: the diff and its application (properties),
 * delta frames on the wire, and a store resolving them where they enter it (Store.putBlocks):
 * built from its copy of the base, verified against the block's hash, or named in needWhole
 * when it lacks the base; malformed deltas refused with nothing stored.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { deflateRawSync } from 'node:zlib';
import fc from 'fast-check';
import { applyPatches, diffBlock, hashBlock, mayBeSparse, Store, ZERO_HASH } from '../../store/index.js';
import type { BlockFrame, Hash } from '../../store/types.js';
import { CODEC_DELTA, CODEC_DELTA_DEFLATE, decodeFrames, encodeFrames } from '../../sync/framing.js';
import { collect, from, tempDir, written } from '../store/helpers.js';

/** The patches of a delta payload (what decodeFrames yields as `data`). */
const patchesOf = (delta: Buffer) => delta.subarray(32);

test('diffBlock + applyPatches rebuild the block from its base for any writes; a delta is at most half the block, else none', () => {
  const size = 64 * 1024;
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: 9000 })), { maxLength: 8 }),
      (ws) => {
        const base = randomBytes(size);
        const data = written(base, ws.map(([off, len]) => [off, randomBytes(len)]));
        const delta = diffBlock(data, hashBlock(base), base);
        if (delta === null) {
          assert.ok(ws.reduce((n, [, len]) => n + len, 0) > size / 8, 'only large changes go whole');
          return;
        }
        assert.ok(delta.length <= size / 2);
        assert.ok(delta.subarray(0, 32).equals(hashBlock(base)), 'the payload starts with the base hash');
        const rebuilt = applyPatches(Buffer.from(base), patchesOf(delta), hashBlock(data));
        assert.ok(rebuilt.equals(data));
      },
    ),
    { numRuns: 200 },
  );
  const base = randomBytes(size);
  const one = written(base, [[1000, randomBytes(4096)]]);
  const d = diffBlock(one, hashBlock(base), base)!;
  assert.equal(d.length, 32 + 4 + 8 + 9 * 512, 'a 4 KiB write at offset 1000 is 9 units of 512 bytes in one patch');
  assert.equal(diffBlock(randomBytes(size), hashBlock(base), base), null, 'a block unlike its base goes whole');
  assert.equal(diffBlock(one, hashBlock(base), base.subarray(1)), null, 'a base of another length is no base');
});

test('mayBeSparse: a zero block with one write of up to an eighth of it may be sparse at either limit; data throughout may not; a small block is always tried', () => {
  for (const size of [64 * 1024, 512 * 1024]) {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: size / 8 }), (off, len) => {
        const data = written(Buffer.alloc(size), [[Math.min(off, size - len), randomBytes(len)]]);
        assert.ok(mayBeSparse(data, 2) && mayBeSparse(data, 4), `a write of ${len} bytes at ${off}`);
        // What the check lets through, a diff against zeros encodes (it only ever saves the diff).
        const d = diffBlock(data, ZERO_HASH, Buffer.alloc(size));
        assert.ok(d !== null && applyPatches(Buffer.alloc(size), patchesOf(d), hashBlock(data)).equals(data));
      }),
      { numRuns: 100 },
    );
    assert.equal(mayBeSparse(randomBytes(size)), false);
    assert.equal(mayBeSparse(randomBytes(size), 4), false);
    // Small files: each 4 KiB page holds 3,000 bytes of data, then zeros. Half the block is
    // data: it may be sent as a delta (at most half), not stored as one (at most a quarter).
    const pages = Buffer.alloc(size);
    for (let p = 0; p < size; p += 4096) randomBytes(3000).copy(pages, p);
    assert.equal(mayBeSparse(pages, 4), false);
  }
  assert.equal(mayBeSparse(randomBytes(8 * 1024)), true, 'fewer than 32 units: the diff decides');
});

test('applyPatches refuses patches out of order, overlapping, outside the block, cut short or followed by bytes: ERR_BLOCK_CORRUPT', () => {
  const h = hashBlock(Buffer.from('x'));
  const patches = (...ps: Array<[number, Buffer]>) => {
    const parts: Buffer[] = [Buffer.alloc(4)];
    parts[0]!.writeUInt32BE(ps.length);
    for (const [off, b] of ps) {
      const head = Buffer.alloc(8);
      head.writeUInt32BE(off);
      head.writeUInt32BE(b.length, 4);
      parts.push(head, b);
    }
    return Buffer.concat(parts);
  };
  const ok = patches([0, Buffer.from('ab')], [10, Buffer.from('cd')]);
  assert.equal(applyPatches(Buffer.alloc(16), ok, h).toString('latin1', 10, 12), 'cd');
  const bad = [
    patches([10, Buffer.from('ab')], [0, Buffer.from('cd')]), // out of order
    patches([0, Buffer.from('abcd')], [2, Buffer.from('cd')]), // overlapping
    patches([15, Buffer.from('ab')]), // past the end
    patches([3, Buffer.alloc(0)]), // empty
    ok.subarray(0, ok.length - 1), // cut short
    Buffer.concat([ok, Buffer.from([0])]), // trailing byte
    Buffer.from([0, 0]), // no count
  ];
  for (const [i, p] of bad.entries()) assert.throws(() => applyPatches(Buffer.alloc(16), p, h), { code: 'ERR_BLOCK_CORRUPT' }, `case ${i}`);
});

test('a frame with a base goes as a delta frame when that is shorter; a decoder takes it only when asked for deltas', async () => {
  const base = randomBytes(65536);
  const data = written(base, [[5000, randomBytes(4096)]]);
  const other = randomBytes(65536);
  const frames: BlockFrame[] = [
    { hash: hashBlock(data), data, base: { hash: hashBlock(base), data: base } },
    { hash: hashBlock(other), data: other, base: { hash: hashBlock(base), data: base } }, // unlike its base: raw
    { hash: hashBlock(base), data: base },
  ];
  const wire = Buffer.concat(await collect(encodeFrames(from(frames))));
  assert.ok(wire.length < 42 * 4 + 36 + 8 + 9 * 512 + 2 * 65536 + 1, `${wire.length} bytes`);
  assert.equal(wire[1], CODEC_DELTA);
  const got = await collect(decodeFrames(from([wire]), { deltas: true }));
  assert.deepEqual(got.map((f) => f.delta?.length), [65536, undefined, undefined]);
  assert.ok(got[0]!.delta!.base.equals(hashBlock(base)));
  assert.ok(applyPatches(Buffer.from(base), got[0]!.data, got[0]!.hash).equals(data));
  assert.ok(got[1]!.data.equals(other) && got[2]!.data.equals(base));
  await assert.rejects(collect(decodeFrames(from([wire]))), { code: 'ERR_BLOCK_CORRUPT', message: /unknown codec 2/ }, 'a stream that did not ask for deltas refuses them');
});

test('deflated delta frames: a compressible delta goes deflated only to a receiver that takes it, decodes to the same patches; a random one, or a stored one, as it pays; malformed ones are refused', async () => {
  const base = randomBytes(65536);
  const text = Buffer.from('INSERT INTO orders VALUES (1042, "pending", 12.50);\n'.repeat(80)); // 4,160 bytes
  const data = written(base, [[5000, text]]);
  const random = written(base, [[20000, randomBytes(4096)]]);
  const stored = written(base, [[30000, text]]);
  const storedPatches = diffBlock(stored, hashBlock(base), base)!.subarray(32);
  const frames = (): BlockFrame[] => [
    { hash: hashBlock(data), data, base: { hash: hashBlock(base), data: base } },
    { hash: hashBlock(random), data: random, base: { hash: hashBlock(base), data: base } },
    { hash: hashBlock(stored), data: storedPatches, delta: { base: hashBlock(base), length: 65536 } },
  ];
  /** Each frame's codec and payload length, walking the headers. */
  const framesOf = (wire: Buffer) => {
    const out: Array<[number, number]> = [];
    for (let at = 0; wire[at] === 0x42; at += 42 + wire.readUInt32BE(at + 38)) out.push([wire[at + 1]!, wire.readUInt32BE(at + 38)]);
    return out;
  };
  const plain = Buffer.concat(await collect(encodeFrames(from(frames()))));
  assert.deepEqual(framesOf(plain).map(([c]) => c), [CODEC_DELTA, CODEC_DELTA, CODEC_DELTA], 'not asked: plain deltas');
  const wire = Buffer.concat(await collect(encodeFrames(from(frames()), { deflateDeltas: () => true })));
  const codecs = framesOf(wire);
  assert.deepEqual(codecs.map(([c]) => c), [CODEC_DELTA_DEFLATE, CODEC_DELTA, CODEC_DELTA_DEFLATE], 'random patches do not deflate');
  assert.ok(codecs[0]![1] < 1024 && codecs[2]![1] < 1024, `deflated payloads of ${codecs[0]![1]} and ${codecs[2]![1]} bytes for 4,160 bytes of text`);
  const got = await collect(decodeFrames(from([wire]), { deltas: true }));
  for (const [i, want] of [data, random, stored].entries()) {
    assert.ok(got[i]!.delta!.base.equals(hashBlock(base)) && got[i]!.delta!.length === 65536);
    assert.ok(applyPatches(Buffer.from(base), got[i]!.data, got[i]!.hash).equals(want), `frame ${i} rebuilds its block`);
  }
  await assert.rejects(collect(decodeFrames(from([wire]))), { code: 'ERR_BLOCK_CORRUPT', message: /unknown codec 3/ }, 'a stream that did not ask for deltas refuses them');

  // A deflated delta whose payload is not DEFLATE, or inflates past its block: refused.
  const first = wire.subarray(0, 42 + codecs[0]![1]);
  const end = Buffer.alloc(42);
  end[0] = 0x45;
  end.writeUInt32BE(1, 34);
  const garbled = Buffer.from(first);
  garbled.fill(0xff, 42, 52);
  await assert.rejects(collect(decodeFrames(from([garbled, end]), { deltas: true })), { code: 'ERR_BLOCK_CORRUPT', message: /does not inflate/ });
  const bomb = deflateRawSync(Buffer.alloc(65536 + 37));
  const big = Buffer.concat([first.subarray(0, 42), bomb]);
  big.writeUInt32BE(bomb.length, 38);
  await assert.rejects(collect(decodeFrames(from([big, end]), { deltas: true })), { code: 'ERR_BLOCK_CORRUPT', message: /does not inflate/ });
});

test('a store builds delta frames from its copy of the base and verifies them; a base it lacks is named in needWhole; a bad delta stores nothing', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const size = 65536;
  const base = randomBytes(size);
  await store.putBlocks(from([{ hash: hashBlock(base), data: base }]));
  const delta = (data: Buffer, b: Buffer, bHash: Hash = hashBlock(b)): BlockFrame => {
    const d = diffBlock(data, bHash, b)!;
    return { hash: hashBlock(data), data: d.subarray(32), delta: { base: bHash, length: data.length } };
  };

  // Held base, zero base, and a base this store lacks, in one stream with a whole block.
  const fromBase = written(base, [[100, randomBytes(3000)]]);
  const fromZero = written(Buffer.alloc(size), [[60000, randomBytes(2000)]]);
  const absentBase = randomBytes(size);
  const fromAbsent = written(absentBase, [[0, randomBytes(100)]]);
  const whole = randomBytes(size);
  const r = await store.putBlocks(from([delta(fromBase, base), delta(fromZero, Buffer.alloc(size), ZERO_HASH), delta(fromAbsent, absentBase), { hash: hashBlock(whole), data: whole }]));
  assert.equal(r.stored, 3);
  assert.equal(r.bytes, 3 * size, 'whole blocks stored');
  assert.deepEqual(r.needWhole?.map((h) => h.toString('hex')), [hashBlock(fromAbsent).toString('hex')]);
  assert.ok((await store.getBlock(hashBlock(fromBase))).equals(fromBase));
  assert.ok((await store.getBlock(hashBlock(fromZero))).equals(fromZero));
  assert.deepEqual(await store.hasBlocks([hashBlock(fromAbsent)]), [false], 'not stored: to be sent whole');

  // A delta that builds something else than its hash, one that names the base with another
  // length, and malformed patches: ERR_BLOCK_CORRUPT, and that block is not stored.
  const target = written(base, [[7, randomBytes(10)]]);
  const good = delta(target, base);
  const lying: BlockFrame = { ...good, hash: hashBlock(randomBytes(size)) };
  const wrongLength: BlockFrame = { ...good, delta: { base: hashBlock(base), length: size - 1 } };
  const cut: BlockFrame = { ...good, data: good.data.subarray(0, good.data.length - 1) };
  for (const [what, f] of [['wrong result', lying], ['wrong length', wrongLength], ['cut short', cut]] as const) {
    await assert.rejects(store.putBlocks(from([f])), { code: 'ERR_BLOCK_CORRUPT' }, what);
    assert.deepEqual(await store.hasBlocks([f.hash]), [false], what);
  }
  assert.deepEqual(await store.hasBlocks([hashBlock(target)]), [false]);
  assert.equal((await store.putBlocks(from([good]))).stored, 1, 'the same delta, whole, is stored');
  assert.ok((await store.getBlock(hashBlock(target))).equals(target));
  assert.ok((await store.getBlock(hashBlock(base))).equals(base), 'the base itself is untouched (patched in a copy)');
});

test('getBlocks attaches the bases it holds (zeros included) for a peer stream; one it lacks leaves the block whole', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const a = randomBytes(65536);
  const b = written(a, [[0, randomBytes(10)]]);
  const little = written(Buffer.alloc(65536), [[5000, randomBytes(3000)]]);
  await store.putBlocks(from([a, b, little].map((data) => ({ hash: hashBlock(data), data }))));
  const frames = await collect(store.getBlocks([hashBlock(b), hashBlock(b), hashBlock(a), hashBlock(a), hashBlock(little)], { bases: [hashBlock(a), ZERO_HASH, hashBlock(randomBytes(8)), null, ZERO_HASH], consumerVerifies: true }));
  assert.ok(frames[0]!.base!.data.equals(a) && frames[0]!.base!.hash.equals(hashBlock(a)));
  assert.equal(frames[1]!.base, undefined, 'zeros for a block of data throughout: no diff would come of it (mayBeSparse)');
  assert.equal(frames[2]!.base, undefined, 'a base not held: none');
  assert.equal(frames[3]!.base, undefined);
  assert.ok(frames[4]!.base!.hash.equals(ZERO_HASH) && frames[4]!.base!.data.equals(Buffer.alloc(65536)), 'zeros for a block of little data');
  for (const f of frames) f.base?.release?.(), f.release?.();
});
