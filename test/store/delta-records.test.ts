/**
 * Delta records (store/README.md, "Delta records"): a block that arrives as a small delta of a
 * block the store holds is stored as that delta, never as a delta of a delta; it reads back
 * byte-exact through every read path; verify checks it through its base; gc keeps a base that
 * only deltas need, and drops it with them; a base gone before the append makes the block go whole.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { open, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { ClassicLevel } from 'classic-level';
import { applyPatches, composeDeltas, diffBlock, hashBlock, Store, ZERO_HASH } from '../../store/index.js';
import { packFileName } from '../../store/pack.js';
import { decodeFrames, encodeFrames } from '../../sync/framing.js';
import type { BlockFrame, ScanProgress, SnapshotRecord } from '../../store/types.js';
import { collect, fileReader, from, localFileReader, storeWithImage, tempDir, written } from './helpers.js';

const BS = 65536;

/** `data` as a delta frame of `base`, as a peer's block stream delivers it. */
function deltaFrame(data: Buffer, base: Buffer): BlockFrame {
  const d = diffBlock(data, hashBlock(base), base);
  assert.ok(d, 'small enough to be a delta');
  return { hash: hashBlock(data), data: d.subarray(32), delta: { base: hashBlock(base), length: data.length } };
}

async function packBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(join(dir, 'packs'))) n += (await stat(join(dir, 'packs', f))).size;
  return n;
}

test('composeDeltas: the base patched by the composed delta is the base patched by the first, then by the second', () => {
  const writes = fc.array(fc.tuple(fc.nat(4095), fc.integer({ min: 1, max: 300 })), { maxLength: 6 });
  fc.assert(
    fc.property(writes, writes, fc.nat(), (w1, w2, seed) => {
      const fill = (n: number, k: number) => Buffer.alloc(n, (seed + k) & 0xff);
      const x0 = Buffer.alloc(4096, 7);
      const x1 = written(x0, w1.map(([o, n], k) => [o, fill(n, k + 1)]));
      const x2 = written(x1, w2.map(([o, n], k) => [o, fill(n, k + 101)]));
      const p1 = diffBlock(x1, hashBlock(x0), x0);
      const p2 = diffBlock(x2, hashBlock(x1), x1);
      fc.pre(p1 !== null && p2 !== null);
      const composed = composeDeltas(hashBlock(x0), p1!.subarray(32), p2!.subarray(32), 4096, hashBlock(x2));
      assert.ok(composed.subarray(0, 32).equals(hashBlock(x0)), 'a delta of the first base');
      assert.ok(applyPatches(Buffer.from(x0), composed.subarray(32), hashBlock(x2)).equals(x2));
      // No longer than both deltas together: the ranges only merge or shrink.
      assert.ok(composed.length <= p1!.length + p2!.length - 36 + 4);
    }),
    { numRuns: 300 },
  );
});

