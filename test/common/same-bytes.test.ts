/**
 * The tests' byte comparison of files (test/helpers/files.ts), which the restore, failback and
 * repair tests rely on to tell a byte-exact image from one that is not: it must find every
 * difference, wherever it lies in its 8 MiB pieces, and any extra or missing byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { sameBytes } from '../helpers/files.js';
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
