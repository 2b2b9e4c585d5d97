/**
 * The tests' images: compared byte for byte ({@link sameBytes}) and written with random bytes
 * ({@link writeRandom}) through two 8 MiB buffers reused by every call. A fresh buffer the size of
 * the image costs more than the work: `readFileSync(path).equals(want)` of a 128 MiB image took
 * ~0.7 s of CPU, nearly all of it the kernel faulting in the buffer's pages, against ~0.07 s.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';

const PIECE = 8 * 1024 * 1024;
let buffers: [Buffer, Buffer] | null = null;

/** Read from `position` until `buf` is full or the file ends; the bytes read. */
export function readFull(fd: number, buf: Buffer, position: number): number {
  let done = 0;
  while (done < buf.length) {
    const n = readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/**
 * Whether the file (an image or a block device) at `path` holds exactly `want`: those bytes, or
 * the bytes of the file at that path, and nothing more.
 */
export function sameBytes(path: string, want: Buffer | string): boolean {
  const [mine, theirs] = (buffers ??= [Buffer.allocUnsafe(PIECE), Buffer.allocUnsafe(PIECE)]);
  const fd = openSync(path, 'r');
  let other: number | null = null;
  try {
    if (typeof want === 'string') other = openSync(want, 'r');
    for (let position = 0; ; position += PIECE) {
      const n = readFull(fd, mine, position);
      const expected = other === null ? (want as Buffer).subarray(position, position + PIECE) : theirs.subarray(0, readFull(other, theirs, position));
      if (n !== expected.length || !mine.subarray(0, n).equals(expected)) return false;
      if (n < PIECE) return true;
    }
  } finally {
    closeSync(fd);
    if (other !== null) closeSync(other);
  }
}

/**
 * Write `size` random bytes to `path` (created or truncated), 8 MiB at a time through a reused
 * buffer: `writeFileSync(path, randomBytes(size))` of 96 MiB took ~0.3-0.6 s, most of it faulting
 * in the fresh buffer, against ~0.05 s to fill a buffer already in memory.
 */
export function writeRandom(path: string, size: number): void {
  const [piece] = (buffers ??= [Buffer.allocUnsafe(PIECE), Buffer.allocUnsafe(PIECE)]);
  const fd = openSync(path, 'w');
  try {
    for (let position = 0; position < size; ) {
      const n = Math.min(PIECE, size - position);
      randomFillSync(piece, 0, n);
      position += writeSync(fd, piece, 0, n, position);
    }
  } finally {
    closeSync(fd);
  }
}
