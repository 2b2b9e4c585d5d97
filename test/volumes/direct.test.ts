/**
 * Direct writes of restore targets (appliance/volumes/direct.ts, through openVolumeWriter): the
 * file holds exactly what was written whatever the order, overlap with reads, block sizes and
 * alignment, and nothing staged is lost at sync or close.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { sameBytes } from '../helpers/files.js';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { openVolumeWriter } from '../../appliance/volumes/index.js';
import { openDirect } from '../../appliance/volumes/direct.js';
import { flushError } from '../../appliance/volumes/file.js';
import { tempDir } from '../store/helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('writes from several lanes at once, out of order, land where they belong', async (t) => {
  const path = join(await tempDir(t), 'img');
  const bs = 512 * KiB;
  const blocks = 64; // 32 MiB: 8 staging slots' worth, so slots are reused
  const size = blocks * bs + 1000; // and a short last block
  const data = randomBytes(size);
  const w = await openVolumeWriter(path, size);
  // Four lanes, each writing every fourth block, as materialize's lanes do (it runs two), with
  // a few blocks swapped so that some writes do not continue the slot being filled. The buffers
  // are reused (overwritten) as soon as each write resolves.
  const order = Array.from({ length: blocks + 1 }, (_, i) => i);
  [order[10], order[11]] = [order[11]!, order[10]!];
  [order[40], order[33]] = [order[33]!, order[40]!];
  await Promise.all(
    [0, 1, 2, 3].map(async (lane) => {
      const buf = Buffer.alloc(bs);
      for (let k = lane; k < order.length; k += 4) {
        const b = order[k]!;
        const len = Math.min(bs, size - b * bs);
        data.copy(buf, 0, b * bs, b * bs + len);
        await w.write(buf.subarray(0, len), b * bs);
        buf.fill(0xee); // the writer must have copied what it keeps
      }
    }),
  );
  await w.sync();
  await w.close();
  assert.ok(sameBytes(path, data));
});

test('a range written again, a read of staged data, zero() and 16 MiB blocks: the file holds the last data written', async (t) => {
  const path = join(await tempDir(t), 'img');
  const size = 40 * MiB;
  const expect = Buffer.alloc(size);
  const w = await openVolumeWriter(path, size);
  const big = randomBytes(16 * MiB); // a 16 MiB block spans staging slots
  await w.write(big, 8 * MiB);
  big.copy(expect, 8 * MiB);
  const small = randomBytes(4 * KiB);
  await w.write(small, 0);
  small.copy(expect, 0);
  await w.zero(12 * MiB, 1 * MiB); // inside the big block, still on its way to the disk
  expect.fill(0, 12 * MiB, 13 * MiB);
  const back = Buffer.alloc(64 * KiB);
  assert.equal(await w.read(back, 8 * MiB + 4 * KiB), back.length);
  assert.ok(back.equals(big.subarray(4 * KiB, 68 * KiB)), 'a read of staged data waits for it');
  const odd = randomBytes(3000); // not a multiple of 4 KiB: through the page cache
  await w.write(odd, 30 * MiB + 512);
  odd.copy(expect, 30 * MiB + 512);
  await w.close(); // no sync: close still puts everything staged on the disk
  assert.ok(sameBytes(path, expect));
});

test('direct writes leave unaligned pieces to the caller and refuse none of an aligned one', async (t) => {
  const path = join(await tempDir(t), 'img');
  const w = await openVolumeWriter(path, 1 * MiB); // creates the file
  await w.close();
  const d = await openDirect(path);
  assert.ok(d, 'this filesystem takes direct writes (the rest of this test needs it)');
  t.after(() => d.close().catch(() => undefined));
  assert.equal(await d.write(randomBytes(4 * KiB), 0), 4 * KiB, 'the first write goes to the disk at once: it tells whether direct writes work here');
  assert.ok(!d.overlaps(0, 4 * KiB));
  assert.equal(await d.write(randomBytes(10 * KiB), 4 * KiB), 8 * KiB, 'the aligned part only');
  assert.equal(await d.write(randomBytes(8 * KiB), 1000), 0, 'an unaligned position: none');
  assert.ok(d.overlaps(6 * KiB, 1), 'the staged range is known');
  assert.ok(!d.overlaps(12 * KiB, 4 * KiB));
  await d.settle();
  assert.ok(!d.overlaps(6 * KiB, 1), 'settled: nothing staged');
});

test("a flush's EIO after direct writes names both causes (the disk, or a program writing the image: Linux reports that collision as EIO); without direct writes, the disk", () => {
  const eio = Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO', errno: -5, syscall: 'fsync' });
  const direct = flushError(eio, '/srv/disk.img', true);
  assert.equal(direct.code, 'ERR_IO');
  assert.match(direct.message, /^flushing \/srv\/disk\.img: EIO: the disk failed a write, or a program wrote the image while it was being written .*Page cache invalidation failure on direct I\/O.*Stop anything that uses it and check `dmesg`, then rerun/);
  const buffered = flushError(eio, '/srv/disk.img', false);
  assert.equal(buffered.code, 'ERR_IO');
  assert.equal(buffered.message, 'flushing /srv/disk.img: EIO: i/o error, fsync: the disk reported an error; check it (`dmesg`), then rerun');
  const full = flushError(Object.assign(new Error('ENOSPC: no space left on device, fsync'), { code: 'ENOSPC' }), '/srv/disk.img', true);
  assert.equal(full.code, 'ERR_DISK_FULL', 'only EIO has the second meaning');
});
