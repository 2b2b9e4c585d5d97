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
import { fileReader, makeImage, spawnFixture, tempDir, waitExit, writeImage } from './helpers.js';
import { trials } from '../helpers/soak.js';

const BS = 65536;
const TRIALS = trials(8);
/** Kill delays after gc started, in ms: spread over the few hundred ms a gc of this store takes. */
const MAX_KILL_DELAY_MS = 120;

async function scan(store: Store, path: string, volume: string): Promise<SnapshotRecord> {
  const r = await fileReader(path);
  try {
    return await store.scanVolume(r, { volume, blockSize: BS });
  } finally {
    await r.close();
  }
}

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

async function image(store: Store, snap: SnapshotRecord): Promise<Buffer> {
  const out = Buffer.alloc(snap.size);
  for await (const { index, hash } of store.blockHashes(snap)) (await store.getBlock(hash, BS)).copy(out, index * BS);
  return out;
}

it('gc killed at random moments, between its rounds too, leaves a valid store with intact snapshots; the next gc finishes the job', async (t) => {
  // Rounds of 16 index entries: a gc of this store takes several, and kills fall between them.
  process.env.TANDEM_GC_ROUND_ENTRIES = '16';
  t.after(() => void delete process.env.TANDEM_GC_ROUND_ENTRIES);
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  const path = join(dir, 'img');
  const kept = makeImage(96, BS, { zeroEvery: 4 });
  await writeImage(path, kept);
  let store = await Store.open(storeDir);
  const keep = await scan(store, path, 'keep');
  await store.close();
  let completed = 0;
  let recovered = 0;
  for (let trial = 0; trial < TRIALS; trial++) {
    store = await Store.open(storeDir);
    await writeImage(path, makeImage(64, BS));
    const doomed = await scan(store, path, 'doomed');
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
      assert.ok((await image(store, keep)).equals(kept), `trial ${trial}: kept snapshot differs`);
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
  assert.ok((await image(store, keep)).equals(kept));
  // Nothing is left to reclaim: no pack holds a record the index does not point at (records a
  // killed round had copied or moved are gone too).
  const second = await store.gc();
  assert.deepEqual([second.packsRewritten, second.blocksRemoved, second.bytesReclaimed], [0, 0, 0]);
  const packDir = join(storeDir, 'packs');
  const bytes = (await Promise.all((await readdir(packDir)).map((f) => stat(join(packDir, f))))).reduce((n, s) => n + s.size, 0);
  assert.equal(bytes, 72 * recordLength(BS), 'the packs hold the 72 live records and nothing else');
});