test('a small delta is stored as one, of a base stored whole; it reads back through every path; a large one is stored whole', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const x0 = randomBytes(BS);
  await store.putBlocks(from([{ hash: hashBlock(x0), data: x0 }]));
  const before = await packBytes(dir);

  const x1 = written(x0, [[1000, randomBytes(4096)]]);
  assert.equal((await store.putBlocks(from([deltaFrame(x1, x0)]))).stored, 1);
  const grew = (await packBytes(dir)) - before;
  assert.ok(grew < 8192, `stored as a delta: the packs grew by ${grew} bytes, not ${BS}`);
  const loc1 = await store.locate(hashBlock(x1));
  assert.equal(loc1?.codec, 2);
  assert.ok(loc1.base!.equals(hashBlock(x0)));

  // x2 arrives as a delta of x1 (itself a delta): stored as a delta of x0, with both changes.
  const x2 = written(x1, [[40000, randomBytes(2048)], [1500, randomBytes(100)]]);
  assert.equal((await store.putBlocks(from([deltaFrame(x2, x1)]))).stored, 1);
  const loc2 = await store.locate(hashBlock(x2));
  assert.equal(loc2?.codec, 2);
  assert.ok(loc2.base!.equals(hashBlock(x0)), 'never a delta of a delta');

  // Half the block rewritten: a delta on the wire, but stored whole.
  const x3 = written(x0, [[0, randomBytes(BS / 2 - 4096)]]);
  assert.equal((await store.putBlocks(from([deltaFrame(x3, x0)]))).stored, 1);
  assert.equal((await store.locate(hashBlock(x3)))?.codec, 0);

  const want = [x1, x2, x3, x0];
  const hashes = want.map(hashBlock);
  for (const [i, x] of want.entries()) assert.ok((await store.getBlock(hashes[i]!)).equals(x), `getBlock ${i}`);
  for (const opts of [{}, { direct: true }, { consumerVerifies: true }, { direct: true, consumerVerifies: true }]) {
    const got = await collect(store.getBlocks(hashes, opts));
    for (const [i, f] of got.entries()) {
      assert.ok(f.data.equals(want[i]!), `getBlocks ${JSON.stringify(opts)} ${i}`);
      f.release?.();
    }
  }
  // As the base of a peer's delta (a sync sending x1's successor), and as a delta's base here.
  const [withBase] = await collect(store.getBlocks([hashBlock(x0)], { bases: [hashBlock(x2)] }));
  assert.ok(withBase!.base!.data.equals(x2));
  const x4 = written(x2, [[9000, randomBytes(512)]]);
  assert.equal((await store.putBlocks(from([deltaFrame(x4, x2)]))).stored, 1);
  assert.ok((await store.getBlock(hashBlock(x4))).equals(x4));
  assert.ok((await store.locate(hashBlock(x4)))!.base!.equals(hashBlock(x0)));

  // Reopened: the index keeps each delta's base.
  await store.close();
  const again = await Store.open(dir);
  t.after(() => again.close());
  assert.ok((await again.getBlock(hashBlock(x4))).equals(x4));
  assert.ok((await again.locate(hashBlock(x1)))!.base!.equals(hashBlock(x0)));
});

test('a delta whose base is gone by the time it is appended is stored whole', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const base = randomBytes(BS);
  const x = written(base, [[10, randomBytes(100)]]);
  const payload = diffBlock(x, hashBlock(base), base)!;
  // What putBlocks hands over once it has built and verified the block, with its base absent.
  const [stored] = await store.putVerifiedMany([{ hash: hashBlock(x), data: x, asDelta: { base: hashBlock(base), payload } } as BlockFrame]);
  assert.equal(stored, true);
  await store.flush();
  assert.equal((await store.locate(hashBlock(x)))?.codec, 0);
  assert.ok((await store.getBlock(hashBlock(x))).equals(x));
});

