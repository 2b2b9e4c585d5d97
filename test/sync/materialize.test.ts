/**
 * materialize (sync/materialize.ts) onto a target that exists: it reads and hashes the target
 * and writes only the blocks that differ. A local file is read by the hash workers themselves,
 * any other writer through its read(); both must find the same blocks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { sameBytes } from '../helpers/files.js';
import { join } from 'node:path';
import { openVolumeWriter } from '../../appliance/volumes/index.js';
import { materialize } from '../../sync/materialize.js';
import type { VolumeWriter } from '../../store/index.js';
import { fileReader, makeImage, storeWithImage } from '../store/helpers.js';

/** A target held in memory: no path, so materialize reads it through read(). */
function memoryWriter(data: Buffer): VolumeWriter & { data: Buffer } {
  return {
    data,
    size: data.length,
    async read(buf, position) {
      return data.copy(buf, 0, position, Math.min(data.length, position + buf.length));
    },
    async write(buf, position) {
      buf.copy(data, position);
    },
    async zero(position, length) {
      data.fill(0, position, position + length);
    },
    async sync() {},
    async close() {},
  };
}

for (const bs of [64 * 1024, 2 * 1024 * 1024]) {
  // 30 blocks and a short tail: one chunk of 64 KiB blocks (a chunk is 8 MiB), 8 chunks of 2 MiB
  // blocks (more than the pool's 6 slots: slots are read into again).
  test(`onto an existing target (blocks of ${bs / 1024} KiB), read by the hash workers (a file) or through read() (any writer): the same blocks differ, and only those are written`, async (t) => {
    const img = makeImage(30, bs, { zeroEvery: 7, tail: 1000 }); // blocks 0, 7, 14, 21, 28 zero
    const { dir, path, store } = await storeWithImage(t, img);
    const reader = await fileReader(path);
    const snap = await store.scanVolume(reader, { volume: 'vol', blockSize: bs }).finally(() => reader.close());

    // The target differs in data blocks of different chunks, in a block that must be zero again,
    // in a zero block that must get data, and in the short last block.
    const target = Buffer.from(img);
    for (const i of [3, 12, 25]) randomBytes(100).copy(target, i * bs + 11);
    randomBytes(10).copy(target, 14 * bs + 5); // block 14 is zero in the snapshot
    target.fill(0, 22 * bs, 23 * bs); // block 22 has data in the snapshot
    randomBytes(10).copy(target, 30 * bs + 990);

    const onFile = join(dir, 'target.img');
    writeFileSync(onFile, target);
    const fileWriter = await openVolumeWriter(onFile, img.length);
    const viaWorkers = await materialize(store, snap, fileWriter).finally(() => fileWriter.close());
    assert.ok(sameBytes(onFile, img), 'the file is the snapshot again');

    const mem = memoryWriter(Buffer.from(target));
    const viaRead = await materialize(store, snap, mem);
    assert.ok(mem.data.equals(img), 'the memory target is the snapshot again');

    for (const r of [viaWorkers, viaRead]) {
      assert.equal(r.blocksCompared, 31);
      assert.equal(r.blocksWritten, 5, 'blocks 3, 12, 22, 25 and the short last one');
      assert.equal(r.blocksZeroed, 1, 'block 14');
    }
    // Nothing differs any more: nothing is written.
    const again = await openVolumeWriter(onFile, img.length);
    const none = await materialize(store, snap, again).finally(() => again.close());
    assert.equal(none.blocksWritten + none.blocksZeroed, 0);
    assert.equal(none.blocksCompared, 31);
  });
}
