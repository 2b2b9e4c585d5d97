/**
 * The tests' file helpers (test/helpers/files.ts). The byte comparison, which the restore,
 * failback and repair tests rely on to tell a byte-exact image from one that is not, must find
 * every difference, wherever it lies in its 8 MiB pieces, and any extra or missing byte; the
 * random images must be new bytes of the size asked.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { tempDir } from '../helpers/cli.js';

const PIECE = 8 * 1024 * 1024;

test('sameBytes finds a differing byte anywhere, a longer or shorter file, against bytes or another file', (t) => {
  const dir = tempDir(t, 'tandem-same-');
  for (const size of [0, 1, 4096, PIECE - 1, PIECE, PIECE + 1, 2 * PIECE + 12345]) {
    const data = randomBytes(size);
    const path = join(dir, `img-${size}`);
    writeFileSync(path, data);
    assert.ok(sameBytes(path, data), `${size}: equal`);
    assert.ok(sameBytes(path, path), `${size}: equal to itself`);
    assert.ok(!sameBytes(path, Buffer.concat([data, Buffer.alloc(1)])), `${size}: one byte short`);
    if (size === 0) continue;
    assert.ok(!sameBytes(path, data.subarray(0, size - 1)), `${size}: one byte more`);
    for (const at of [0, Math.floor(size / 2), PIECE - 1, PIECE, size - 1]) {
      if (at >= size) continue;
      const other = Buffer.from(data);
      other[at] ^= 1;
      assert.ok(!sameBytes(path, other), `${size}: byte ${at} differs`);
      const otherPath = join(dir, `other-${size}-${at}`);
      writeFileSync(otherPath, other);
      assert.ok(!sameBytes(path, otherPath), `${size}: byte ${at} differs from the other file`);
    }
  }
});

test('writeRandom writes exactly the size asked, new bytes each time, over a longer file too', (t) => {
  const dir = tempDir(t, 'tandem-random-');
  const path = join(dir, 'img');
  writeFileSync(path, Buffer.alloc(3 * PIECE, 7));
  for (const size of [0, 5, PIECE, 2 * PIECE + 3]) {
    const before = readFileSync(path);
    writeRandom(path, size);
    const data = readFileSync(path);
    assert.equal(data.length, size);
    if (size >= PIECE) {
      assert.ok(!data.subarray(0, PIECE).equals(data.subarray(PIECE, 2 * PIECE)), 'each piece is new');
      assert.ok(!data.equals(before.subarray(0, size)), 'and differs from the last write');
      assert.ok(!data.subarray(0, 4096).equals(Buffer.alloc(4096, 7)), 'no old bytes remain');
    }
  }
});