test('a block held as a delta of the base named goes out as that delta (storedDeltas), read without its base; through the framing a second store builds it', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const x0 = randomBytes(BS);
  const other = randomBytes(BS);
  await store.putBlocks(from([{ hash: hashBlock(x0), data: x0 }, { hash: hashBlock(other), data: other }]));
  const x1 = written(x0, [[2000, randomBytes(3000)]]);
  await store.putBlocks(from([deltaFrame(x1, x0)]));
  const [h0, h1] = [hashBlock(x0), hashBlock(x1)];

  const [asDelta] = await collect(store.getBlocks([h1], { bases: [h0], storedDeltas: true, consumerVerifies: true, direct: true }));
  assert.deepEqual(asDelta!.delta, { base: h0, length: BS });
  assert.equal(asDelta!.base, undefined, 'no base read');
  assert.ok(applyPatches(Buffer.from(x0), asDelta!.data, h1).equals(x1), 'the patches are the delta stored');
  // Without the option, or with another base named, the block is read whole (with the base named).
  const [plain] = await collect(store.getBlocks([h1], { bases: [h0], consumerVerifies: true }));
  assert.ok(plain!.data.equals(x1) && plain!.base!.data.equals(x0) && plain!.delta === undefined);
  const [another] = await collect(store.getBlocks([h1], { bases: [hashBlock(other)], storedDeltas: true }));
  assert.ok(another!.data.equals(x1) && another!.base!.data.equals(other) && another!.delta === undefined);
  for (const f of [plain!, another!]) (f.release?.(), f.base?.release?.());
  // A copy held in memory (a scan's buffer lent for early sending) is given back, not sent.
  let released = 0;
  const held = { has: (k: string) => k === h1.toString('latin1'), take: () => ({ data: x1, release: () => void released++ }) };
  const [fromHeld] = await collect(store.getBlocks([h1], { bases: [h0], storedDeltas: true, held, consumerVerifies: true }));
  assert.ok(fromHeld!.delta?.base.equals(h0));
  assert.equal(released, 1, 'the held copy was released');
  // Patches the holder has (a scan's diff against the block replaced) go as they are, for a block
  // this store does not even hold: nothing is looked up or read. Of another base, or without
  // storedDeltas, they are not used.
  const x2 = written(x0, [[100, randomBytes(200)]]);
  const h2 = hashBlock(x2);
  const p2 = diffBlock(x2, h0, x0)!.subarray(32);
  let given = 0;
  const withPatches = {
    has: () => false,
    take: () => undefined,
    hasPatches: (k: string, b: Buffer) => k === h2.toString('latin1') && b.equals(h0),
    takePatches: (k: string, b: Buffer) => (k === h2.toString('latin1') && b.equals(h0) ? (given++, { patches: p2, length: BS }) : undefined),
  };
  const [sent] = await collect(store.getBlocks([h2], { bases: [h0], storedDeltas: true, held: withPatches, consumerVerifies: true }));
  assert.deepEqual(sent!.delta, { base: h0, length: BS });
  assert.ok(sent!.data.equals(p2) && applyPatches(Buffer.from(x0), sent!.data, h2).equals(x2));
  assert.equal(given, 1);
  await assert.rejects(collect(store.getBlocks([h2], { bases: [hashBlock(other)], storedDeltas: true, held: withPatches })), { code: 'ERR_BLOCK_MISSING' });
  await assert.rejects(collect(store.getBlocks([h2], { bases: [h0], held: withPatches })), { code: 'ERR_BLOCK_MISSING' });
  assert.equal(given, 1, 'only asked with storedDeltas and the base they patch');

  // On the wire it is a delta frame of x0; a store holding x0 builds x1, verifies it, keeps it as a delta.
  const wire = await collect(encodeFrames(store.getBlocks([h1], { bases: [h0], storedDeltas: true, consumerVerifies: true })));
  const bytes = Buffer.concat(wire);
  assert.equal(bytes.length, 42 + diffBlock(x1, h0, x0)!.length + 42, 'one delta frame (header, base hash, patches) and the end frame');
  const dir2 = await tempDir(t);
  const peer = await Store.open(dir2);
  t.after(() => peer.close());
  await peer.putBlocks(from([{ hash: h0, data: x0 }]));
  const r = await peer.putBlocks(decodeFrames(from([bytes]), { deltas: true, expect: [h1] }));
  assert.equal(r.stored, 1);
  assert.ok((await peer.getBlock(h1)).equals(x1));
  assert.equal((await peer.locate(h1))?.codec, 2);
  // A receiver lacking the base names it in needWhole and stores nothing.
  const dir3 = await tempDir(t);
  const bare = await Store.open(dir3);
  t.after(() => bare.close());
  const none = await bare.putBlocks(decodeFrames(from([bytes]), { deltas: true, expect: [h1] }));
  assert.equal(none.stored, 0);
  assert.deepEqual(none.needWhole, [h1]);

  // The sender's base damaged: its stored delta still goes (the receiver verifies what it builds);
  // read whole (no option), the damage is reported.
  const loc0 = (await store.locate(h0))!;
  const fh = await open(join(dir, 'packs', packFileName(loc0.pack)), 'r+');
  // The record's payload starts after its 44-byte header (store/README.md).
  await fh.write(Buffer.from([0xff ^ x0[100]!]), 0, 1, loc0.offset + 44 + 100);
  await fh.close();
  const [still] = await collect(store.getBlocks([h1], { bases: [h0], storedDeltas: true, consumerVerifies: true, direct: true }));
  assert.ok(applyPatches(Buffer.from(x0), still!.data, h1).equals(x1));
  await assert.rejects(collect(store.getBlocks([h1], { consumerVerifies: true, direct: true })), /ERR_STORE_CORRUPT|damaged/);
});

