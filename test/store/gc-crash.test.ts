/**
 * gc crash safety: gc runs in a child process that is killed with SIGKILL at a random moment;
 * after every kill the store reopens, verify finds nothing wrong and the kept snapshots read
 * back exactly. Each trial first adds garbage (a snapshot that is then deleted) so gc has work.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { recordLength } from '../../store/pack.js';
import { namespaceRange, NS } from '../../store/keys.js';
import { decodeNode } from '../../store/tree.js';
import { toHex } from '../../store/hash.js';
import { Store, type SnapshotRecord } from '../../store/index.js';
import { gcKilledAtUnlink, makeImage, readBack, scanFile, skipWithoutStrace, spawnFixture, startNewPack, tempDir, waitExit, writeImage } from './helpers.js';
import { trials } from '../helpers/soak.js';

const BS = 65536;
const TRIALS = trials(8);
/** Kill delays after gc started, in ms: spread over the few hundred ms a gc of this store takes. */
const MAX_KILL_DELAY_MS = 120;

/** Nodes in the index whose subtree is not all there (the node invariant, store/README.md). */
async function incompleteNodes(store: Store): Promise<string[]> {
  const bad: string[] = [];
  for await (const [k, v] of store.db.iterator(namespaceRange(NS.node))) {
    const node = decodeNode(k.subarray(1), v);
    if (!node) continue; // verify reports damaged nodes
    const present = node.level === 1 ? await store.hasBlocks(node.children) : await store.hasNodes(node.children);
    if (present.some((p) => !p)) bad.push(toHex(k.subarray(1)));
  }
  return bad;
}

it('gc killed at random moments, between its rounds too, leaves a valid store with intact snapshots; the next gc finishes the job', async (t) => {
  // Rounds of 16 index entries: a gc of this store takes several, and kills fall between them.
  // Groups of one pack (store/gc.ts): kills fall between a group's switch and its deletion too.
  process.env.TANDEM_GC_ROUND_ENTRIES = '16';
  process.env.TANDEM_GC_GROUP_BYTES = '1';
  t.after(() => void delete process.env.TANDEM_GC_ROUND_ENTRIES);
  t.after(() => void delete process.env.TANDEM_GC_GROUP_BYTES);
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  const path = join(dir, 'img');
  const kept = makeImage(96, BS, { zeroEvery: 4 });
  await writeImage(path, kept);
  let store = await Store.open(storeDir);
  const keep = await scanFile(store, path, 'keep', BS);
  await store.close();
  let completed = 0;
  let recovered = 0;
  for (let trial = 0; trial < TRIALS; trial++) {
    store = await Store.open(storeDir);
    await writeImage(path, makeImage(64, BS));
    const doomed = await scanFile(store, path, 'doomed', BS);
    await store.deleteSnapshot('doomed', doomed.id);
    await store.close();

    const { child, output } = await spawnFixture('gc-child.ts', [storeDir], 'ready');
    await new Promise((r) => setTimeout(r, Math.floor(Math.random() * MAX_KILL_DELAY_MS)));
    child.kill('SIGKILL');
    await waitExit(child);
    if (output().includes('done')) completed++;

    store = await Store.open(storeDir);
    if (store.recovery.removed.length > 0) recovered++;
    try {
      const report = await store.verify();
      assert.deepEqual(report.problems, [], `trial ${trial}`);
      assert.deepEqual(await incompleteNodes(store), [], `trial ${trial}: every node in the index has its whole subtree`);
      assert.ok((await readBack(store, keep, BS)).equals(kept), `trial ${trial}: kept snapshot differs`);
    } finally {
      await store.close();
    }
  }
  t.diagnostic(`${completed} of ${TRIALS} gc runs completed before the kill; ${recovered} reopens removed leftover packs`);
  // A final gc in-process completes and leaves only the kept snapshot's blocks.
  store = await Store.open(storeDir);
  t.after(() => store.close());
  const report = await store.gc();
  assert.equal(report.blocksKept, 72);
  assert.equal((await store.verify()).problems.length, 0);
  assert.ok((await readBack(store, keep, BS)).equals(kept));
  // Nothing is left to reclaim: no pack holds a record the index does not point at (records a
  // killed round had copied or moved are gone too).
  const second = await store.gc();
  assert.deepEqual([second.packsRewritten, second.blocksRemoved, second.bytesReclaimed], [0, 0, 0]);
  const packDir = join(storeDir, 'packs');
  const bytes = (await Promise.all((await readdir(packDir)).map((f) => stat(join(packDir, f))))).reduce((n, s) => n + s.size, 0);
  assert.equal(bytes, 72 * recordLength(BS), 'the packs hold the 72 live records and nothing else');
});

