/**
 * gc on a nearly full disk: a real ext4 filesystem on a loop device (skipped, with the reason,
 * when not root or without mkfs.ext4 / loop devices), filled so that less is free than the live
 * data gc must move but more than one pack's. gc deletes each old pack once its live records
 * have moved (store/gc.ts), so it needs room for about one pack, not for everything it moves.
 */
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { appendFile, readdir, rm, stat, statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { recordLength } from '../../store/pack.js';
import { Store, type SnapshotRecord } from '../../store/index.js';
import { cli, cliJson, smallExt4 } from '../helpers/cli.js';
import { makeImage, readBack, scanFile, skipWithoutStrace, startNewPack, tempDir, waitExit, writeImage } from './helpers.js';

const BS = 65536;
const MiB = 1024 * 1024;
/** Blocks of each image: 8 MiB. */
const BLOCKS = 128;
const PACKS = 4;

async function free(dir: string): Promise<number> {
  const s = await statfs(dir);
  return s.bavail * s.bsize;
}

/**
 * {@link PACKS} packs of 16 MiB, each half live (volume kN) and half dead (volume dN, deleted):
 * a gc in between starts a new pack for the next pair. The image file is deleted after.
 */
async function halfDeadPacks(store: Store, imgPath: string): Promise<Array<{ snap: SnapshotRecord; img: Buffer }>> {
  const kept: Array<{ snap: SnapshotRecord; img: Buffer }> = [];
  const doomed: SnapshotRecord[] = [];
  for (let i = 0; i < PACKS; i++) {
    const img = makeImage(BLOCKS, BS);
    await writeImage(imgPath, img);
    kept.push({ snap: await scanFile(store, imgPath, `k${i}`, BS), img });
    await writeImage(imgPath, makeImage(BLOCKS, BS));
    doomed.push(await scanFile(store, imgPath, `d${i}`, BS));
    // The next pair in a pack of its own.
    await startNewPack(store);
  }
  for (const d of doomed) await store.deleteSnapshot(d.volume, d.id);
  await rm(imgPath);
  return kept;
}

it('gc on a disk with less free space than the live data it moves, but more than a pack: it succeeds, verify is clean and the space is freed', async (t) => {
  const mnt = smallExt4(t, 160);
  if (!mnt) return;
  const storeDir = join(mnt, 'store');
  const imgPath = join(mnt, 'img');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const kept = await halfDeadPacks(store, imgPath);
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
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `${snap.volume} reads back`);
  assert.equal(await packBytes(), live, 'the packs hold the live records and nothing else');
  const after = await free(mnt);
  t.diagnostic(`${(after / MiB).toFixed(1)} MiB free after gc`);
  assert.ok(after >= before + live - 2 * MiB, `the dead records' space is free: ${before} then ${after}`);
});

it('gc on a disk with less free space than any pack it would rewrite needs: ERR_DISK_FULL naming the pack and the space, the disk left as it was; with space freed, gc completes', async (t) => {
  const mnt = smallExt4(t, 160);
  if (!mnt) return;
  const storeDir = join(mnt, 'store');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const kept = await halfDeadPacks(store, join(mnt, 'img'));
  // 6 MiB free: each pack has 8 MiB of live records to copy.
  const filler = join(mnt, 'filler');
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 6 * MiB), filler]);
  const before = await free(mnt);
  await assert.rejects(store.gc(), (e: Error & { code?: string; details?: { packs: number[]; packsRewritten: number } }) => {
    assert.equal(e.code, 'ERR_DISK_FULL');
    assert.match(e.message, /pack \d+ needs [\d.]+ MiB free .* free space on the store's disk or grow it, then run gc again/);
    assert.equal(e.details?.packs.length, PACKS);
    assert.equal(e.details?.packsRewritten, 0);
    return true;
  });
  const after = await free(mnt);
  assert.ok(after >= before - MiB, `the failed gc left the disk as it was: ${before} then ${after} bytes free`);
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img));
  await rm(filler);
  const report = await store.gc();
  assert.deepEqual([report.packsRewritten, report.blocksRemoved], [PACKS, PACKS * BLOCKS]);
  assert.deepEqual((await store.verify()).problems, []);
});

