/**
 * gc merges small packs that hold nothing dead (store/gc.ts SMALL_PACK_BYTES, MERGE_MIN_PACKS):
 * a store where every gc started a new pack for the next snapshot ends with one pack once there
 * are four, and a kill -9 in the middle leaves a valid store.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { recordLength } from '../../store/pack.js';
import { Store, type SnapshotRecord } from '../../store/index.js';
import { gcKilledAtUnlink, makeImage, readBack, scanFile, skipWithoutStrace, startNewPack, tempDir, writeImage } from './helpers.js';

const BS = 65536;
/** Bytes of small packs gc merges a run at most (store/README.md, gc step 2). */
const MERGE_LIMIT = 256 * 1024 * 1024;

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** `n` packs of `blocks` live blocks each, nothing dead: a snapshot, a gc (which rewrites nothing), then a new pack. */
async function smallPacks(store: Store, path: string, n: number, blocks: number): Promise<Array<{ snap: SnapshotRecord; img: Buffer }>> {
  const kept: Array<{ snap: SnapshotRecord; img: Buffer }> = [];
  for (let i = 0; i < n; i++) {
    const img = makeImage(blocks, BS);
    await writeImage(path, img);
    kept.push({ snap: await scanFile(store, path, `v${i}`, BS), img });
    assert.equal((await store.gc()).packsRewritten, 0, 'fewer than 4 small packs are left alone');
    await startNewPack(store);
  }
  return kept;
}

async function packNames(storeDir: string): Promise<string[]> {
  return (await readdir(join(storeDir, 'packs'))).sort();
}

async function packSizes(storeDir: string): Promise<number[]> {
  const dir = join(storeDir, 'packs');
  return Promise.all((await readdir(dir)).sort().map(async (f) => (await stat(join(dir, f))).size));
}

it('gc merges small packs with nothing dead into one once there are four; three are left alone', async (t) => {
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  const path = join(dir, 'img');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const kept = await smallPacks(store, path, 3, 16);
  assert.equal((await packSizes(storeDir)).length, 3);
  const img = makeImage(16, BS);
  await writeImage(path, img);
  kept.push({ snap: await scanFile(store, path, 'v3', BS), img });
  const report = await store.gc();
  assert.deepEqual([report.packsRewritten, report.blocksRemoved, report.bytesReclaimed], [4, 0, 0]);
  assert.deepEqual(await packSizes(storeDir), [4 * 16 * recordLength(BS)], 'one pack holds each live record once');
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `${snap.volume} reads back`);
});

it('gc merging small packs killed as it deletes one (strace, at its 1st to 5th pack unlink): the store is valid, and after the rerun each live record is in the packs once', async (t) => {
  if (skipWithoutStrace(t, 'it stops gc exactly at a pack\'s deletion')) return;
  const dir = await tempDir(t);
  const path = join(dir, 'img');
  for (let k = 1; k <= 5; k++) {
    const storeDir = join(dir, `store${k}`);
    let store = await Store.open(storeDir);
    const kept = await smallPacks(store, path, 3, 16);
    // The fourth: gc in the child merges them.
    const img = makeImage(16, BS);
    await writeImage(path, img);
    kept.push({ snap: await scanFile(store, path, 'v3', BS), img });
    await store.close();
    const packDir = join(storeDir, 'packs');
    const oldPacks = (await readdir(packDir)).map((f) => join(packDir, f));
    assert.equal(oldPacks.length, 4);
    const out = await gcKilledAtUnlink(storeDir, oldPacks, k);
    // k = 5: no fifth unlink, gc completes.
    assert.equal(out.includes('done'), k === 5, out);
    store = await Store.open(storeDir);
    try {
      assert.deepEqual((await store.verify()).problems, [], `kill at unlink ${k}`);
      for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `kill at unlink ${k}: ${snap.volume}`);
      await store.gc();
      const sizes = await packSizes(storeDir);
      assert.equal(sizes.reduce((a, b) => a + b, 0), 4 * 16 * recordLength(BS), `kill at unlink ${k}: each live record once (${sizes.join(', ')})`);
      // The packs merged before the kill make one; the rerun merges again only when four small ones are left.
      assert.ok(sizes.length <= 3, `kill at unlink ${k}: ${sizes.length} packs`);
      assert.deepEqual((await store.verify()).problems, []);
    } finally {
      await store.close();
    }
  }
});

