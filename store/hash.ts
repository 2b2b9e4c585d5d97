/**
 * Block hashing: BLAKE3-256 of a block's bytes is its address in the store.
 *
 * The zero block (all zeros, of any length) is represented by {@link ZERO_HASH} instead of its
 * real BLAKE3 digest, so it is recognised without hashing, never stored and never sent.
 */
import type { Hash } from './types.js';

/** Path of the native BLAKE3 binding; hash workers load the same module by this name. */
export const BLAKE3_MODULE = '@napi-rs/blake-hash-linux-x64-gnu';

const native = require(BLAKE3_MODULE) as { blake3(data: Buffer): Buffer };

/** Resolved file of the native binding (hash workers are started from code, not a file). */
export const BLAKE3_MODULE_PATH: string = require.resolve(BLAKE3_MODULE);

/** Length of every hash in the store (block hashes and node hashes). */
export const HASH_LENGTH = 32;

/** Stands for an all-zero block of any length, and for a subtree of only zero blocks. */
export const ZERO_HASH: Hash = Buffer.alloc(HASH_LENGTH);

/** Largest block the store accepts: 16 MiB keeps one record well inside memory bounds. */
export const MAX_BLOCK_SIZE = 16 * 1024 * 1024;

/** A zero buffer compared against blocks: memcmp is much faster than a byte loop. */
const ZEROS = Buffer.alloc(1024 * 1024);

/** Plain BLAKE3-256 of `data` (32 bytes). Not zero-aware: see {@link hashBlock}. */
export function blake3(data: Buffer): Hash {
  return native.blake3(data);
}

/** True when every byte of `data` is zero. */
export function isZeroBlock(data: Buffer): boolean {
  for (let off = 0; off < data.length; off += ZEROS.length) {
    const end = Math.min(data.length, off + ZEROS.length);
    if (!data.subarray(off, end).equals(ZEROS.subarray(0, end - off))) return false;
  }
  return true;
}

/** The block's address: ZERO_HASH for an all-zero block, else BLAKE3-256 of its bytes. */
export function hashBlock(data: Buffer): Hash {
  return isZeroBlock(data) ? ZERO_HASH : native.blake3(data);
}

export function isZeroHash(h: Hash): boolean {
  return h.length === HASH_LENGTH && h.equals(ZERO_HASH);
}

/** Lowercase hex, as JSON and messages show hashes. */
export function toHex(h: Hash): string {
  return h.toString('hex');
}

const HEX_HASH = /^[0-9a-f]{64}$/;

/** Parse a lowercase hex hash; undefined when malformed. */
export function parseHex(s: unknown): Hash | undefined {
  return typeof s === 'string' && HEX_HASH.test(s) ? Buffer.from(s, 'hex') : undefined;
}

export function isHash(h: unknown): h is Hash {
  return Buffer.isBuffer(h) && h.length === HASH_LENGTH;
}
