import { test } from 'node:test';
import assert from 'node:assert/strict';
import { verifyStore } from '../../store/verify.js';
import { makeImage, readBack, scanFile, storeWithImage } from './helpers.js';

// A running server reopens its index after a write the disk failed (Store.reopenIndex; the
// process-level test with an injected EIO is in test/sync/faults.test.ts). Here: reads under way
// when the reopen starts, and reads that start during it, all get their answers.
test('reads under way and reads started while the index is reopened all get their answers', async (t) => {
  const BS = 4096;
  const img = makeImage(256, BS);
  const { path, store } = await storeWithImage(t, img);
  const snap = await scanFile(store, path, 'vol', BS);
  for (let i = 0; i < 400; i++) await store.putMeta('notes', `k${String(i).padStart(4, '0')}`, { i, pad: 'x'.repeat(200) }, { sync: false });
  const want = await store.listMeta<{ i: number }>('notes');
  assert.equal(want.length, 400);

  for (let round = 0; round < 5; round++) {
    // The state a failed index write leaves (Store.indexWrite sets it on LEVEL_IO_ERROR).
    store.indexFailure = { at: new Date().toISOString(), message: 'an injected failure' };
    const reads: Array<Promise<unknown>> = [];
    const readAll = (): void => {
      reads.push(store.listMeta('notes').then((got) => assert.deepEqual(got, want)));
      reads.push(store.listSnapshots('vol').then((got) => assert.deepEqual(got.map((s) => s.id), [snap.id])));
      reads.push(store.latestSnapshot('vol').then((got) => assert.equal(got?.id, snap.id)));
      reads.push(store.getMeta<{ i: number }>('notes', 'k0007').then((got) => assert.equal(got?.i, 7)));
      reads.push(store.getVolume('vol').then((got) => assert.equal(got?.name, 'vol')));
      reads.push(store.getSnapshot('vol', snap.id).then((got) => assert.equal(got?.root, snap.root)));
      reads.push(readBack(store, snap, BS).then((got) => assert.ok(got.equals(img), 'the snapshot reads back byte-exact')));
    };
    readAll(); // under way when the reopen starts
    const reopened = store.reopenIndex();
    readAll(); // started while it runs
    await new Promise((r) => setImmediate(r));
    readAll();
    assert.equal(await reopened, true, 'the index reopened');
    const results = await Promise.allSettled(reads);
    const failed = results.filter((r) => r.status === 'rejected').map((r) => String((r as PromiseRejectedResult).reason));
    assert.deepEqual(failed, [], `round ${round}: every read got its answer`);
    assert.equal(store.indexFailure, null);
  }
  const report = await verifyStore(store);
  assert.deepEqual(report.problems, []);
  assert.equal(report.snapshots, 1);
});