test('verify checks a delta through its base; gc keeps a base only deltas need and drops it with them', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const blocks = 4;
  const v0 = Array.from({ length: blocks }, () => randomBytes(BS));
  const v1 = v0.map((b, i) => written(b, [[i * 1000, randomBytes(2000)]]));
  await store.putVolume({ name: 'vol', blockSize: BS, size: blocks * BS, created: new Date().toISOString() });
  await store.putBlocks(from(v0.map((d) => ({ hash: hashBlock(d), data: d }))));
  const s0 = await store.buildSnapshot({ volume: 'vol', size: blocks * BS, blockSize: BS, parent: null, changes: v0.map((d, index) => ({ index, hash: hashBlock(d) })), origin: 'test' });
  await store.putBlocks(from(v1.map((d, i) => deltaFrame(d, v0[i]!))));
  const s1: SnapshotRecord = await store.buildSnapshot({ volume: 'vol', size: blocks * BS, blockSize: BS, parent: s0, changes: v1.map((d, index) => ({ index, hash: hashBlock(d) })), origin: 'test' });
  for (const d of v1) assert.equal((await store.locate(hashBlock(d)))?.codec, 2);
  assert.deepEqual((await store.verify()).problems, []);

  // Only the deltas' snapshot left: gc keeps their bases, which nothing else reaches.
  await store.deleteSnapshot('vol', s0.id);
  const g = await store.gc();
  assert.equal(g.blocksRemoved, 0, JSON.stringify(g));
  const r = await store.verify();
  assert.deepEqual(r.problems, []);
  assert.equal(r.bytes, blocks * BS);
  for (const [i, d] of v1.entries()) assert.ok((await store.getBlock(hashBlock(d))).equals(d), `block ${i}`);

  // A damaged base: verify names the delta's block of s1 (its base is in no snapshot).
  const loc = await store.locate(hashBlock(v0[2]!));
  const packPath = join(dir, 'packs', packFileName(loc!.pack));
  const at = loc!.offset + 44 + 100;
  const byte = Buffer.alloc(1);
  const fh = await open(packPath, 'r+');
  await fh.read(byte, 0, 1, at);
  await fh.write(Buffer.from([byte[0]! ^ 0xff]), 0, 1, at);
  await fh.close();
  const bad = await store.verify();
  assert.deepEqual(bad.problems.map((p) => [p.code, p.snapshot, p.blockIndex]), [['ERR_BLOCK_CORRUPT', s1.id, 2]]);
  await assert.rejects(store.getBlock(hashBlock(v1[2]!)), /damaged|does not match/);
  const fix = await open(packPath, 'r+');
  await fix.write(byte, 0, 1, at);
  await fix.close();
  assert.deepEqual((await store.verify()).problems, []);

  // No snapshot left: the deltas and their bases all go.
  await store.deleteSnapshot('vol', s1.id);
  const g2 = await store.gc();
  assert.equal(g2.blocksRemoved, 2 * blocks, JSON.stringify(g2));
  assert.deepEqual(await store.hasBlocks([...v0, ...v1].map(hashBlock)), Array(2 * blocks).fill(false));
});

