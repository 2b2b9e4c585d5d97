/**
 * gc crash safety: gc runs in a child process that is killed with SIGKILL at a random moment;
 * after every kill the store reopens, verify finds nothing wrong and the kept snapshots read
 * back exactly. Each trial first adds garbage (a snapshot that is then deleted) so gc has work.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Store, type SnapshotRecord } from '../../store/index.js';
import { fileReader, makeImage, spawnFixture, tempDir, waitExit, writeImage } from './helpers.js';

const BS = 65536;
const TRIALS = 8;
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

async function image(store: Store, snap: SnapshotRecord): Promise<Buffer> {
  const out = Buffer.alloc(snap.size);
  for await (const { index, hash } of store.blockHashes(snap)) (await store.getBlock(hash, BS)).copy(out, index * BS);
  return out;
}

it('gc killed at random moments leaves a valid store with intact snapshots', async (t) => {
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
});