it('gc whose pack write fails (ENOSPC injected by strace): ERR_DISK_FULL, and the copy it had not synced is deleted at once, not left on the disk until the next open', async (t) => {
  if (skipWithoutStrace(t, 'it makes gc\'s pack writes fail')) return;
  const dir = await tempDir(t);
  const storeDir = join(dir, 'store');
  let store = await Store.open(storeDir);
  await halfDeadPacks(store, join(dir, 'img'));
  await store.close();
  const packDir = join(storeDir, 'packs');
  const ids = (await readdir(packDir)).map((f) => Number(f.slice(0, 8)));
  const next = join(packDir, `${String(Math.max(...ids) + 1).padStart(8, '0')}.pack`);
  // Every write into the first pack gc writes fails from the third on: some bytes are in it.
  const child = spawn('strace', ['-f', '-qq', '-o', '/dev/null', '-P', next, '-e', 'trace=write,writev,pwrite64,pwritev,pwritev2', '-e', 'inject=write,writev,pwrite64,pwritev,pwritev2:error=ENOSPC:when=3+',
    process.execPath, '--import', 'tsx', join('test', 'store', 'fixtures', 'gc-child.ts'), storeDir], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, UV_THREADPOOL_SIZE: '1' } });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  await waitExit(child);
  assert.match(out, /ERR_DISK_FULL/);
  assert.ok(!existsSync(next), `the unsynced copy ${next} is gone before any reopen`);
  store = await Store.open(storeDir);
  t.after(() => store.close());
  assert.deepEqual((await store.verify()).problems, []);
  assert.equal((await store.gc()).packsRewritten, PACKS);
});

/** A pack of `live` blocks a snapshot keeps and `dead` blocks of a deleted one (volumes `name` and `name`-dead); the next pair starts a pack of its own. */
async function packOf(store: Store, imgPath: string, name: string, live: number, dead: number): Promise<{ snap: SnapshotRecord; img: Buffer }> {
  const img = makeImage(live, BS);
  await writeImage(imgPath, img);
  const snap = await scanFile(store, imgPath, name, BS);
  await writeImage(imgPath, makeImage(dead, BS));
  const doomed = await scanFile(store, imgPath, `${name}-dead`, BS);
  await store.deleteSnapshot(doomed.volume, doomed.id);
  await rm(imgPath);
  await startNewPack(store);
  return { snap, img };
}

it('gc on a disk with room for some packs but not for the last: those that fit are rewritten and their old packs deleted, then ERR_DISK_FULL names the one left and the space it needs; the store verifies, every snapshot reads back, and a rerun with space finishes', async (t) => {
  const mnt = smallExt4(t, 160);
  if (!mnt) return;
  const storeDir = join(mnt, 'store');
  const packDir = join(storeDir, 'packs');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  // Three packs of 2 MiB live and 6 MiB dead (a quarter live: they go first), then one of 40 MiB
  // live and 8 MiB dead.
  const kept = [];
  for (const name of ['a', 'b', 'c']) kept.push(await packOf(store, join(mnt, 'img'), name, 32, 96));
  kept.push(await packOf(store, join(mnt, 'img'), 'big', 640, 128));
  const packs = (await readdir(packDir)).sort();
  assert.equal(packs.length, 4);
  const bigPack = Number(packs[3]!.slice(0, 8));
  const bigNeeds = 640 * recordLength(BS) + 8 * MiB; // its live records and the copy's slack (store/gc.ts COPY_SLACK_BYTES)

  // 12 MiB free: room to copy a small pack's 2 MiB, not the big one's 40 MiB even once the small
  // ones' 18 MiB of dead records are freed.
  const filler = join(mnt, 'filler');
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 12 * MiB), filler]);
  await assert.rejects(store.gc(), (e: Error & { code?: string; details?: { packs: number[]; needBytes: number; freeBytes: number; packsRewritten: number } }) => {
    assert.equal(e.code, 'ERR_DISK_FULL', e.message);
    assert.equal(e.details?.packsRewritten, 3, e.message);
    assert.deepEqual(e.details?.packs, [bigPack]);
    assert.equal(e.details?.needBytes, bigNeeds);
    assert.ok(e.details!.freeBytes < bigNeeds && e.details!.freeBytes > 12 * MiB, `free when gc came to it: ${e.details?.freeBytes}`);
    assert.match(e.message, new RegExp(`gc rewrote 3 packs but left 1 .* pack ${bigPack} needs ${(bigNeeds / MiB).toFixed(1)} MiB free .* free space on the store's disk or grow it, then run gc again`));
    return true;
  });
  const after = (await readdir(packDir)).sort();
  assert.deepEqual(after.filter((f) => packs.includes(f)), [packs[3]], 'the old small packs are gone, the big one is left as it was');
  assert.equal((await stat(join(packDir, packs[3]!))).size, 768 * recordLength(BS));
  assert.deepEqual((await Promise.all(after.filter((f) => !packs.includes(f)).map((f) => stat(join(packDir, f))))).map((s) => s.size), [3 * 32 * recordLength(BS)], 'one new pack holds the small packs\' live records');
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `${snap.volume} reads back`);

  await rm(filler);
  const report = await store.gc();
  assert.deepEqual([report.packsRewritten, report.blocksRemoved, report.blocksKept], [1, 128, 3 * 32 + 640]);
  assert.ok(!existsSync(join(packDir, packs[3]!)));
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `${snap.volume} reads back after the rerun`);
});