test('a block that replaced a zero block and holds little data is stored as patches of zeros (a sparse record): every read path, verify, gc, composition, sent as a delta of zeros', async (t) => {
  const dir = await tempDir(t);
  const store = await Store.open(dir);
  t.after(() => store.close());
  const zero = Buffer.alloc(BS);
  const before = await packBytes(dir);
  const x1 = written(zero, [[8192, randomBytes(4096)]]);
  const h1 = hashBlock(x1);
  assert.equal((await store.putBlocks(from([deltaFrame(x1, zero)]))).stored, 1);
  const grew = (await packBytes(dir)) - before;
  assert.ok(grew < 4096 + 200, `stored as patches of zeros: the packs grew by ${grew} bytes, not ${BS}`);
  const loc = await store.locate(h1);
  assert.equal(loc?.codec, 3);
  assert.equal(loc.base, undefined, 'no base: nothing for gc to keep');

  // A delta of it (a second write) is composed onto zeros: sparse again, with both writes.
  const x2 = written(x1, [[30000, randomBytes(1000)]]);
  const h2 = hashBlock(x2);
  assert.equal((await store.putBlocks(from([deltaFrame(x2, x1)]))).stored, 1);
  assert.equal((await store.locate(h2))?.codec, 3);
  // A third of the block filled: whole.
  const x3 = written(zero, [[0, randomBytes(BS / 3)]]); // a delta on the wire, more than a quarter of the block
  assert.equal((await store.putBlocks(from([deltaFrame(x3, zero)]))).stored, 1);
  assert.equal((await store.locate(hashBlock(x3)))?.codec, 0);

  for (const [x, h] of [[x1, h1], [x2, h2]] as const) {
    assert.ok((await store.getBlock(h)).equals(x));
    for (const opts of [{}, { direct: true }, { consumerVerifies: true }, { direct: true, consumerVerifies: true }]) {
      const [f] = await collect(store.getBlocks([h], opts));
      assert.ok(f!.data.equals(x), JSON.stringify(opts));
    }
  }
  // To a peer that holds zeros there: the stored patches as a delta of ZERO_HASH, nothing else read.
  const [asDelta] = await collect(store.getBlocks([h2], { bases: [ZERO_HASH], storedDeltas: true, consumerVerifies: true }));
  assert.deepEqual(asDelta!.delta, { base: ZERO_HASH, length: BS });
  assert.ok(applyPatches(Buffer.alloc(BS), asDelta!.data, h2).equals(x2));
  const dir2 = await tempDir(t);
  const peer = await Store.open(dir2);
  t.after(() => peer.close());
  const wire = Buffer.concat(await collect(encodeFrames(store.getBlocks([h2], { bases: [ZERO_HASH], storedDeltas: true, consumerVerifies: true }))));
  assert.equal((await peer.putBlocks(decodeFrames(from([wire]), { deltas: true, expect: [h2] }))).stored, 1);
  assert.equal((await peer.locate(h2))?.codec, 3, 'the peer stores it sparse too');
  assert.ok((await peer.getBlock(h2)).equals(x2));

  // In a snapshot: verify checks it, gc copies it (checked) and it reads back after.
  await store.putVolume({ name: 'vol', blockSize: BS, size: 2 * BS, created: new Date().toISOString() });
  const s = await store.buildSnapshot({ volume: 'vol', size: 2 * BS, blockSize: BS, parent: null, changes: [{ index: 0, hash: h2 }], origin: 'test' });
  assert.deepEqual((await store.verify()).problems, []);
  const g = await store.gc();
  assert.ok(g.blocksRemoved >= 2, JSON.stringify(g)); // x1 and x3: in no snapshot
  assert.equal((await store.locate(h2))?.codec, 3);
  assert.ok((await store.getBlock(h2)).equals(x2), 'after gc');
  assert.deepEqual((await store.verify()).problems, []);

  // A damaged sparse record: verify names the block, a read refuses it.
  const l2 = (await store.locate(h2))!;
  const fh = await open(join(dir, 'packs', packFileName(l2.pack)), 'r+');
  const at = l2.offset + 44 + 20; // inside the first patch's bytes
  const byte = Buffer.alloc(1);
  await fh.read(byte, 0, 1, at);
  await fh.write(Buffer.from([byte[0]! ^ 0xff]), 0, 1, at);
  await fh.close();
  const bad = await store.verify();
  assert.deepEqual(bad.problems.map((p) => [p.code, p.snapshot, p.blockIndex]), [['ERR_BLOCK_CORRUPT', s.id, 0]]);
  await assert.rejects(store.getBlock(h2), /damaged|does not/);
  await assert.rejects(collect(store.getBlocks([h2], { consumerVerifies: true })), /damaged|does not/);
});

