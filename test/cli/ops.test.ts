/** Library-level operations (appliance/ops.ts) against a real store in a real home. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Home } from '../../appliance/home.js';
import { addVolume, restoreVolume, snapshotVolume, removeVolume } from '../../appliance/ops.js';
import { tempDir } from '../helpers/cli.js';

const BS = 64 * 1024;

test('a restore onto the volume itself marks it materializing until a restore completes; snapshots are refused meanwhile', async (t) => {
  const dir = tempDir(t);
  const home = await Home.init(join(dir, 'home'), 'ops');
  const store = await home.openStore();
  t.after(() => store.close());
  const img = join(dir, 'vol.img');
  const v1 = randomBytes(40 * BS);
  writeFileSync(img, v1);
  await addVolume(store, { name: 'vol', path: img, blockSize: BS });
  const s1 = await snapshotVolume(home, store, 'vol');
  // The volume changes after the snapshot; restoring it onto itself goes back to s1.
  const fd = openSync(img, 'r+');
  for (const i of [0, 17, 39]) writeSync(fd, randomBytes(100), 0, 100, i * BS + 5);
  closeSync(fd);

  const abort = new AbortController();
  await assert.rejects(
    restoreVolume(home, store, `vol@${s1.id}`, img, { signal: abort.signal, onProgress: () => abort.abort(new Error('operator pressed ^C')) }),
    /operator pressed/,
  );
  assert.equal((await store.getVolume('vol'))?.materializing?.snapshot, s1.id, 'the interrupted restore leaves the mark');
  await assert.rejects(snapshotVolume(home, store, 'vol'), (e: any) => e.code === 'ERR_VOLUME_MATERIALIZING' && /rerun/.test(e.message));

  const r = await restoreVolume(home, store, `vol@${s1.id}`, img);
  assert.equal(r.created, false);
  assert.equal(r.blocksCompared, 40);
  assert.ok(r.blocksWritten <= 3);
  assert.ok(sameBytes(img, v1));
  assert.equal((await store.getVolume('vol'))?.materializing, undefined, 'a completed restore clears the mark');
  const s2 = await snapshotVolume(home, store, 'vol');
  assert.equal(s2.root, s1.root, 'the volume is byte-for-byte the snapshot again');

  // The volume lock is held for the duration: a concurrent snapshot in this process is refused.
  const release = home.lockVolume('vol', 'restore');
  try {
    await assert.rejects(snapshotVolume(home, store, 'vol'), (e: any) => e.code === 'ERR_VOLUME_LOCKED');
    await assert.rejects(removeVolume(home, store, 'vol'), (e: any) => e.code === 'ERR_VOLUME_LOCKED');
  } finally {
    release();
  }
});

test('a volume that changed size is scanned in full and its new size recorded', async (t) => {
  const dir = tempDir(t);
  const home = await Home.init(join(dir, 'home'), 'ops');
  const store = await home.openStore();
  t.after(() => store.close());
  const img = join(dir, 'vol.img');
  writeRandom(img, 10 * BS);
  await addVolume(store, { name: 'vol', path: img, blockSize: BS });
  const s1 = await snapshotVolume(home, store, 'vol');
  const grown = Buffer.concat([readFileSync(img), randomBytes(3 * BS + 7)]);
  writeFileSync(img, grown);
  const notices: string[] = [];
  const cb = join(dir, 'cb.txt');
  writeFileSync(cb, '11\n');
  const s2 = await snapshotVolume(home, store, 'vol', { changedBlocksFile: cb, onNotice: (m) => notices.push(m) });
  assert.equal(s2.size, grown.length);
  assert.equal(s2.origin, 'scan');
  assert.equal(s2.parent, null);
  assert.match(notices.join('\n'), /changed size/);
  assert.equal((await store.getVolume('vol'))?.size, grown.length);
  assert.notEqual(s1.root, s2.root);
  const out = join(dir, 'out.img');
  await restoreVolume(home, store, 'vol', out);
  assert.ok(sameBytes(out, grown));
});