/** `n` packs of `blocks` live blocks each, nothing dead (volumes m0..); the last one stays open for appends. */
async function smallLivePacks(store: Store, imgPath: string, n: number, blocks: number): Promise<Array<{ snap: SnapshotRecord; img: Buffer }>> {
  const kept: Array<{ snap: SnapshotRecord; img: Buffer }> = [];
  for (let i = 0; i < n; i++) {
    if (i > 0) await startNewPack(store);
    const img = makeImage(blocks, BS);
    await writeImage(imgPath, img);
    kept.push({ snap: await scanFile(store, imgPath, `m${i}`, BS), img });
  }
  await rm(imgPath);
  return kept;
}

/** A home on a 160 MiB ext4 disk whose store has 4 small live packs (smallLivePacks); null where no such disk can be made. */
async function homeWithSmallPacks(t: Parameters<typeof smallExt4>[0]): Promise<{ mnt: string; home: string; kept: Array<{ snap: SnapshotRecord; img: Buffer }> } | null> {
  const mnt = smallExt4(t, 160);
  if (!mnt) return null;
  const home = join(mnt, 'home');
  assert.equal((await cli(['init', '--name', 'onprem', '--home', home])).code, 0);
  const store = await Store.open(join(home, 'store'));
  try {
    return { mnt, home, kept: await smallLivePacks(store, join(mnt, 'img'), 4, BLOCKS) };
  } finally {
    await store.close();
  }
}

it('gc that has no room to merge small packs merges nothing and says so in its report (packsNotMerged: each pack, the space it needs and what was free) without failing; it starts no new pack; with space, the next gc merges them', async (t) => {
  const mnt = smallExt4(t, 160);
  if (!mnt) return;
  const storeDir = join(mnt, 'store');
  const packDir = join(storeDir, 'packs');
  const store = await Store.open(storeDir);
  t.after(() => store.close());
  const kept = await smallLivePacks(store, join(mnt, 'img'), 4, BLOCKS);
  const packs = (await readdir(packDir)).sort();
  assert.equal(packs.length, 4);
  // 10 MiB free: copying a pack's 8 MiB of live records needs 16 MiB (COPY_SLACK_BYTES).
  const filler = join(mnt, 'filler');
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 10 * MiB), filler]);
  const report = await store.gc();
  assert.deepEqual([report.packsRewritten, report.blocksRemoved, report.bytesReclaimed], [0, 0, 0]);
  assert.deepEqual(report.packsNotMerged.map((p) => [p.pack, p.needBytes]), packs.map((f) => [Number(f.slice(0, 8)), BLOCKS * recordLength(BS) + 8 * MiB]));
  for (const p of report.packsNotMerged) assert.ok(p.freeBytes < p.needBytes && p.freeBytes > 8 * MiB, `free ${p.freeBytes}`);
  assert.deepEqual((await readdir(packDir)).sort(), packs, 'the packs are left as they are');
  // The next snapshot appends to the pack that was open: a gc that copied nothing starts none.
  const img = makeImage(16, BS);
  await writeImage(join(mnt, 'img'), img);
  kept.push({ snap: await scanFile(store, join(mnt, 'img'), 'after', BS), img });
  await rm(join(mnt, 'img'));
  assert.deepEqual((await readdir(packDir)).sort(), packs, 'no new pack');
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `${snap.volume} reads back`);

  await rm(filler);
  const merged = await store.gc();
  assert.deepEqual([merged.packsRewritten, merged.packsNotMerged], [4, []]);
  assert.deepEqual((await store.verify()).problems, []);
  for (const { snap, img } of kept) assert.ok((await readBack(store, snap, BS)).equals(img), `${snap.volume} reads back after the merge`);
});

