/** The local Store beyond the shared contract: scans, records, recovery, busy lock, verify, gc. */
import { describe, it, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { appendFile, open, readFile, readdir, rm, stat, statfs, truncate, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { RESERVE_BYTES, Store, ZERO_HASH, hashBlock, makeNode, type GcProgress, type SnapshotRecord, type ScanProgress, type VerifyProgress } from '../../store/index.js';
import { blockKey, encodeU64, packKey } from '../../store/keys.js';
import { CODEC_RAW, recordLength } from '../../store/pack.js';
import type { PackFiles } from '../../store/pack-files.js';
import { smallTmpfs } from '../helpers/cli.js';
import { openVolumeReader } from '../../appliance/volumes/file.js';
import { fileReader, from, localFileReader, makeImage, spawnFixture, startNewPack, storeWithImage, tempDir, waitExit, writeImage } from './helpers.js';

const BS = 65536;

async function scanFile(store: Store, path: string, volume: string, opts: { parent?: SnapshotRecord | null; changedBlocks?: number[]; onProgress?: (p: ScanProgress) => void } = {}) {
  const reader = await fileReader(path);
  try {
    return await store.scanVolume(reader, { volume, blockSize: BS, ...opts });
  } finally {
    await reader.close();
  }
}

/** Read a snapshot back through blockHashes + getBlock. */
async function readBack(store: Store, snap: SnapshotRecord): Promise<Buffer> {
  const out = Buffer.alloc(snap.size);
  let next = 0;
  for await (const { index, hash } of store.blockHashes(snap)) {
    assert.equal(index, next++);
    const len = Math.min(snap.blockSize, snap.size - index * snap.blockSize);
    const data = await store.getBlock(hash, len);
    assert.equal(data.length, len);
    data.copy(out, index * snap.blockSize);
  }
  return out;
}

/** Blocks as a stream of frames (Store.putBlocks). */
async function* frames(blocks: readonly Buffer[]) {
  for (const b of blocks) yield { hash: hashBlock(b), data: b };
}

async function packFiles(storeDir: string): Promise<string[]> {
  return (await readdir(join(storeDir, 'packs'))).filter((n) => n.endsWith('.pack')).sort().map((n) => join(storeDir, 'packs', n));
}

/**
 * A store holding three snapshots of one 600-block volume (three level-1 nodes under a root):
 * the second with blocks `second` changed, the third with blocks `third` changed.
 */
async function threeSnapshots(t: TestContext, second: readonly number[], third: readonly number[]) {
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  const path = join(dir, 'img');
  const img = makeImage(600, BS);
  await writeImage(path, img);
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const snaps = [await scanFile(store, path, 'vol')];
  for (const changed of [second, third]) {
    for (const i of changed) randomBytes(BS).copy(img, i * BS);
    await writeImage(path, img);
    snaps.push(await scanFile(store, path, 'vol', { parent: snaps.at(-1)! }));
  }
  return { dir, storeDir, img, store, snaps };
}

/** Flip one payload byte of the record of block `hash` in its pack. */
async function damageBlock(store: Store, storeDir: string, hash: Buffer): Promise<void> {
  const loc = (await store.locate(hash))!;
  const at = loc.offset + recordLength(loc.length) - 10;
  const fh = await open(join(storeDir, 'packs', `${String(loc.pack).padStart(8, '0')}.pack`), 'r+');
  const byte = Buffer.alloc(1);
  await fh.read(byte, 0, 1, at);
  await fh.write(Buffer.from([byte[0]! ^ 0x01]), 0, 1, at);
  await fh.close();
}

/** Bytes of all pack files. */
async function packBytes(storeDir: string): Promise<number> {
  return (await Promise.all((await packFiles(storeDir)).map((p) => stat(p)))).reduce((n, s) => n + s.size, 0);
}

/**
 * Volume "vol" of 64 blocks snapshotted, every other block rewritten and snapshotted again, the
 * first snapshot deleted: one pack of 64 live and 32 dead records, for gc.
 */
async function halfRewritten(store: Store, path: string): Promise<{ img2: Buffer; s2: SnapshotRecord }> {
  const img = makeImage(64, BS);
  await writeImage(path, img);
  const s1 = await scanFile(store, path, 'vol');
  const img2 = Buffer.from(img);
  for (let i = 0; i < 64; i += 2) img2.fill(i + 1, i * BS, (i + 1) * BS);
  await writeImage(path, img2);
  const s2 = await scanFile(store, path, 'vol', { parent: s1 });
  await store.deleteSnapshot('vol', s1.id);
  return { img2, s2 };
}

/** A store in a fresh temp dir (closed after the test), and where its volume image goes. */
async function openStore(t: Parameters<typeof tempDir>[0]): Promise<{ dir: string; storeDir: string; path: string; store: Store }> {
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  return { dir, storeDir, path: join(dir, 'img'), store };
}

describe('Store', () => {
  it('scans an image with zero blocks and a short tail, reads it back exactly, stores only non-zero blocks', async (t) => {
    const img = makeImage(300, BS, { zeroEvery: 3, tail: 1000 });
    const { path, store } = await storeWithImage(t, img);
    let last: ScanProgress | undefined;
    const snap = await scanFile(store, path, 'vol', { onProgress: (p) => (last = p) });
    assert.equal(snap.size, img.length);
    assert.equal(snap.nonZeroBlocks, 301 - 100);
    assert.equal(snap.origin, 'scan');
    assert.equal(snap.parent, null);
    assert.equal(snap.height, 2);
    assert.deepEqual(last, { blocksDone: 301, blocksTotal: 301, bytesRead: img.length, bytesReadDirect: 0, blocksStored: 201, blocksStoredAsDeltas: 0 });
    assert.ok((await readBack(store, snap)).equals(img));
    const report = await store.verify();
    assert.deepEqual({ ...report, problems: report.problems.length }, { snapshots: 1, nodes: 3, blocks: 201, bytes: 200 * BS + 1000, problems: 0 });
    // A rescan of the unchanged image stores nothing and has the same root.
    const again = await scanFile(store, path, 'vol', { parent: snap, onProgress: (p) => (last = p) });
    assert.equal(again.root, snap.root);
    assert.equal(again.parent, snap.id);
    assert.equal(last!.blocksStored, 0);
    assert.deepEqual((await store.listSnapshots('vol')).map((s) => s.id), [snap.id, again.id]);
  });

  it('a local file reader (path + kind) is read by the hash workers with the same result; a file shorter than its size is refused', async (t) => {
    const img = makeImage(100, BS, { zeroEvery: 7, tail: 4097 });
    const { path, store } = await storeWithImage(t, img);
    const viaMain = await scanFile(store, path, 'a');
    let reads = 0;
    const local = { path, kind: 'file' as const, size: img.length, read: async () => { reads++; return 0; }, close: async () => undefined };
    const viaWorkers = await store.scanVolume(local, { volume: 'b', blockSize: BS });
    assert.equal(reads, 0);
    assert.equal(viaWorkers.root, viaMain.root);
    assert.ok((await readBack(store, viaWorkers)).equals(img));
    await assert.rejects(store.scanVolume({ ...local, size: img.length + BS }, { volume: 'c', blockSize: BS }), { code: 'ERR_VOLUME_UNREADABLE' });
    assert.equal(await store.latestSnapshot('c'), null);
  });

  it('chunks inside the reader\'s holes are not read', async (t) => {
    const img = Buffer.alloc(300 * BS);
    img.fill(5, 5 * BS, 6 * BS);
    const { path, store } = await storeWithImage(t, img);
    const full = await scanFile(store, path, 'a');
    const inner = await fileReader(path);
    t.after(() => inner.close());
    const positions: number[] = [];
    // 8 MiB chunks of 64 KiB blocks: chunk 0 = blocks 0-127 (has data), chunks 1 and 2 are holes.
    const holes = [{ start: 100 * BS, end: 300 * BS }];
    const reader = { size: img.length, holes, read: (b: Buffer, p: number) => (positions.push(p), inner.read(b, p)), close: async () => undefined };
    const sparse = await store.scanVolume(reader, { volume: 'b', blockSize: BS });
    assert.equal(sparse.root, full.root);
    assert.deepEqual(positions, [0]);
  });

  it('an aborted scan commits nothing', async (t) => {
    const dir = await tempDir(t);
    const path = join(dir, 'img');
    await writeImage(path, makeImage(400, BS));
    const store = await Store.open(join(dir, 'store'));
    const ac = new AbortController();
    const reader = await fileReader(path);
    try {
      await assert.rejects(store.scanVolume(reader, { volume: 'v', blockSize: BS, signal: ac.signal, onProgress: () => ac.abort() }), { name: 'AbortError' });
      assert.equal(await store.latestSnapshot('v'), null);
      assert.equal(await store.getVolume('v'), null);
    } finally {
      await reader.close();
      await store.close();
    }
  });

  it('a changed-blocks scan reads only the listed blocks and equals a full rescan', async (t) => {
    const img = makeImage(600, BS, { zeroEvery: 5 });
    const { path, store } = await storeWithImage(t, img);
    const s1 = await scanFile(store, path, 'vol');
    img.fill(7, 10 * BS, 11 * BS); // zero block -> data
    img.fill(0, 11 * BS, 12 * BS); // data -> zero
    img.fill(9, 599 * BS, 599 * BS + 5); // last block
    await writeImage(path, img);
    let last: ScanProgress | undefined;
    const s2 = await scanFile(store, path, 'vol', { parent: s1, changedBlocks: [599, 10, 11, 10], onProgress: (p) => (last = p) });
    assert.equal(s2.origin, 'changed-blocks');
    assert.deepEqual(last, { blocksDone: 3, blocksTotal: 3, bytesRead: 3 * BS, bytesReadDirect: 0, blocksStored: 2, blocksStoredAsDeltas: 1 }, 'the last block, changed in 5 bytes, stored as a delta');
    const full = await scanFile(store, path, 'vol', { parent: s2 });
    assert.equal(s2.root, full.root);
    assert.equal(s2.nonZeroBlocks, full.nonZeroBlocks);
    const diff = [];
    for await (const c of store.diffSnapshots(s1, s2)) diff.push([c.index, c.hash.equals(ZERO_HASH)]);
    assert.deepEqual(diff, [[10, false], [11, true], [599, false]]);
    assert.ok((await readBack(store, s2)).equals(img));
    await assert.rejects(scanFile(store, path, 'vol', { changedBlocks: [1] }), { code: 'ERR_CHANGED_BLOCKS_INVALID' });
    await assert.rejects(scanFile(store, path, 'vol', { parent: s2, changedBlocks: [600] }), { code: 'ERR_CHANGED_BLOCKS_INVALID' });
  });

  it('a scan writes even a small change past the page cache, in a one-shot command and kept warm (a running appliance); the snapshot reads back exactly, also after reopening', async (t) => {
    const img = makeImage(300, BS, { zeroEvery: 9 });
    const { dir, path, store } = await storeWithImage(t, img);
    const s1 = await scanFile(store, path, 'vol');
    /** Scan blocks `changed` after changing them; the `direct` flag of each batch of new blocks. */
    const changeAndScan = async (parent: SnapshotRecord, changed: number[], fill: number) => {
      for (const i of changed) img.fill(fill, i * BS + 100, i * BS + 300);
      await writeImage(path, img);
      const ways: boolean[] = [];
      const reader = await localFileReader(path);
      try {
        const snap = await store.scanVolume(reader, { volume: 'vol', blockSize: BS, parent, changedBlocks: changed, onNewBlocks: (_h, direct) => void ways.push(direct) });
        return { snap, ways };
      } finally {
        await reader.close();
      }
    };
    // A one-shot command's store too (store/scan.ts: its fsync at the commit then has nothing to write).
    const cold = await changeAndScan(s1, [3, 40, 41, 42, 200], 1);
    assert.ok(cold.ways.length > 0 && cold.ways.every((d) => d), `direct: ${cold.ways.join()}`);
    store.keepWarm();
    const warm = await changeAndScan(cold.snap, [5, 6, 7, 8, 9, 10, 150, 299], 2);
    assert.ok(warm.ways.length > 0 && warm.ways.every((d) => d), `direct: ${warm.ways.join()}`);
    assert.ok((await readBack(store, warm.snap)).equals(img));
    assert.ok((await readBack(store, cold.snap)).length === img.length);
    const full = await scanFile(store, path, 'vol', { parent: warm.snap });
    assert.equal(full.root, warm.snap.root);
    await store.close();
    const again = await Store.open(join(dir, 'store'));
    t.after(() => again.close());
    assert.deepEqual(again.recovery, { removed: [], truncated: [], short: [] });
    assert.ok((await readBack(again, warm.snap)).equals(img));
    assert.equal((await again.verify()).problems.length, 0);
    // Reopened, no pool started: kept warm, even a short change list goes to the hash workers
    // (a one-shot store hashes it on the calling thread rather than start them), and the pool stays.
    again.keepWarm();
    for (const i of [7, 8, 250]) img.fill(9, i * BS, i * BS + 50);
    await writeImage(path, img);
    const listed = await scanFile(again, path, 'vol', { parent: warm.snap, changedBlocks: [7, 8, 250] });
    assert.equal(again.hashPools.lent, 1, 'the change list was hashed by the pool');
    assert.equal((await scanFile(again, path, 'vol', { parent: listed })).root, listed.root, 'as a full rescan finds it');
    assert.equal(again.hashPools.lent, 2);
    assert.ok((await readBack(again, listed)).equals(img));
  });

  it('a long scattered change list (read by the hash workers, or through the reader) equals a full rescan', async (t) => {
    // 700 blocks and a short tail block; every other block changes (more than the 256 a calling thread hashes), some to zeros, and the tail.
    const img = makeImage(700, BS, { zeroEvery: 7, tail: 1000 });
    const { path, store } = await storeWithImage(t, img);
    const s1 = await scanFile(store, path, 'vol');
    const changed: number[] = [];
    for (let i = 1; i < 700; i += 2) {
      if (i % 10 === 1) img.fill(0, i * BS, (i + 1) * BS);
      else img.fill(i % 251, i * BS + 100, i * BS + 200);
      changed.push(i);
    }
    changed.push(700); // the short tail block
    img.fill(3, 700 * BS, 700 * BS + 10);
    changed.push(30, 31, 32, 33); // and a run of consecutive blocks among them
    for (const i of [31, 32]) img.fill(5, i * BS, i * BS + 7);
    await writeImage(path, img);
    const byPath = await localFileReader(path);
    const viaWorkers = await store.scanVolume(byPath, { volume: 'vol', blockSize: BS, parent: s1, changedBlocks: changed });
    await byPath.close();
    const viaReader = await scanFile(store, path, 'vol', { parent: s1, changedBlocks: changed });
    const full = await scanFile(store, path, 'vol', { parent: s1 });
    assert.equal(viaWorkers.root, full.root);
    assert.equal(viaReader.root, full.root);
    assert.equal(viaWorkers.nonZeroBlocks, full.nonZeroBlocks);
    assert.ok((await readBack(store, viaWorkers)).equals(img));
  });

  it('a full rescan compares with its parent: the same tree as a scan from scratch, by the hash workers and through the reader', async (t) => {
    const img = makeImage(400, BS, { zeroEvery: 6, tail: 777 });
    const { dir, path, store } = await storeWithImage(t, img);
    const local = await localFileReader(path);
    const s1 = await store.scanVolume(local, { volume: 'vol', blockSize: BS });
    img.fill(7, 6 * BS, 7 * BS); // zero block -> data
    img.fill(0, 7 * BS, 8 * BS); // data -> zero
    img.fill(9, 130 * BS + 3, 130 * BS + 9); // a change in the second chunk
    img.fill(4, 400 * BS, 400 * BS + 5); // the short tail block
    img.copy(img, 300 * BS, 200 * BS, 201 * BS); // block 300 becomes a copy of block 200: held already
    await writeImage(path, img);
    let last: ScanProgress | undefined;
    const viaWorkers = await store.scanVolume(local, { volume: 'vol', blockSize: BS, parent: s1, onProgress: (p) => (last = p) });
    await local.close();
    assert.equal(viaWorkers.parent, s1.id);
    assert.equal(last!.blocksDone, 401);
    assert.equal(last!.blocksStored, 3, 'blocks 6, 130 and the tail are new; 7 is zero and 300 is held');
    const viaReader = await scanFile(store, path, 'vol', { parent: s1 });
    const fresh = await Store.open(join(dir, 'fresh'));
    t.after(() => fresh.close());
    const scratch = await scanFile(fresh, path, 'vol');
    for (const s of [viaWorkers, viaReader]) {
      assert.equal(s.root, scratch.root);
      assert.equal(s.nonZeroBlocks, scratch.nonZeroBlocks);
      assert.equal(s.height, scratch.height);
    }
    assert.ok((await readBack(store, viaWorkers)).equals(img));
    const diff = [];
    for await (const c of store.diffSnapshots(s1, viaWorkers)) diff.push(c.index);
    assert.deepEqual(diff, [6, 7, 130, 300, 400]);
    assert.equal((await store.verify()).problems.length, 0);
  });

  it('a full rescan over a damaged parent tree scans again from scratch and says so; the new snapshot is whole and the parent healed', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    const img = makeImage(400, BS, { zeroEvery: 9 });
    const path = join(dir, 'img');
    await writeImage(path, img);
    let store = await Store.open(storeDir);
    const s1 = await scanFile(store, path, 'vol');
    const [root] = await store.getNodes([Buffer.from(s1.root, 'hex')]);
    await store.close();
    // Remove one level-1 node of the parent from the index.
    const { ClassicLevel } = await import('classic-level');
    const db = new ClassicLevel<Buffer, Buffer>(join(storeDir, 'index'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await db.del(Buffer.concat([Buffer.from([0x6e]), root!.children[1]!]));
    await db.close();
    store = await Store.open(storeDir);
    t.after(() => store.close());
    const before = (await store.verify()).problems;
    assert.ok(before.length > 0 && before.every((p) => p.snapshot === s1.id && p.code === 'ERR_NODE_MISSING'), JSON.stringify(before));
    img.fill(3, 5 * BS, 5 * BS + 100);
    await writeImage(path, img);
    const notices: string[] = [];
    const reader = await localFileReader(path);
    const s2 = await store.scanVolume(reader, { volume: 'vol', blockSize: BS, parent: s1, onNotice: (m) => notices.push(m) });
    await reader.close();
    assert.equal(notices.length, 1);
    assert.match(notices[0]!, /parent snapshot vol@.* is damaged .*appliance verify/);
    assert.equal(s2.parent, s1.id);
    assert.ok((await readBack(store, s2)).equals(img));
    // Blocks 256-399 did not change: the scan from scratch wrote their node again, which heals the parent.
    assert.deepEqual((await store.verify()).problems, []);
  });

  it('scans a 64 GiB sparse image in seconds and stores only its few non-zero blocks', async (t) => {
    const dir = await tempDir(t);
    const path = join(dir, 'sparse');
    const size = 64 * 1024 ** 3;
    const fh = await open(path, 'w');
    await fh.truncate(size);
    const marks = [0, 70_000, 131_071].map((i, n) => ({ i, data: Buffer.alloc(524288, n + 1) }));
    for (const m of marks) await fh.write(m.data, 0, m.data.length, m.i * 524288);
    await fh.close();
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    // The appliance's reader, as `snapshot` opens an image: with its map of holes, which the scan
    // does not read (the helper's reader read all 64 GiB of zeros: 7-8 s of the kernel's copies).
    const reader = await openVolumeReader(path);
    assert.ok(reader.holes.length > 0, 'the image is mapped as sparse');
    const started = Date.now();
    const snap = await store.scanVolume(reader, { volume: 'big', blockSize: 524288 });
    const seconds = (Date.now() - started) / 1000;
    await reader.close();
    t.diagnostic(`64 GiB sparse scan: ${seconds.toFixed(1)} s`);
    assert.equal(snap.nonZeroBlocks, 3);
    assert.equal(snap.height, 3);
    const found = [];
    for await (const c of store.diffSnapshots(null, snap)) found.push(c.index);
    assert.deepEqual(found, marks.map((m) => m.i));
    const v = await store.verify({ volume: 'big' });
    assert.equal(v.blocks, 3);
    assert.equal(v.problems.length, 0);
    assert.ok(seconds < 60, `took ${seconds} s`);
  });

  it('a snapshot taken after the clock was set back, or after a peer\'s from a clock ahead, is still the latest', async (t) => {
    const dir = await tempDir(t);
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    await store.putVolume({ name: 'db', blockSize: BS, size: 2 * BS, created: new Date().toISOString() });
    const block = Buffer.alloc(BS, 7);
    const h = hashBlock(block);
    await store.putBlock(h, block);
    const build = (parent: SnapshotRecord | null, created: string, changes: Array<{ index: number; hash: Buffer }> = []) =>
      store.buildSnapshot({ volume: 'db', size: 2 * BS, blockSize: BS, parent, changes, origin: 'test', created });
    const a = await build(null, '2026-06-01T12:00:00.000Z');
    // An NTP step sets the clock back an hour; the next scan finds block 0 changed.
    const b = await build(a, '2026-06-01T11:00:00.000Z', [{ index: 0, hash: h }]);
    assert.ok(b.id > a.id, `${b.id} after ${a.id}`);
    assert.equal(b.created, '2026-06-01T12:00:00.001Z', '1 ms past the one before');
    assert.equal((await store.latestSnapshot('db'))!.id, b.id, 'the change is the latest state');
    // A replica committed from a peer whose clock runs a day ahead, then a local snapshot (a
    // failback's pre-apply snapshot, an EBS import) on the same volume.
    const ahead = { ...b, id: '20260602T120000.000Z-abcdef', created: '2026-06-02T12:00:00.000Z', parent: b.id };
    await store.commitSnapshot(ahead);
    const c = await build(ahead, '2026-06-01T13:00:00.000Z');
    assert.ok(c.id > ahead.id);
    assert.equal((await store.latestSnapshot('db'))!.id, c.id);
    // A clock that is right keeps its own time.
    const now = new Date(Date.parse(c.created) + 60_000).toISOString();
    assert.equal((await build(c, now)).created, now);
  });

  it('snapshot, volume and meta records: resolve, delete, remove, validation', async (t) => {
    const dir = await tempDir(t);
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    await assert.rejects(store.resolveSnapshot('nope'), { code: 'ERR_VOLUME_NOT_FOUND' });
    await store.putVolume({ name: 'db1', path: '/dev/null', blockSize: BS, size: 10 * BS, created: new Date().toISOString() });
    await assert.rejects(store.resolveSnapshot('db1'), { code: 'ERR_SNAPSHOT_NOT_FOUND' });
    const a = await store.buildSnapshot({ volume: 'db1', size: 10 * BS, blockSize: BS, parent: null, changes: [], origin: 'test', created: '2026-01-01T00:00:00.000Z' });
    const b = await store.buildSnapshot({ volume: 'db1', size: 10 * BS, blockSize: BS, parent: a, changes: [], origin: 'test', labels: { drill: 'yes' } });
    assert.equal(a.root, ZERO_HASH.toString('hex'));
    assert.equal((await store.resolveSnapshot('db1')).id, b.id);
    assert.deepEqual(await store.resolveSnapshot(`db1@${a.id}`), a);
    await assert.rejects(store.resolveSnapshot('db1@20200101T000000.000Z-000000'), { code: 'ERR_SNAPSHOT_NOT_FOUND' });
    await assert.rejects(store.resolveSnapshot('bad name'), { code: 'ERR_BAD_REQUEST' });
    await store.deleteSnapshot('db1', b.id);
    await assert.rejects(store.deleteSnapshot('db1', b.id), { code: 'ERR_SNAPSHOT_NOT_FOUND' });
    assert.equal((await store.latestSnapshot('db1'))!.id, a.id);
    assert.equal((await store.getVolume('db1'))!.path, '/dev/null');
    await assert.rejects(store.putVolume({ name: 'x', blockSize: 1000, size: 0, created: new Date().toISOString() }), { code: 'ERR_BLOCK_SIZE_INVALID' });
    await assert.rejects(store.commitSnapshot({ ...a, height: 3 }), { code: 'ERR_BAD_REQUEST' });
    await store.removeVolume('db1');
    assert.equal(await store.getVolume('db1'), null);
    assert.deepEqual(await store.listSnapshots('db1'), []);
    await assert.rejects(store.removeVolume('db1'), { code: 'ERR_VOLUME_NOT_FOUND' });
    await store.putMeta('peers', 'cloud', { url: 'https://x' });
    await store.putMeta('peers', 'b', 1);
    await store.putMeta('peersx', 'c', 2);
    assert.deepEqual(await store.getMeta('peers', 'cloud'), { url: 'https://x' });
    assert.deepEqual(await store.listMeta('peers'), [['b', 1], ['cloud', { url: 'https://x' }]]);
    await store.deleteMeta('peers', 'b');
    assert.equal(await store.getMeta('peers', 'b'), undefined);
  });

  it("a tree received with a block of the wrong length for its place is refused at commit (ERR_SNAPSHOT_INVALID); verify reports one that got in, even with its blocks good elsewhere", async (t) => {
    const dir = await tempDir(t);
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    const short = randomBytes(100);
    const full = randomBytes(BS);
    const [hs, hf] = [hashBlock(short), hashBlock(full)];
    await store.putBlocks(from([{ hash: hs, data: short }, { hash: hf, data: full }]));
    const misplaced = makeNode(1, [hs, hf]); // the short block first: no volume has a short first block
    const placed = makeNode(1, [hf, hs]); // a volume of BS + 100 bytes
    await store.putNodes([misplaced, placed]);
    const rec = (id: string, root: Buffer, size: number): SnapshotRecord => ({ id, volume: 'v', size, blockSize: BS, root: root.toString('hex'), height: 1, created: '2026-01-01T00:00:00.000Z', parent: null, origin: 'pull', nonZeroBlocks: 2 });
    const [id1, id2, id3] = ['20260101T000000.000Z-000001', '20260101T000000.000Z-000002', '20260101T000000.000Z-000003'];
    await assert.rejects(store.commitSnapshot(rec(id1, misplaced.hash, 2 * BS)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.blockIndex === 0 && e.details.length === 100 && e.details.expected === BS);
    await assert.rejects(store.commitSnapshot(rec(id1, placed.hash, 2 * BS)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.blockIndex === 1, 'a short block at the end of a volume of whole blocks');
    assert.equal(await store.latestSnapshot('v'), null, 'nothing was committed');
    await store.commitSnapshot(rec(id2, placed.hash, BS + 100));
    assert.equal((await store.latestSnapshot('v'))!.id, id2, 'the same blocks, each in its place: committed');
    // One committed around the check (as by a release without it): verify names the block, after
    // a snapshot in which the same two blocks were good.
    await store.gcLock.shared(() => store.commitUnderGcLock(rec(id3, misplaced.hash, 2 * BS)));
    const report = await store.verify({});
    assert.deepEqual(report.problems.map((p) => [p.code, p.snapshot, p.blockIndex]), [['ERR_SNAPSHOT_INVALID', id3, 0]]);
    assert.match(report.problems[0]!.detail!, /100 bytes, good, where 65536 belong/);
  });

  it('a tree received with a node of the wrong width for its place, or a record with a wrong count of non-zero blocks, is refused at commit (ERR_SNAPSHOT_INVALID); verify reports those that got in; a later good snapshot is taken even over a latest that lied', async (t) => {
    const dir = await tempDir(t);
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    const data = [randomBytes(BS), randomBytes(BS), randomBytes(BS)];
    const h = data.map((d) => hashBlock(d));
    await store.putBlocks(from(data.map((d, i) => ({ hash: h[i]!, data: d }))));
    // A volume of 3 blocks: its root has 3 children. With 2, block 2 would read as zeros; with 20,
    // the root names blocks past the end. Either one's root differs from the same content built here.
    const good = makeNode(1, h);
    const narrow = makeNode(1, [h[0]!, h[1]!]);
    const wide = makeNode(1, [...h, ...Array.from({ length: 17 }, () => ZERO_HASH)]);
    await store.putNodes([good, narrow, wide]);
    let n = 0;
    const rec = (root: Buffer, nonZeroBlocks: number): SnapshotRecord => ({ id: `20260101T000000.000Z-00000${++n}`, volume: 'v', size: 3 * BS, blockSize: BS, root: root.toString('hex'), height: 1, created: '2026-01-01T00:00:00.000Z', parent: null, origin: 'pull', nonZeroBlocks });
    await assert.rejects(store.commitSnapshot(rec(narrow.hash, 2)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.children === 2 && e.details.expected === 3);
    await assert.rejects(store.commitSnapshot(rec(wide.hash, 3)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.children === 20 && e.details.expected === 3);
    await assert.rejects(store.commitSnapshot(rec(good.hash, 2)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.nonZeroBlocks === 2 && e.details.counted === 3);
    await assert.rejects(store.commitSnapshot(rec(ZERO_HASH, 1)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.counted === 0, 'the zero tree holds no non-zero block');
    assert.equal(await store.latestSnapshot('v'), null, 'nothing was committed');
    // Committed around the check (as by a release without it): verify names each.
    const lied = rec(good.hash, 1);
    const narrowIn = rec(narrow.hash, 2);
    for (const r of [lied, narrowIn]) await store.gcLock.shared(() => store.commitUnderGcLock(r));
    const report = await store.verify({});
    assert.deepEqual(report.problems.map((p) => [p.code, p.kind, p.snapshot]).sort(), [['ERR_SNAPSHOT_INVALID', 'node', lied.id], ['ERR_SNAPSHOT_INVALID', 'node', narrowIn.id]].sort());
    assert.match(report.problems.find((p) => p.snapshot === lied.id)!.detail!, /says it holds 1 non-zero blocks; its tree holds 3/);
    assert.match(report.problems.find((p) => p.snapshot === narrowIn.id)!.detail!, /2 children at level 1 where 3 belong/);
    await store.deleteSnapshot('v', narrowIn.id);
    // The latest (`lied`) says 1: a good snapshot with block 2 zeroed holds 2, which its diff
    // against the latest would put at 0; the whole tree is counted before anything is refused.
    const next = makeNode(1, [h[0]!, h[1]!, ZERO_HASH]);
    await store.putNodes([next]);
    const taken = rec(next.hash, 2);
    await store.commitSnapshot(taken);
    assert.equal((await store.latestSnapshot('v'))!.id, taken.id);
  });

  it('a received tree that repeats one subtree (2^24 places over one stored block) is checked in its distinct nodes, refused when one place is wrong, and counted', async (t) => {
    const dir = await tempDir(t);
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    const data = randomBytes(BS);
    const h = hashBlock(data);
    await store.putBlocks(from([{ hash: h, data }]));
    // Levels 1-3 each repeat one node 256 times: 2^24 blocks, all the same. Walked place by place
    // (as diffTrees does) the check took 46-73 s for 2^22 places.
    const l1 = makeNode(1, Array.from({ length: 256 }, () => h));
    const l2 = makeNode(2, Array.from({ length: 256 }, () => l1.hash));
    const l3 = makeNode(3, Array.from({ length: 256 }, () => l2.hash));
    await store.putNodes([l1, l2, l3]);
    const blocks = 256 ** 3;
    let n = 0;
    const rec = (root: Buffer, nonZeroBlocks: number, size = blocks * BS): SnapshotRecord => ({ id: `20260101T000000.000Z-00000${++n}`, volume: 'big', size, blockSize: BS, root: root.toString('hex'), height: 3, created: '2026-01-01T00:00:00.000Z', parent: null, origin: 'pull', nonZeroBlocks });
    const started = Date.now();
    await assert.rejects(store.commitSnapshot(rec(l3.hash, blocks - 1)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.counted === blocks);
    // One block short at the end: the last place must hold a short block, which the repeated one is not.
    await assert.rejects(store.commitSnapshot(rec(l3.hash, blocks, blocks * BS - 512)), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && e.details.blockIndex === blocks - 1 && e.details.expected === BS - 512);
    await store.commitSnapshot(rec(l3.hash, blocks));
    assert.ok(Date.now() - started < 10_000, `three checks of 2^24 places took ${Date.now() - started} ms`);
    assert.equal((await store.latestSnapshot('big'))!.nonZeroBlocks, blocks);
  });

  it('a second process gets ERR_STORE_BUSY naming the pid; a killed holder is taken over', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    const holder = await spawnFixture('hold-store.ts', [storeDir], 'open');
    t.after(() => void holder.child.kill('SIGKILL'));
    await assert.rejects(Store.open(storeDir), (e: { code?: string; details?: { pid?: number } }) => {
      assert.equal(e.code, 'ERR_STORE_BUSY');
      assert.equal(e.details?.pid, holder.child.pid);
      return true;
    });
    holder.child.kill('SIGKILL');
    await waitExit(holder.child);
    const store = await Store.open(storeDir);
    const other = await spawnFixture('hold-store.ts', [storeDir], 'failed').catch((e: Error) => e);
    assert.ok(!(other instanceof Error) && other.output().includes('failed ERR_STORE_BUSY'), String(other instanceof Error ? other.message : other.output()));
    await assert.rejects(Store.open(storeDir), { code: 'ERR_STORE_BUSY' });
    await store.close();
  });

  it('the lock appears with its pid; leftovers of a holder killed while taking it are cleared', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    await (await Store.open(storeDir)).close();
    // A process killed after writing its pid file and before linking it: a dead pid's leftover.
    const dead = await spawnFixture('hold-store.ts', [join(dir, 'other')], 'open');
    dead.child.kill('SIGKILL');
    await waitExit(dead.child);
    await writeFile(join(storeDir, `store.lock.${dead.child.pid}.tmp`), `${dead.child.pid}\n`);
    const store = await Store.open(storeDir);
    t.after(() => store.close());
    assert.equal((await readFile(join(storeDir, 'store.lock'), 'utf8')).trim(), String(process.pid));
    assert.deepEqual((await readdir(storeDir)).filter((f) => f.startsWith('store.lock')), ['store.lock']);
  });

  it('recovers a torn pack tail on open; a record truncated below the durable length is reported', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    const blocks = [1, 2, 3].map((i) => Buffer.alloc(BS, i));
    let store = await Store.open(storeDir);
    for (const b of blocks) await store.putBlock(hashBlock(b), b);
    await store.close();
    const [pack] = await packFiles(storeDir);
    const durable = (await stat(pack!)).size;
    // A torn append: half a record of garbage after the durable length.
    await appendFile(pack!, Buffer.concat([Buffer.from('TBLK'), Buffer.alloc(5000, 0xab)]));
    store = await Store.open(storeDir);
    assert.deepEqual(store.recovery.truncated, [{ pack: 1, from: durable + 5004, to: durable }]);
    for (const b of blocks) assert.ok((await store.getBlock(hashBlock(b), BS)).equals(b));
    const more = Buffer.alloc(BS, 4);
    await store.putBlock(hashBlock(more), more);
    await store.close();
    // Damage below the durable length (the disk lost acknowledged bytes): only the last block suffers.
    await truncate(pack!, (await stat(pack!)).size - 100);
    store = await Store.open(storeDir);
    t.after(() => store.close());
    assert.deepEqual(store.recovery.short.map((s) => s.pack), [1]);
    for (const b of blocks) assert.ok((await store.getBlock(hashBlock(b), BS)).equals(b));
    await assert.rejects(store.getBlock(hashBlock(more)), { code: 'ERR_STORE_CORRUPT' });
    // The newest pack lost altogether: the store still opens (new blocks go to a new pack), and
    // its blocks read as damaged records of this store, not as an unreadable volume.
    await store.close();
    await rm(pack!);
    store = await Store.open(storeDir);
    assert.deepEqual(store.recovery.short, [{ pack: 1, size: 0, durable: store.packs.durable.get(1)! }]);
    await assert.rejects(store.getBlock(hashBlock(blocks[0]!)), { code: 'ERR_STORE_CORRUPT' });
    const after = Buffer.alloc(BS, 5);
    await store.putBlock(hashBlock(after), after);
    assert.ok((await store.getBlock(hashBlock(after), BS)).equals(after));
    await store.close();
  });

  it('received blocks whose pages go to the disk directly read back exactly: during the stream, after it, mixed with buffered appends, and after reopening', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    // Odd sizes: records start and end anywhere within pages; batches of ~4 MiB hold several.
    const blocks = Array.from({ length: 40 }, (_, i) => randomBytes(300 * 1024 + i * 517));
    let store = await Store.open(storeDir);
    const lone = randomBytes(5000);
    await store.putBlock(hashBlock(lone), lone); // a buffered append first: the next batch starts inside its page
    async function* frames(list: Buffer[]) {
      for (const [i, b] of list.entries()) {
        // The first batch (~13 blocks) is appended once the second is handed over, and may still be
        // on its way to the disk: reading it waits for that.
        if (i >= 28) assert.ok((await store.getBlock(hashBlock(list[i - 28]!), list[i - 28]!.length)).equals(list[i - 28]!));
        yield { hash: hashBlock(b), data: b };
      }
    }
    assert.equal((await store.putBlocks(frames(blocks.slice(0, 30)))).stored, 30);
    const more = randomBytes(7000);
    await store.putBlock(hashBlock(more), more);
    assert.equal((await store.putBlocks(frames(blocks.slice(30)))).stored, 10);
    for (const b of [lone, more, ...blocks]) assert.ok((await store.getBlock(hashBlock(b), b.length)).equals(b));
    await store.close();
    store = await Store.open(storeDir);
    t.after(() => store.close());
    assert.deepEqual(store.recovery, { removed: [], truncated: [], short: [] });
    const total = [lone, more, ...blocks].reduce((n, b) => n + b.length + 48, 0);
    assert.equal((await stat((await packFiles(storeDir))[0]!)).size, total);
    for (const b of [lone, more, ...blocks]) assert.ok((await store.getBlock(hashBlock(b), b.length)).equals(b));
  });

  it('a full disk met by a direct write in the background: the stream fails with ERR_DISK_FULL, and the same open store takes blocks again once there is space', async (t) => {
    const mnt = smallTmpfs(t, '6m');
    if (!mnt) return;
    const { randomBytes } = await import('node:crypto');
    const storeDir = join(mnt, 'store');
    const store = await Store.open(storeDir);
    t.after(() => store.close());
    const kept = randomBytes(100 * 1024);
    assert.equal((await store.putBlocks(frames([kept]))).stored, 1);
    // 12 MiB into 6: the first batch's direct write is waited for (it tells whether the
    // filesystem takes direct writes at all), the later ones fail in the background.
    const many = Array.from({ length: 24 }, () => randomBytes(512 * 1024));
    await assert.rejects(store.putBlocks(frames(many)), { code: 'ERR_DISK_FULL' });
    execFileSync('mount', ['-o', 'remount,size=64m', mnt]);
    const after = await store.putBlocks(frames(many));
    assert.ok(after.stored > 0 && after.stored <= many.length, `stored ${after.stored}`);
    for (const b of [kept, ...many]) assert.ok((await store.getBlock(hashBlock(b), b.length)).equals(b));
    await store.close();
    const reopened = await Store.open(storeDir);
    t.after(() => reopened.close());
    assert.deepEqual(reopened.recovery, { removed: [], truncated: [], short: [] }, 'the discarded bytes were cut away at once');
    for (const b of [kept, ...many]) assert.ok((await reopened.getBlock(hashBlock(b), b.length)).equals(b));
  });

  it('a full disk met by a write through the page cache: the bytes appended since the last flush are cut away at once, so the failed operation leaves the disk as it found it', async (t) => {
    const mnt = smallTmpfs(t, '6m');
    if (!mnt) return;
    const storeDir = join(mnt, 'store');
    const store = await Store.open(storeDir);
    t.after(() => store.close());
    const kept = randomBytes(100 * 1024);
    assert.equal((await store.putBlocks(frames([kept]))).stored, 1);
    const before = (await statfs(mnt)).bfree;
    // Not direct (putVerifiedMany without it, as a scan's first blocks): 8 MiB into what is left of 6.
    const many = Array.from({ length: 16 }, () => randomBytes(512 * 1024));
    await assert.rejects(store.putVerifiedMany(many.map((b) => ({ hash: hashBlock(b), data: b }))), { code: 'ERR_DISK_FULL' });
    assert.equal((await statfs(mnt)).bfree, before, 'the space the failed writes took is free again');
    assert.ok((await store.getBlock(hashBlock(kept), kept.length)).equals(kept));
    assert.deepEqual(await store.hasBlocks(many.map(hashBlock)), many.map(() => false));
    await store.close();
    const reopened = await Store.open(storeDir);
    t.after(() => reopened.close());
    assert.ok((await reopened.getBlock(hashBlock(kept), kept.length)).equals(kept));
  });

  it('a store whose disk is full opens by giving up its reserve; the next open with room makes the reserve again', async (t) => {
    const mnt = smallTmpfs(t, '80m');
    if (!mnt) return;
    const storeDir = join(mnt, 'store');
    let store = await Store.open(storeDir);
    assert.equal((await stat(join(storeDir, 'reserve'))).size, RESERVE_BYTES, 'a store with room keeps a reserve');
    const kept = randomBytes(100 * 1024);
    assert.equal((await store.putBlocks(frames([kept]))).stored, 1);
    await store.close();
    // Something else fills the disk to the last byte.
    const junk = join(mnt, 'junk');
    const fh = await open(junk, 'w');
    try {
      for (;;) await fh.write(Buffer.alloc(1024 * 1024));
    } catch (e) {
      assert.equal((e as NodeJS.ErrnoException).code, 'ENOSPC');
    }
    try {
      for (;;) await fh.write(Buffer.alloc(4096));
    } catch {
      // the last pages
    }
    await fh.close();
    store = await Store.open(storeDir);
    assert.equal(store.reserveReleased, true);
    assert.equal(existsSync(join(storeDir, 'reserve')), false);
    assert.ok((await store.getBlock(hashBlock(kept), kept.length)).equals(kept), 'the store is whole');
    await store.close();
    await rm(junk);
    store = await Store.open(storeDir);
    t.after(() => store.close());
    assert.equal(store.reserveReleased, false);
    assert.equal((await stat(join(storeDir, 'reserve'))).size, RESERVE_BYTES, 'made again once there is room');
  });

  it('getBlocks with direct reads the same bytes as through the cache: blocks at any offset, the pack\'s unaligned tail, blocks appended a moment ago, and a damaged one is refused', async (t) => {
    const check = async (store: Store, blocks: readonly Buffer[]) => {
      const hashes = blocks.map(hashBlock);
      const got: Buffer[] = [];
      for await (const f of store.getBlocks(hashes, { direct: true })) {
        got.push(Buffer.from(f.data));
        f.release?.();
      }
      assert.equal(got.length, blocks.length);
      got.forEach((g, i) => assert.ok(g.equals(blocks[i]!), `block ${i}`));
    };
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    const store = await Store.open(storeDir);
    t.after(() => store.close());
    // Odd sizes put records at offsets that are not multiples of a page, and the pack's end too.
    const blocks = [300_001, 512 * 1024, 262_147, 512 * 1024 + 13, 400_000].map((n) => randomBytes(n));
    assert.equal((await store.putBlocks(frames(blocks))).stored, blocks.length);
    await check(store, blocks);
    // The pack reads themselves (getBlocks falls back to a buffered read of a block whose record
    // does not check out, so equal blocks alone would not show a wrong direct read): any offset,
    // and a range past the end of the pack comes back short, as through the cache.
    const packs = (store as unknown as { packs: PackFiles }).packs;
    const size = (await stat((await packFiles(storeDir))[0]!)).size;
    for (const [offset, length] of [[0, 300_000], [1, 262_144], [4095, 524_289], [4096, 300_000], [300_049, 524_332], [size - 270_000, 270_000], [size - 262_144 + 7, 262_144]] as const) {
      const want = await packs.read(1, offset, length);
      const got = await packs.readPooled(1, offset, length, { direct: true });
      assert.ok(got.release !== undefined, 'read into a pooled buffer');
      assert.ok(got.buf.equals(want), `${length} bytes at ${offset}`);
      got.release!();
    }
    // Appended through the cache and not flushed yet: a direct read sees them too.
    const fresh = [randomBytes(300_000), randomBytes(512 * 1024)];
    await store.putVerifiedMany(fresh.map((b) => ({ hash: hashBlock(b), data: b })));
    await check(store, [...fresh, ...blocks]);
    await store.close();
    // A flipped byte in the payload of the third block: refused, not handed out.
    const pack = (await packFiles(storeDir))[0]!;
    const fh = await open(pack, 'r+');
    const buf = Buffer.alloc(1);
    const at = (await readFile(pack)).indexOf(blocks[2]!.subarray(0, 64)) + 1000;
    await fh.read(buf, 0, 1, at);
    buf[0]! ^= 0xff;
    await fh.write(buf, 0, 1, at);
    await fh.close();
    const reopened = await Store.open(storeDir);
    t.after(() => reopened.close());
    await check(reopened, [blocks[0]!, blocks[1]!]);
    await assert.rejects(check(reopened, [blocks[2]!]), { code: 'ERR_BLOCK_CORRUPT' });
  });

  it('getBlocks with direct on a filesystem without direct I/O reads through the cache', async (t) => {
    const mnt = smallTmpfs(t, '16m');
    if (!mnt) return;
    const store = await Store.open(join(mnt, 'store'));
    t.after(() => store.close());
    const blocks = [randomBytes(512 * 1024), randomBytes(300_001)];
    await store.putBlocks(frames(blocks));
    const got: Buffer[] = [];
    for await (const f of store.getBlocks(blocks.map(hashBlock), { direct: true })) got.push(Buffer.from(f.data));
    assert.ok(got[0]!.equals(blocks[0]!) && got[1]!.equals(blocks[1]!));
  });

  it('a pack file never indexed (crash before the first flush) is removed on open', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    let store = await Store.open(storeDir);
    await store.close();
    await writeFile(join(storeDir, 'packs', '00000007.pack'), Buffer.alloc(1000, 1));
    store = await Store.open(storeDir);
    t.after(() => store.close());
    assert.deepEqual(store.recovery.removed, [7]);
    assert.deepEqual(await packFiles(storeDir), []);
  });

  it("putNodes looks up only the children a node does not share with its held base (the base's subtree is known whole)", async (t) => {
    const store = await Store.open(join(await tempDir(t), 'store'));
    t.after(() => store.close());
    const blocks = [0, 1, 2].map(() => randomBytes(4096));
    const [a, b, c] = blocks.map(hashBlock) as [Buffer, Buffer, Buffer];
    await store.putBlocks(frames(blocks));
    const base = makeNode(1, [a, b]);
    await store.putNodes([base]);
    // Take b's index entry away behind the store's back: only a lookup can notice.
    await store.db.del(blockKey(b));
    const next = makeNode(1, [c, b]);
    await assert.rejects(store.putNodes([next]), (e: Error & { code?: string }) => e.code === 'ERR_SNAPSHOT_INCOMPLETE');
    await store.putNodes([{ ...next, base: base.hash }]);
    assert.deepEqual(await store.hasNodes([next.hash]), [true]);
    // c, which differs from the base's child there, is still looked up.
    await store.db.del(blockKey(c));
    const again = makeNode(1, [c, b, a]);
    await assert.rejects(store.putNodes([{ ...again, base: base.hash }]), (e: Error & { code?: string }) => e.code === 'ERR_SNAPSHOT_INCOMPLETE');
  });

  it('verify reads a shared block once and skips subtrees it found good, reports a damaged shared block for every snapshot reaching it, and tells its progress', async (t) => {
    const { storeDir, img, store, snaps } = await threeSnapshots(t, [5], [300]);
    const calls: VerifyProgress[] = [];
    const report = await store.verify(undefined, { onProgress: (p) => calls.push(p) });
    // 600 blocks + the 2 changed ones; 4 nodes of the first snapshot, then a new root and level-1 node each.
    assert.deepEqual({ ...report, problems: report.problems.length }, { snapshots: 3, nodes: 8, blocks: 602, bytes: 602 * BS, problems: 0 });
    assert.ok(calls.length >= 1);
    for (const c of calls) assert.equal(c.blocksTotal, 602); // the estimate: 600 blocks, then one changed block per snapshot
    assert.deepEqual(calls.at(-1), { blocksDone: 602, blocksTotal: 602, bytesRead: 602 * BS, problems: 0 });

    // Block 400, in every snapshot (under a level-1 node the third replaced), is damaged: read
    // once, named three times.
    const hash = hashBlock(img.subarray(400 * BS, 401 * BS));
    await damageBlock(store, storeDir, hash);
    const bad = await store.verify();
    assert.equal(bad.blocks, 602);
    assert.deepEqual(bad.problems.map((p) => [p.snapshot, p.blockIndex, p.code, p.hash]), snaps.map((s) => [s.id, 400, 'ERR_BLOCK_CORRUPT', hash.toString('hex')]));
  });

  it('verify runs beside gc: a snapshot deleted and collected meanwhile is not reported, blocks gc moved are not either, a damaged one is; it keeps to its byte rate and stops when aborted', async (t) => {
    const range = (from: number) => Array.from({ length: 100 }, (_, i) => from + i);
    const { dir, storeDir, store, snaps } = await threeSnapshots(t, range(0), range(100));
    // Another volume, in a pack of its own, has a damaged block.
    await startNewPack(store);
    const otherImg = makeImage(40, BS);
    await writeImage(join(dir, 'other'), otherImg);
    const other = await scanFile(store, join(dir, 'other'), 'other');
    const hash = hashBlock(otherImg.subarray(7 * BS, 8 * BS));
    await damageBlock(store, storeDir, hash);
    const packsBefore = await packFiles(storeDir);

    // 840 blocks (52.5 MiB) at 20 MiB/s: ~2.6 s. 300 ms in, the first snapshot is deleted and gc
    // moves every live block of vol into a new pack and deletes the one they were read from.
    const rate = 20 * 1024 * 1024;
    const t0 = Date.now();
    const running = store.verify(undefined, { bytesPerSecond: rate }).then((r) => ({ r, at: Date.now() }));
    await new Promise((r) => setTimeout(r, 300));
    await store.deleteSnapshot('vol', snaps[0]!.id);
    const gc = await store.gc();
    const gcDone = Date.now();
    assert.equal(gc.blocksRemoved, 100);
    assert.equal(gc.packsRewritten, 1);
    assert.ok(!(await packFiles(storeDir)).includes(packsBefore[0]!));
    const { r: report, at } = await running;
    assert.ok(gcDone < at, 'gc did not wait for verify');
    assert.deepEqual(report.problems.map((p) => [p.snapshot, p.blockIndex, p.code, p.hash]), [[other.id, 7, 'ERR_BLOCK_CORRUPT', hash.toString('hex')]]);
    assert.equal(report.snapshots, 3);
    assert.ok(at - t0 >= (report.bytes / rate) * 1000 - 50, `${report.bytes} bytes in ${at - t0} ms`);

    // A second run, unthrottled, agrees; an aborted one stops with the abort's reason.
    assert.deepEqual((await store.verify()).problems, report.problems);
    const ac = new AbortController();
    const stopped = store.verify(undefined, { bytesPerSecond: 1024 * 1024, signal: ac.signal });
    setTimeout(() => ac.abort(new Error('stop now')), 100);
    await assert.rejects(stopped, /stop now/);
  });

  it('verify names the volume, snapshot and block index of a flipped block', async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    const img = makeImage(40, BS);
    await writeImage(join(dir, 'img'), img);
    let store = await Store.open(storeDir);
    const snap = await scanFile(store, join(dir, 'img'), 'vol');
    await store.close();
    // Flip one payload byte of block 17 in the pack.
    const [pack] = await packFiles(storeDir);
    const raw = Buffer.from(await (await import('node:fs/promises')).readFile(pack!));
    const at = raw.indexOf(img.subarray(17 * BS, 17 * BS + BS));
    assert.ok(at > 0);
    const fh = await open(pack!, 'r+');
    await fh.write(Buffer.from([raw[at + 1000]! ^ 0x10]), 0, 1, at + 1000);
    await fh.close();
    store = await Store.open(storeDir);
    t.after(() => store.close());
    const report = await store.verify();
    assert.equal(report.blocks, 40);
    assert.deepEqual(report.problems, [{ kind: 'block', code: 'ERR_BLOCK_CORRUPT', hash: hashBlock(img.subarray(17 * BS, 18 * BS)).toString('hex'), volume: 'vol', snapshot: snap.id, blockIndex: 17 }]);
    await assert.rejects(store.getBlock(hashBlock(img.subarray(17 * BS, 18 * BS))), { code: 'ERR_BLOCK_CORRUPT' });
    assert.equal((await store.verify({ volume: 'vol', snapshot: snap.id })).problems.length, 1);
    // A consumer that verifies blocks itself gets records checked by their CRC: intact blocks
    // come back as stored, and the damaged one is still refused.
    const read = async (from: number, to: number) => {
      const out: Buffer[] = [];
      const hashes = Array.from({ length: to - from }, (_, i) => hashBlock(img.subarray((from + i) * BS, (from + i + 1) * BS)));
      for await (const f of store.getBlocks(hashes, { consumerVerifies: true })) out.push(Buffer.from(f.data));
      return Buffer.concat(out);
    };
    assert.ok((await read(10, 17)).equals(img.subarray(10 * BS, 17 * BS)));
    await assert.rejects(read(16, 18), { code: 'ERR_BLOCK_CORRUPT' });
  });

  it("gc reclaims a deleted snapshot's unique blocks; kept snapshots read back exactly", async (t) => {
    const dir = await tempDir(t);
    const storeDir = join(dir, 'store');
    const path = join(dir, 'img');
    const img = makeImage(64, BS);
    await writeImage(path, img);
    const store = await Store.open(storeDir);
    t.after(() => store.close());
    const s1 = await scanFile(store, path, 'vol');
    const img2 = Buffer.from(img);
    for (const i of [3, 4, 50]) img2.fill(i, i * BS, (i + 1) * BS);
    await writeImage(path, img2);
    const s2 = await scanFile(store, path, 'vol', { parent: s1 });
    const before = await packBytes(storeDir);
    assert.deepEqual(await store.gc().then((r) => r.blocksRemoved), 0);
    await store.deleteSnapshot('vol', s1.id);
    // The deleted snapshot's root, read (and so kept in the store's node cache) before gc.
    const root1 = Buffer.from(s1.root, 'hex');
    assert.equal((await store.getNodes([root1]))[0]!.children.length, 64);
    // Reads running while gc moves blocks and deletes packs still succeed.
    const [report, during] = await Promise.all([store.gc(), readBack(store, s2)]);
    assert.ok(during.equals(img2));
    assert.equal(report.blocksRemoved, 3);
    assert.equal(report.blocksKept, 64);
    assert.equal(report.nodesRemoved, 1);
    // The node gc deleted is gone for every reader, the cache included.
    await assert.rejects(store.getNodes([root1]), { code: 'ERR_NODE_MISSING' });
    assert.deepEqual(await store.nodesHeld([root1]), [undefined]);
    assert.ok(report.bytesReclaimed >= 3 * BS, `reclaimed ${report.bytesReclaimed}`);
    const after = await packBytes(storeDir);
    assert.ok(before - after >= 3 * BS);
    assert.deepEqual(await store.hasBlocks([3, 4, 50].map((i) => hashBlock(img.subarray(i * BS, (i + 1) * BS)))), [false, false, false]);
    assert.ok((await readBack(store, s2)).equals(img2));
    assert.equal((await store.verify()).problems.length, 0);
    // New writes after gc land in a fresh pack and survive a reopen.
    const s3 = await scanFile(store, path, 'vol2');
    assert.ok((await readBack(store, s3)).equals(img2));
  });

  it('nodes put without a commit (a sync that stopped before it) and collected by gc are not written again by a later commit', async (t) => {
    const { path, store } = await openStore(t);
    const img = makeImage(4, BS);
    await writeImage(path, img);
    // A receiver's view: blocks and a node of a snapshot whose commit never came.
    const orphanBlock = Buffer.alloc(BS, 7);
    await store.putBlocks(from([{ hash: hashBlock(orphanBlock), data: orphanBlock }]));
    const orphan = makeNode(1, [hashBlock(orphanBlock)]);
    await store.putNodes([orphan]);
    assert.deepEqual(await store.hasNodes([orphan.hash]), [true]);
    assert.equal((await store.gc()).nodesRemoved, 1);
    // The next commit puts the nodes written without a sync again, with its record (they are
    // made durable by it): not this one, which gc deleted with its block.
    const snap = await scanFile(store, path, 'vol');
    assert.deepEqual(await store.hasNodes([orphan.hash]), [false]);
    assert.deepEqual(await store.hasBlocks([hashBlock(orphanBlock)]), [false]);
    assert.ok((await readBack(store, snap)).equals(img));
    assert.deepEqual((await store.verify()).problems, []);
  });

  it('gc reclaims a record no index entry points at (a block two writers stored at once)', async (t) => {
    const { storeDir, path, store } = await openStore(t);
    const img = makeImage(8, BS);
    await writeImage(path, img);
    const snap = await scanFile(store, path, 'vol');
    // A second copy of block 0, in a pack the index names, with no entry of its own: what a put
    // racing another writer's flush leaves (store.ts putVerifiedMany).
    const packs = (store as unknown as { packs: PackFiles }).packs;
    const block0 = img.subarray(0, BS);
    await packs.appendMany([{ hash: hashBlock(block0), codec: CODEC_RAW, payload: block0 }]);
    const lengths = await packs.sync();
    for (const [id, n] of lengths) await store.db.put(packKey(id), encodeU64(n));
    packs.markDurable(lengths);
    assert.equal(await packBytes(storeDir), 9 * recordLength(BS));
    const report = await store.gc();
    assert.equal(report.blocksRemoved, 0, 'no index entry was dead');
    assert.equal(report.bytesReclaimed, recordLength(BS), 'the extra copy went');
    assert.equal(await packBytes(storeDir), 8 * recordLength(BS));
    assert.equal((await store.verify()).problems.length, 0);
    assert.ok((await readBack(store, snap)).equals(img));
  });

  it('gc tells its progress after each round: entries handled of those to handle, bytes copied', async (t) => {
    const { path, store } = await openStore(t);
    process.env.TANDEM_GC_ROUND_ENTRIES = '8';
    t.after(() => void delete process.env.TANDEM_GC_ROUND_ENTRIES);
    await halfRewritten(store, path);
    const seen: GcProgress[] = [];
    const report = await store.gc({ onProgress: (p) => seen.push(p) });
    // One pack: 64 live entries (32 kept from the first snapshot, 32 new) and 32 dead.
    assert.equal(report.blocksRemoved, 32);
    assert.equal(seen.length, 12, 'rounds of 8 of the 96 entries');
    assert.ok(seen.every((p, i) => p.entriesTotal === 96 && p.entriesDone === 8 * (i + 1)));
    assert.equal(seen.at(-1)!.bytesCopied, 64 * recordLength(BS));
  });

  it('two gcs at once and a snapshot during them: all succeed, and only the packs the index names are left', async (t) => {
    const { storeDir, path, store } = await openStore(t);
    const { img2, s2 } = await halfRewritten(store, path);
    // The second gc waits for the first to have deleted its old packs; the snapshot runs
    // between or after them.
    const [r1, r2, s3] = await Promise.all([store.gc(), store.gc(), scanFile(store, path, 'other')]);
    assert.equal(r1.blocksRemoved + r2.blocksRemoved, 32);
    assert.equal((await store.verify()).problems.length, 0);
    assert.ok((await readBack(store, s2)).equals(img2));
    assert.ok((await readBack(store, s3)).equals(img2));
    await store.close();
    // A reopen deletes pack files the index does not name: there must be none.
    const before = await packFiles(storeDir);
    const again = await Store.open(storeDir);
    t.after(() => again.close());
    assert.deepEqual(await packFiles(storeDir), before, 'no pack was left behind by either gc');
    assert.equal((await again.verify()).problems.length, 0);
  });

  it('gc keeps a pack with a damaged live record, whose entry stays with it: verify still names the block; everything else is repacked', async (t) => {
    const { storeDir, path, store } = await openStore(t);
    // Two volumes, each in a pack of its own (a rollover between them), each with dead records
    // once the first snapshot of each is deleted.
    const snaps: SnapshotRecord[] = [];
    const images: Buffer[] = [];
    for (const vol of ['a', 'b']) {
      const img = makeImage(48, BS);
      await writeImage(path, img);
      const s1 = await scanFile(store, path, vol);
      const img2 = Buffer.from(img);
      for (const i of [3, 4, 40]) img2.fill(i + 1, i * BS, (i + 1) * BS);
      await writeImage(path, img2);
      snaps.push(await scanFile(store, path, vol, { parent: s1 }));
      images.push(img2);
      await store.deleteSnapshot(vol, s1.id);
      await (store as unknown as { packs: PackFiles }).packs.rollover();
    }
    // Damage block 10 of volume a (live) inside its pack.
    const hash = hashBlock(images[0]!.subarray(10 * BS, 11 * BS));
    const packs = await packFiles(storeDir);
    let damaged = '';
    for (const p of packs) {
      const bytes = await readFile(p);
      const at = bytes.indexOf(hash);
      if (at < 0) continue;
      const f = await open(p, 'r+');
      const one = Buffer.alloc(1);
      const pos = at - 12 + 44 + 100; // the hash sits at byte 12 of the 44-byte record header
      await f.read(one, 0, 1, pos);
      one[0] = one[0]! ^ 0xff;
      await f.write(one, 0, 1, pos);
      await f.close();
      damaged = p;
    }
    assert.notEqual(damaged, '', 'the block was found in a pack');
    const report = await store.gc();
    assert.equal(report.packsRewritten, 1, "volume b's pack went; a's is kept for its damaged block");
    assert.equal(report.blocksRemoved, 6, 'the dead blocks of both volumes went');
    assert.ok((await packFiles(storeDir)).includes(damaged), 'the damaged pack is kept');
    const problems = (await store.verify()).problems;
    assert.deepEqual(problems.map((p) => [p.code, p.volume, p.blockIndex]), [['ERR_BLOCK_CORRUPT', 'a', 10]]);
    assert.ok((await readBack(store, snaps[1]!)).equals(images[1]!), 'volume b reads back exactly from its new pack');
    for (let i = 0; i < 48; i++) {
      if (i === 10) continue;
      const data = await store.getBlock(hashBlock(images[0]!.subarray(i * BS, (i + 1) * BS)), BS);
      assert.ok(data.equals(images[0]!.subarray(i * BS, (i + 1) * BS)), `block ${i} of volume a reads back from where gc moved it`);
    }
    // The next gc tries the damaged pack again and keeps it again; nothing else changes.
    const again = await store.gc();
    assert.equal(again.blocksRemoved, 0);
    assert.ok((await packFiles(storeDir)).includes(damaged));
    assert.equal((await store.verify()).problems.length, 1);
  });
});