it('gc with nothing to rewrite starts no pack: the next snapshot appends to the pack it found open', async (t) => {
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  const path = join(dir, 'img');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const kept: Array<{ snap: SnapshotRecord; img: Buffer }> = [];
  for (let i = 0; i < 3; i++) {
    const img = makeImage(16, BS);
    await writeImage(path, img);
    kept.push({ snap: await scanFile(store, path, `v${i}`, BS), img });
    const report = await store.gc();
    assert.deepEqual([report.packsRewritten, report.blocksRemoved], [0, 0]);
  }
  assert.equal((await packSizes(storeDir)).length, 1, 'three snapshots and three gc runs: one pack');
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img));
});

it('gc merges at most 256 MiB of small packs a run, the smallest first; the next run merges the rest (real sizes, in /dev/shm where there is one)', async (t) => {
  // Real sizes: 20 packs of 256 blocks of 64 KiB (16 MiB and 12 KiB each, under the 32 MiB of a
  // small pack), 320 MiB in all. 15 of them make 240 MiB; a 16th would pass 256 MiB.
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = await mkdtemp(join(base, 'tandem-gc-merge-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const storeDir = join(dir, 'store');
  const path = join(dir, 'img');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const PACKS = 20;
  const BLOCKS = 256;
  const packSize = BLOCKS * recordLength(BS);
  const kept: Array<{ snap: SnapshotRecord; digest: string }> = [];
  for (let i = 0; i < PACKS; i++) {
    const img = makeImage(BLOCKS, BS);
    await writeImage(path, img);
    kept.push({ snap: await scanFile(store, path, `v${i}`, BS), digest: sha256(img) });
    await startNewPack(store);
  }
  await rm(path);
  const before = await packNames(storeDir);
  assert.equal(before.length, PACKS);
  assert.deepEqual(await packSizes(storeDir), before.map(() => packSize));
  const intact = async (when: string) => {
    assert.deepEqual((await store.verify()).problems, [], `verify ${when}`);
    for (const { snap, digest } of kept) assert.equal(sha256(await readBack(store, snap, BS)), digest, `${snap.volume} reads back ${when}`);
  };

  let copied = 0;
  const first = await store.gc({ onProgress: (p) => void (copied = p.bytesCopied) });
  const merged = Math.floor(MERGE_LIMIT / packSize);
  assert.equal(merged, 15);
  assert.deepEqual([first.packsRewritten, first.blocksRemoved, first.bytesReclaimed, first.packsNotMerged], [merged, 0, 0, []]);
  assert.equal(copied, merged * packSize, 'the first run copied 240 MiB: at most 256 MiB, and a 16th pack would pass it');
  const afterFirst = await packNames(storeDir);
  // Equal sizes: the lowest ids go first. The 5 others are untouched, beside the merged pack.
  assert.deepEqual(afterFirst.filter((f) => before.includes(f)), before.slice(merged), 'the packs past the limit are left for the next run');
  assert.deepEqual((await packSizes(storeDir)).sort((a, b) => b - a), [merged * packSize, ...before.slice(merged).map(() => packSize)]);
  await intact('after the first run');

  const second = await store.gc({ onProgress: (p) => void (copied = p.bytesCopied) });
  assert.deepEqual([second.packsRewritten, second.blocksRemoved], [PACKS - merged, 0]);
  assert.equal(copied, (PACKS - merged) * packSize);
  assert.deepEqual((await packSizes(storeDir)).sort((a, b) => b - a), [merged * packSize, (PACKS - merged) * packSize], 'two packs, neither small');
  await intact('after the second run');
  assert.equal((await store.gc()).packsRewritten, 0, 'a third run has nothing to merge');
});
