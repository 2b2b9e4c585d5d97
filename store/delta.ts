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

/**
 * Apply the patches of a delta frame (its payload after the base hash: the `data` decodeFrames
 * yields) to `block`, a copy of the base (changed in place). Throws ERR_BLOCK_CORRUPT for patches out of order,
 * overlapping, outside the block, or a payload of another length than they describe.
 */
export function applyPatches(block: Buffer, patches: Buffer, hash: Hash): Buffer {
  const bad = (why: string) =>
    new TandemError('ERR_BLOCK_CORRUPT', `the delta of block ${hash.toString('hex')} is malformed (${why}); nothing was committed, rerun the sync`, { details: { hash: hash.toString('hex') } });
  if (patches.length < 4) throw bad('no patch count');
  const n = patches.readUInt32BE(0);
  let at = 4;
  let end = 0;
  for (let i = 0; i < n; i++) {
    if (at + DELTA_PATCH_HEADER > patches.length) throw bad(`patch ${i} of ${n} is cut short`);
    const off = patches.readUInt32BE(at);
    const len = patches.readUInt32BE(at + 4);
    at += DELTA_PATCH_HEADER;
    if (len === 0 || off < end || off + len > block.length) throw bad(`patch ${i} at ${off}+${len} is out of order or outside the ${block.length}-byte block`);
    if (at + len > patches.length) throw bad(`patch ${i} is cut short`);
    patches.copy(block, off, at, at + len);
    at += len;
    end = off + len;
  }
  if (at !== patches.length) throw bad(`${patches.length - at} bytes after the last patch`);
  return block;
}
