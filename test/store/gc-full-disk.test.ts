/**
 * gc on a nearly full disk: a real ext4 filesystem on a loop device (skipped, with the reason,
 * when not root or without mkfs.ext4 / loop devices), filled so that less is free than the live
 * data gc must move but more than one pack's. gc deletes each old pack once its live records
 * have moved (store/gc.ts), so it needs room for about one pack, not for everything it moves.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readdir, stat, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { recordLength } from '../../store/pack.js';
import { Store, type SnapshotRecord } from '../../store/index.js';
import { smallExt4 } from '../helpers/cli.js';
import { fileReader, makeImage, writeImage } from './helpers.js';

const BS = 65536;
const MiB = 1024 * 1024;
/** Blocks of each image: 8 MiB. */
const BLOCKS = 128;
const PACKS = 4;

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

async function free(dir: string): Promise<number> {
  const s = await statfs(dir);
  return s.bavail * s.bsize;
}

it('gc on a disk with less free space than the live data it moves, but more than a pack: it succeeds, verify is clean and the space is freed', async (t) => {
  const mnt = smallExt4(t, 160);
  if (!mnt) return;
  const storeDir = join(mnt, 'store');
  const imgPath = join(mnt, 'img');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  // Four packs of 16 MiB, each half live (volume kN) and half dead (volume dN, deleted): a gc in
  // between starts a new pack for the next pair.
  const kept: Array<{ snap: SnapshotRecord; img: Buffer }> = [];
  const doomed: SnapshotRecord[] = [];
  for (let i = 0; i < PACKS; i++) {
    const img = makeImage(BLOCKS, BS);
    await writeImage(imgPath, img);
    kept.push({ snap: await scan(store, imgPath, `k${i}`), img });
    await writeImage(imgPath, makeImage(BLOCKS, BS));
    doomed.push(await scan(store, imgPath, `d${i}`));
    await store.gc(); // nothing to collect yet: it only starts a new pack for the next pair
  }
  for (const d of doomed) await store.deleteSnapshot(d.volume, d.id);
  execFileSync('rm', ['-f', imgPath]);
  const packDir = join(storeDir, 'packs');
  const packBytes = async () => (await Promise.all((await readdir(packDir)).map((f) => stat(join(packDir, f))))).reduce((n, s) => n + s.size, 0);
  const live = PACKS * BLOCKS * recordLength(BS);
  assert.ok((await readdir(packDir)).length >= PACKS, `at least ${PACKS} packs: ${(await readdir(packDir)).join(' ')}`);

  // Fill the disk until 20 MiB are free: less than the 32 MiB of live records gc moves, more
  // than one pack's 8 MiB.
  const filler = join(mnt, 'filler');
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 20 * MiB), filler]);
  const before = await free(mnt);
  assert.ok(before < live && before > live / PACKS + 4 * MiB, `free ${before}`);
  t.diagnostic(`${(before / MiB).toFixed(1)} MiB free, ${live / MiB} MiB of live records to move, ${((await packBytes()) / MiB).toFixed(1)} MiB of packs`);

  const report = await store.gc();
  assert.equal(report.blocksKept, PACKS * BLOCKS);
  assert.equal(report.blocksRemoved, PACKS * BLOCKS);
  assert.equal(report.packsRewritten, PACKS);
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await image(store, snap)).equals(img), `${snap.volume} reads back`);
  assert.equal(await packBytes(), live, 'the packs hold the live records and nothing else');
  const after = await free(mnt);
  t.diagnostic(`${(after / MiB).toFixed(1)} MiB free after gc`);
  assert.ok(after >= before + live - 2 * MiB, `the dead records' space is free: ${before} then ${after}`);
});
