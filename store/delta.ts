/**
 * Blocks as deltas: the byte ranges where a block differs from another block (its base). A sync
 * sends a changed block this way when the receiver holds the block it replaced (sync/README.md,
 * "Framing", codec 2): a 4 KiB write into a 512 KiB block then travels as ~4.5 KiB.
 *
 * Patches (`diffBlock`'s payload after the 32-byte base hash, `applyPatches`' input): a u32 BE
 * count, then per patch `offset u32 BE, length u32 BE, bytes`, offsets increasing, patches not
 * overlapping and inside the block. The base has the block's length.
 */
import { TandemError } from '../common/errors.js';
import type { Hash } from './types.js';

/** Blocks are compared with their base in units of this many bytes (a 4 KiB write at any offset costs at most 4.5 KiB). */
const DELTA_UNIT = 512;
/** Regions of this many bytes are compared whole first: most of a block equals its base. */
const DELTA_REGION = 64 * 1024;
/** A delta is sent only when it is at most this fraction of the block (else the block goes whole: no base read on the receiver). */
const MAX_DELTA_DIVISOR = 2;
const DELTA_PATCH_HEADER = 8;
/**
 * A block that arrives as a delta is stored as one when its payload is at most this fraction of
 * the block: reading it then costs its base's record as well (store/README.md, "Delta records").
 */
export const STORED_DELTA_DIVISOR = 4;

/**
 * The delta payload of `data` against `base` (same length), or null when the two differ in more
 * than 1/{@link MAX_DELTA_DIVISOR} of the block (send it whole). Costs a memcmp of the block.
 */
export function diffBlock(data: Buffer, baseHash: Hash, base: Buffer): Buffer | null {
  if (base.length !== data.length || data.length === 0) return null;
  const limit = Math.floor(data.length / MAX_DELTA_DIVISOR);
  const runs: Array<[number, number]> = [];
  let bytes = 32 + 4;
  const addUnit = (start: number, end: number) => {
    const last = runs[runs.length - 1];
    if (last && last[1] === start) last[1] = end;
    else {
      runs.push([start, end]);
      bytes += DELTA_PATCH_HEADER;
    }
    bytes += end - start;
  };
  for (let r = 0; r < data.length; r += DELTA_REGION) {
    const rEnd = Math.min(data.length, r + DELTA_REGION);
    if (data.compare(base, r, rEnd, r, rEnd) === 0) continue;
    for (let u = r; u < rEnd; u += DELTA_UNIT) {
      const uEnd = Math.min(rEnd, u + DELTA_UNIT);
      if (data.compare(base, u, uEnd, u, uEnd) !== 0) addUnit(u, uEnd);
    }
    if (bytes > limit) return null;
  }
  const out = Buffer.allocUnsafe(bytes);
  baseHash.copy(out, 0);
  out.writeUInt32BE(runs.length, 32);
  let at = 36;
  for (const [start, end] of runs) {
    out.writeUInt32BE(start, at);
    out.writeUInt32BE(end - start, at + 4);
    data.copy(out, at + DELTA_PATCH_HEADER, start, end);
    at += DELTA_PATCH_HEADER + end - start;
  }
  return out;
}

/** Units {@link mayBeSparse} looks at, one in each of as many stretches of the block. */
const SPARSE_SAMPLES = 32;
/** Steps each sample's place within its stretch (coprime with SPARSE_SAMPLES: every place once). */
const SPARSE_SKEW = 13;
const ZERO_UNIT = Buffer.alloc(DELTA_UNIT);

/**
 * Whether `data` may be zeros except for at most 1/`divisor` of it, so that a diff against zeros
 * could give a delta of that size (2: one sent, {@link diffBlock}; 4: one stored). Judged from
 * {@link SPARSE_SAMPLES} units spread over it, at least 7/8 of the share of zero units such a
 * block has must be zero: in two ext4 images, every block a diff stored sparse had at least 22
 * zero samples of 32, and 21 are asked for. A diff against zeros of a block that is data
 * throughout compares half of it before giving up (~70 us for 512 KiB); this answers in 1.5-3
 * us, so a first snapshot, and a store receiving blocks, ask it of every block. Only a choice of
 * encoding: a block it lets through still goes whole when the diff says so.
 */
export function mayBeSparse(data: Buffer, divisor = MAX_DELTA_DIVISOR): boolean {
  const units = Math.floor(data.length / DELTA_UNIT);
  if (units < SPARSE_SAMPLES) return true; // a small block: the diff costs little
  const need = Math.floor((SPARSE_SAMPLES * (divisor - 1) * 7) / (divisor * 8));
  const stretch = units / SPARSE_SAMPLES;
  let zero = 0;
  for (let k = 0; k < SPARSE_SAMPLES; k++) {
    // Each sample sits at another place within its stretch: data mostly starts on a page and
    // leaves the page's tail zero, which samples at the stretches' starts alone would miss.
    const u = Math.floor(k * stretch + (((k * SPARSE_SKEW) % SPARSE_SAMPLES) * stretch) / SPARSE_SAMPLES) * DELTA_UNIT;
    if (data.compare(ZERO_UNIT, 0, DELTA_UNIT, u, u + DELTA_UNIT) === 0) zero++;
    else if (k + 1 - zero > SPARSE_SAMPLES - need) return false;
  }
  return zero >= need;
}

