/**
 * materialize (sync/materialize.ts) onto a target that exists: it reads and hashes the target
 * and writes only the blocks that differ. A local file is read by the hash workers themselves,
 * any other writer through its read(); both must find the same blocks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openVolumeWriter } from '../../appliance/volumes/index.js';
import { materialize } from '../../sync/materialize.js';
import type { VolumeWriter } from '../../store/index.js';
import { fileReader, makeImage, storeWithImage } from '../store/helpers.js';

const BS = 64 * 1024;

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

test('onto an existing target, read by the hash workers (a file) or through read() (any writer): the same blocks differ, and only those are written', async (t) => {
  // 40 blocks and a short tail: three chunks of 16 blocks; every 7th block zero.
  const img = makeImage(40, BS, { zeroEvery: 7, tail: 1000 });
  const { dir, path, store } = await storeWithImage(t, img);
  const reader = await fileReader(path);
  const snap = await store.scanVolume(reader, { volume: 'vol', blockSize: BS }).finally(() => reader.close());

  // The target differs in a data block of each chunk, in a block that must be zero again, in a
  // zero block that must get data, and in the short last block.
  const target = Buffer.from(img);
  for (const i of [3, 20, 37]) randomBytes(100).copy(target, i * BS + 11);
  randomBytes(10).copy(target, 14 * BS + 5); // block 14 is zero in the snapshot
  target.fill(0, 22 * BS, 23 * BS); // block 22 has data in the snapshot
  randomBytes(10).copy(target, 40 * BS + 990);

  const onFile = join(dir, 'target.img');
  writeFileSync(onFile, target);
  const fileWriter = await openVolumeWriter(onFile, img.length);
  const viaWorkers = await materialize(store, snap, fileWriter).finally(() => fileWriter.close());
  assert.ok(readFileSync(onFile).equals(img), 'the file is the snapshot again');

  const mem = memoryWriter(Buffer.from(target));
  const viaRead = await materialize(store, snap, mem);
  assert.ok(mem.data.equals(img), 'the memory target is the snapshot again');

  for (const r of [viaWorkers, viaRead]) {
    assert.equal(r.blocksCompared, 41);
    assert.equal(r.blocksWritten, 5, 'blocks 3, 20, 22, 37 and the short last one');
    assert.equal(r.blocksZeroed, 1, 'block 14');
  }
  // Nothing differs any more: nothing is written.
  const again = await openVolumeWriter(onFile, img.length);
  const none = await materialize(store, snap, again).finally(() => again.close());
  assert.equal(none.blocksWritten + none.blocksZeroed, 0);
  assert.equal(none.blocksCompared, 41);
});