test('a re-scan stores a block changed by a small write as a delta of the block it replaced (a change list too); one rewritten whole, whole; a run of whole rewrites stops the tries', async (t) => {
  const blocks = 96;
  const img = randomBytes(blocks * BS);
  img.fill(0, 10 * BS, 11 * BS); // a zero block that becomes data
  const { path, store } = await storeWithImage(t, img);
  /** What onNewBlocks was told, by block hash (hex): the block replaced and the patches of it. */
  const told = new Map<string, { replaced: Buffer | null; patches: Buffer | undefined }>();
  const scan = async (parent: SnapshotRecord | null, opts: { changedBlocks?: number[]; workers?: boolean } = {}) => {
    await writeFile(path, img);
    const reader = opts.workers ? await localFileReader(path) : await fileReader(path);
    let last: ScanProgress | undefined;
    told.clear();
    const onNewBlocks = (hashes: Buffer[], _direct: boolean, replaced: Array<Buffer | null>, _views?: Buffer[], _kept?: boolean, patches?: Array<Buffer | undefined>) => {
      hashes.forEach((h, i) => told.set(h.toString('hex'), { replaced: replaced[i] ?? null, patches: patches?.[i] }));
    };
    try {
      const snap = await store.scanVolume(reader, { volume: 'vol', blockSize: BS, parent, onProgress: (p) => (last = p), onNewBlocks, ...(opts.changedBlocks ? { changedBlocks: opts.changedBlocks } : {}) });
      return { snap, progress: last! };
    } finally {
      await reader.close();
    }
  };
  const hashAt = (i: number) => hashBlock(img.subarray(i * BS, (i + 1) * BS));
  const readBack = async (snap: SnapshotRecord) => {
    const out = Buffer.alloc(snap.size);
    for await (const { index, hash } of store.blockHashes(snap)) (await store.getBlock(hash, BS)).copy(out, index * BS);
    return out;
  };
  const s0 = (await scan(null)).snap;

  const small = [3, 20, 21, 50];
  const was = small.map(hashAt);
  for (const b of small) randomBytes(4096).copy(img, b * BS + 777);
  randomBytes(BS).copy(img, 40 * BS); // rewritten whole
  randomBytes(100).copy(img, 10 * BS + 5); // was zeros: patches of zeros (a sparse record), nothing read
  const r1 = await scan(s0, { workers: true });
  assert.equal(r1.progress.blocksStored, 6);
  assert.equal(r1.progress.blocksStoredAsDeltas, 5);
  for (const [k, b] of small.entries()) {
    const loc = await store.locate(hashAt(b));
    assert.equal(loc?.codec, 2, `block ${b}`);
    assert.ok(loc.base!.equals(was[k]!), `block ${b} is a delta of the block it replaced`);
  }
  assert.equal((await store.locate(hashAt(40)))?.codec, 0);
  assert.equal((await store.locate(hashAt(10)))?.codec, 3);
  assert.ok((await readBack(r1.snap)).equals(img), 'byte-exact');

  // The same blocks written again, from a change list (read on the calling thread): deltas of
  // the same whole blocks, both writes composed.
  const before = Buffer.from(img);
  for (const b of small) randomBytes(512).copy(img, b * BS + 30000);
  const r2 = await scan(r1.snap, { changedBlocks: small });
  assert.equal(r2.progress.blocksStoredAsDeltas, 4);
  for (const [k, b] of small.entries()) assert.ok((await store.locate(hashAt(b)))!.base!.equals(was[k]!), `block ${b}: never a delta of a delta`);
  // onNewBlocks is told the patches of the block each replaced (what a peer holding that one
  // needs), not the composed delta stored: one 512-byte write each.
  for (const b of small) {
    const t = told.get(hashAt(b).toString('hex'))!;
    const prev = before.subarray(b * BS, (b + 1) * BS);
    assert.ok(t.replaced!.equals(hashBlock(prev)), `block ${b}: the block it replaced`);
    assert.ok(applyPatches(Buffer.from(prev), t.patches!, hashAt(b)).equals(img.subarray(b * BS, (b + 1) * BS)), `block ${b}: its patches`);
    // The write spans two 512-byte units; the composed delta stored holds the 4 KiB write too.
    assert.equal(t.patches!.length, 4 + 8 + 2 * 512, `block ${b}: the patches of one write`);
    assert.ok((await store.locate(hashAt(b)))!.length > 4096 + 1024, `block ${b}: the delta stored is the composed one`);
  }
  assert.ok((await readBack(r2.snap)).equals(img), 'byte-exact');

  // 40 blocks rewritten whole, then small writes further on: after 32 tries that gave nothing,
  // the scan stops reading replaced blocks, and the small changes are stored whole.
  for (let b = 0; b < 40; b++) if (b !== 10) randomBytes(BS).copy(img, b * BS);
  for (const b of [80, 90]) randomBytes(4096).copy(img, b * BS);
  const r3 = await scan(r2.snap);
  assert.equal(r3.progress.blocksStored, 41);
  assert.equal(r3.progress.blocksStoredAsDeltas, 0);
  assert.ok((await readBack(r3.snap)).equals(img), 'byte-exact');
  assert.deepEqual((await store.verify()).problems, []);
});

test('a store of format 1 or 2 opens and is marked format 3; a format this build does not know is refused', async (t) => {
  const dir = await tempDir(t);
  await (await Store.open(dir)).close();
  const setFormat = async (f: number) => {
    const db = new ClassicLevel<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await db.put(Buffer.from('f'), Buffer.from(JSON.stringify({ format: f })));
    await db.close();
  };
  const getFormat = async () => {
    const db = new ClassicLevel<Buffer, Buffer>(join(dir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    const v = (await db.get(Buffer.from('f')))!.toString();
    await db.close();
    return v;
  };
  for (const old of [1, 2]) {
    await setFormat(old);
    await (await Store.open(dir)).close();
    assert.equal(await getFormat(), '{"format":3}');
  }
  await setFormat(4);
  await assert.rejects(Store.open(dir), { code: 'ERR_STORE_CORRUPT', message: /format 4/ });
});