/** One patch: bytes to put at `offset` (a view into the patches' buffer). */
export interface Patch {
  readonly offset: number;
  readonly bytes: Buffer;
}

/**
 * The patches of a delta (its payload after the base hash) for a block of `blockLength` bytes.
 * Throws ERR_BLOCK_CORRUPT for patches out of order, overlapping, outside the block, or a payload
 * of another length than they describe.
 */
export function parsePatches(patches: Buffer, blockLength: number, hash: Hash): Patch[] {
  const bad = (why: string) =>
    new TandemError('ERR_BLOCK_CORRUPT', `the delta of block ${hash.toString('hex')} is malformed (${why}); nothing was committed, rerun the sync`, { details: { hash: hash.toString('hex') } });
  if (patches.length < 4) throw bad('no patch count');
  const n = patches.readUInt32BE(0);
  const out: Patch[] = [];
  let at = 4;
  let end = 0;
  for (let i = 0; i < n; i++) {
    if (at + DELTA_PATCH_HEADER > patches.length) throw bad(`patch ${i} of ${n} is cut short`);
    const off = patches.readUInt32BE(at);
    const len = patches.readUInt32BE(at + 4);
    at += DELTA_PATCH_HEADER;
    if (len === 0 || off < end || off + len > blockLength) throw bad(`patch ${i} at ${off}+${len} is out of order or outside the ${blockLength}-byte block`);
    if (at + len > patches.length) throw bad(`patch ${i} is cut short`);
    out.push({ offset: off, bytes: patches.subarray(at, at + len) });
    at += len;
    end = off + len;
  }
  if (at !== patches.length) throw bad(`${patches.length - at} bytes after the last patch`);
  return out;
}

/**
 * Apply the patches of a delta frame (its payload after the base hash: the `data` decodeFrames
 * yields) to `block`, a copy of the base (changed in place). Throws ERR_BLOCK_CORRUPT as
 * {@link parsePatches}, before changing anything.
 */
export function applyPatches(block: Buffer, patches: Buffer, hash: Hash): Buffer {
  for (const p of parsePatches(patches, block.length, hash)) p.bytes.copy(block, p.offset);
  return block;
}

/**
 * One delta payload (base hash, then patches) that does what `first` and then `second` do:
 * the base of `first` patched by `first` is the base `second` patches. Where both write, `second`'s
 * bytes win; adjacent ranges become one patch. So a block stored as a delta of a delta is stored
 * as a delta of the first base instead (store/README.md, "Delta records"). Both are checked for a
 * block of `blockLength` bytes (ERR_BLOCK_CORRUPT).
 */
export function composeDeltas(firstBase: Hash, first: Buffer, second: Buffer, blockLength: number, hash: Hash): Buffer {
  const a = parsePatches(first, blockLength, hash);
  const b = parsePatches(second, blockLength, hash);
  const pieces: Patch[] = [];
  let j = 0;
  for (const p of a) {
    // The parts of p that no patch of `second` covers.
    let start = p.offset;
    const end = p.offset + p.bytes.length;
    while (j < b.length && b[j]!.offset + b[j]!.bytes.length <= start) j++;
    for (let k = j; k < b.length && b[k]!.offset < end && start < end; k++) {
      const q = b[k]!;
      if (q.offset > start) pieces.push({ offset: start, bytes: p.bytes.subarray(start - p.offset, q.offset - p.offset) });
      start = Math.max(start, q.offset + q.bytes.length);
    }
    if (start < end) pieces.push({ offset: start, bytes: p.bytes.subarray(start - p.offset) });
  }
  pieces.push(...b);
  pieces.sort((x, y) => x.offset - y.offset);
  const runs: Patch[][] = [];
  for (const p of pieces) {
    const last = runs[runs.length - 1];
    const tail = last?.[last.length - 1];
    if (tail && tail.offset + tail.bytes.length === p.offset) last!.push(p);
    else runs.push([p]);
  }
  let bytes = 32 + 4;
  for (const r of runs) bytes += DELTA_PATCH_HEADER + r.reduce((n, p) => n + p.bytes.length, 0);
  const out = Buffer.allocUnsafe(bytes);
  firstBase.copy(out, 0);
  out.writeUInt32BE(runs.length, 32);
  let at = 36;
  for (const r of runs) {
    out.writeUInt32BE(r[0]!.offset, at);
    out.writeUInt32BE(r.reduce((n, p) => n + p.bytes.length, 0), at + 4);
    at += DELTA_PATCH_HEADER;
    for (const p of r) at += p.bytes.copy(out, at);
  }
  return out;
}
