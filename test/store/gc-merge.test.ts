/**
 * gc merges small packs that hold nothing dead (store/gc.ts SMALL_PACK_BYTES, MERGE_MIN_PACKS):
 * a store where every gc started a new pack for the next snapshot ends with one pack once there
 * are four, and a kill -9 in the middle leaves a valid store.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { recordLength } from '../../store/pack.js';
import { Store, type SnapshotRecord } from '../../store/index.js';
import { gcKilledAtUnlink, makeImage, readBack, scanFile, skipWithoutStrace, startNewPack, tempDir, writeImage } from './helpers.js';

const BS = 65536;

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