/** Packs of the store in the kill -9 at deletion test, each half live, half dead. */
const PACKS = 4;
const PACK_BLOCKS = 16;

it('gc killed as it deletes an old pack (at the 1st, 2nd... pack file it unlinks): the store is valid, the pack is gone at the next open, and gc reruns to completion', async (t) => {
  if (skipWithoutStrace(t, 'it stops gc exactly at a pack\'s deletion')) return;
  const dir = await tempDir(t);
  const path = join(dir, 'img');
  for (let k = 1; k <= PACKS; k++) {
    // A fresh store of PACKS packs, each holding a kept image and a deleted one: every pack is
    // rewritten, one group each (TANDEM_GC_GROUP_BYTES), and deleted one after the other (the
    // last after gc's locks are released).
    const storeDir = join(dir, `store${k}`);
    let store = await Store.open(storeDir);
    const kept: Array<{ snap: SnapshotRecord; img: Buffer }> = [];
    const doomed: SnapshotRecord[] = [];
    for (let i = 0; i < PACKS; i++) {
      const img = makeImage(PACK_BLOCKS, BS);
      await writeImage(path, img);
      kept.push({ snap: await scanFile(store, path, `k${i}`, BS), img });
      await writeImage(path, makeImage(PACK_BLOCKS, BS));
      doomed.push(await scanFile(store, path, `d${i}`, BS));
      // The next pair in a pack of its own.
      await startNewPack(store);
    }
    for (const d of doomed) await store.deleteSnapshot(d.volume, d.id);
    await store.close();
    const packDir = join(storeDir, 'packs');
    const oldPacks = (await readdir(packDir)).map((f) => join(packDir, f));
    assert.equal(oldPacks.length, PACKS);

    // SIGKILL at the entry of the k-th unlink of an old pack: the packs before it are deleted,
    // that one's 'p' entry is gone but its file is not.
    const out = await gcKilledAtUnlink(storeDir, oldPacks, k);
    assert.ok(out.includes('ready') && !out.includes('done'), `killed during gc: ${out}`);
    const left = (await readdir(packDir)).map((f) => join(packDir, f)).filter((p) => oldPacks.includes(p));
    assert.equal(left.length, PACKS - k + 1, `packs deleted before the kill: ${k - 1}`);

    store = await Store.open(storeDir);
    try {
      assert.equal(store.recovery.removed.length, 1, 'the pack whose deletion was cut short is deleted at open');
      assert.deepEqual((await store.verify()).problems, [], `kill at unlink ${k}`);
      assert.deepEqual(await incompleteNodes(store), []);
      for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `kill at unlink ${k}: ${snap.volume} reads back`);
      const report = await store.gc(); // the rerun finishes the job
      assert.equal(report.blocksKept, PACKS * PACK_BLOCKS);
      assert.deepEqual((await store.verify()).problems, []);
      for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img));
      const second = await store.gc();
      assert.deepEqual([second.packsRewritten, second.blocksRemoved, second.bytesReclaimed], [0, 0, 0]);
      const bytes = (await Promise.all((await readdir(packDir)).map((f) => stat(join(packDir, f))))).reduce((n, s) => n + s.size, 0);
      assert.equal(bytes, PACKS * PACK_BLOCKS * recordLength(BS), 'the packs hold the live records and nothing else');
    } finally {
      await store.close();
    }
  }
});