it('`appliance gc` with no room to merge small packs exits 0 and tells the operator which pack needs how much space and what to do; --json carries packsNotMerged', async (t) => {
  const made = await homeWithSmallPacks(t);
  if (!made) return;
  const { mnt, home, kept } = made;
  const filler = join(mnt, 'filler');
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 10 * MiB), filler]);
  const text = await cli(['gc', '--home', home]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /rewrote 0 packs\nleft 4 small packs unmerged for lack of space \(nothing is lost\): pack \d+ needs 16\.0 MiB free to be copied and [\d.]+ MiB were free; free space on the store's disk or grow it, then run gc again to merge them/);
  const json = await cliJson(['gc', '--home', home]);
  assert.equal(json.code, 0, json.stderr);
  assert.equal(json.json.packsRewritten, 0);
  assert.equal(json.json.packsNotMerged.length, 4);
  assert.equal(json.json.packsNotMerged[0].needBytes, BLOCKS * recordLength(BS) + 8 * MiB);
  assert.equal((await cli(['verify', '--home', home])).code, 0);
  await rm(filler);
  const merged = await cliJson(['gc', '--home', home]);
  assert.deepEqual([merged.code, merged.json.packsRewritten, merged.json.packsNotMerged], [0, 4, []]);
  assert.doesNotMatch((await cli(['gc', '--home', home])).stdout, /unmerged/);
  const check = await Store.open(join(home, 'store'));
  try {
    for (const { snap, img } of kept) assert.ok((await readBack(check, snap, BS)).equals(img), `${snap.volume} reads back`);
  } finally {
    await check.close();
  }
});

it('`appliance retention` whose gc has no room to merge small packs exits 0 and says so as gc does; --json carries gc.packsNotMerged', async (t) => {
  const made = await homeWithSmallPacks(t);
  if (!made) return;
  const { mnt, home, kept } = made;
  // m3 snapshotted again, unchanged: a policy keeping the last one deletes the first, whose
  // blocks the second still holds, and runs gc.
  const store = await Store.open(join(home, 'store'));
  try {
    const img = join(mnt, 'img');
    await writeImage(img, kept[3]!.img);
    await scanFile(store, img, 'm3', BS);
    await rm(img);
  } finally {
    await store.close();
  }
  const cfg = join(home, 'config.yaml');
  await appendFile(cfg, 'policies:\n  p:\n    rpo: 1h\n    retention: { last: 1 }\nassign:\n  - match: "*"\n    policy: p\n');
  const filler = join(mnt, 'filler');
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 10 * MiB), filler]);
  const r = await cliJson(['retention', '--home', home]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.json.volumes.find((v: { volume: string }) => v.volume === 'm3').deleted, [kept[3]!.snap.id]);
  assert.equal(r.json.gc.packsRewritten, 0);
  assert.equal(r.json.gc.packsNotMerged.length, 4);
  // The text names it too (the next run deletes nothing, so it runs no gc: once more with one to delete).
  const again = join(mnt, 'img');
  await rm(filler);
  const s2 = await Store.open(join(home, 'store'));
  try {
    await writeImage(again, kept[2]!.img);
    await scanFile(s2, again, 'm2', BS);
    await rm(again);
  } finally {
    await s2.close();
  }
  execFileSync('fallocate', ['-l', String((await free(mnt)) - 10 * MiB), filler]);
  const text = await cli(['retention', '--home', home]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /\ngc: left 4 small packs unmerged for lack of space \(nothing is lost\): pack \d+ needs [\d.]+ MiB free to be copied and [\d.]+ MiB were free; free space on the store's disk or grow it, then run gc again to merge them/);
  assert.equal((await cli(['verify', '--home', home])).code, 0);
});
