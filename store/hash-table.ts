/**
 * A bounded table of hashes (blocks or tree nodes), each with a 32-bit value, in flat typed
 * arrays: 16 bytes of key a slot (the hash's first 16 bytes), plus 4 of value when asked for,
 * where a Set or Map of hash strings takes ~100 bytes an entry. Open addressing with linear
 * probing; hashes are uniform, so their first word indexes the table.
 *
 * It is a cache: when it holds `maxEntries` and one more is added, it forgets everything and
 * starts again (callers then redo work they had remembered, never get a wrong answer). Two
 * hashes sharing their first 16 bytes are one entry (one chance in 2^128 for a pair).
 */
import type { Hash } from './types.js';

const WORDS = 4;
/** Grow (or forget) past this share of the slots in use. */
const MAX_LOAD = 0.75;

export class HashTable {
  private keys: Uint32Array;
  private values: Uint32Array | null;
  private mask: number;
  private n = 0;
  private readonly maxSlots: number;

  /**
   * @param maxEntries entries held at most (rounded so the slots are a power of two)
   * @param withValues keep a 32-bit value per entry ({@link get} returns it)
   */
  constructor(maxEntries: number, private readonly withValues = false) {
    let slots = 1 << 10;
    while (slots * MAX_LOAD < maxEntries) slots *= 2;
    this.maxSlots = slots;
    const first = Math.min(slots, 1 << 12);
    this.keys = new Uint32Array(first * WORDS);
    this.values = withValues ? new Uint32Array(first) : null;
    this.mask = first - 1;
  }

  get size(): number {
    return this.n;
  }

  /** The entry's value (0 in a table without values), or undefined when `h` is not in it. */
  get(h: Hash): number | undefined {
    const i = this.find(h);
    return i < 0 ? undefined : (this.values?.[i] ?? 0);
  }

  has(h: Hash): boolean {
    return this.find(h) >= 0;
  }

  set(h: Hash, value = 0): void {
    let i = this.find(h);
    if (i < 0) {
      if (this.n + 1 > (this.mask + 1) * MAX_LOAD) {
        if (this.mask + 1 < this.maxSlots) this.resize((this.mask + 1) * 2);
        else this.resize(this.mask + 1); // full: forget everything
      }
      i = this.insert(h);
    }
    if (this.values) this.values[i] = value;
  }

  /** The slot holding `h`, or -1. */
  private find(h: Hash): number {
    const [a, b, c, d] = words(h);
    const k = this.keys;
    for (let i = a & this.mask; ; i = (i + 1) & this.mask) {
      const o = i * WORDS;
      if (k[o] === a && k[o + 1] === b && k[o + 2] === c && k[o + 3] === d) return i;
      if (k[o] === 0 && k[o + 1] === 0 && k[o + 2] === 0 && k[o + 3] === 0) return -1;
    }
  }

  private insert(h: Hash): number {
    const [a, b, c, d] = words(h);
    const k = this.keys;
    let i = a & this.mask;
    while (k[i * WORDS] !== 0 || k[i * WORDS + 1] !== 0 || k[i * WORDS + 2] !== 0 || k[i * WORDS + 3] !== 0) i = (i + 1) & this.mask;
    k.set([a, b, c, d], i * WORDS);
    this.n++;
    return i;
  }

  /** A table of `slots` slots holding the entries that fit: all of them when it grows, none when it is the same size. */
  private resize(slots: number): void {
    const old = this.keys;
    const oldValues = this.values;
    const keep = slots > this.mask + 1;
    this.keys = new Uint32Array(slots * WORDS);
    this.values = this.withValues ? new Uint32Array(slots) : null;
    this.mask = slots - 1;
    this.n = 0;
    if (!keep) return;
    for (let s = 0; s < old.length / WORDS; s++) {
      const o = s * WORDS;
      if (old[o] === 0 && old[o + 1] === 0 && old[o + 2] === 0 && old[o + 3] === 0) continue;
      let i = old[o]! & this.mask;
      while (this.keys[i * WORDS] !== 0 || this.keys[i * WORDS + 1] !== 0 || this.keys[i * WORDS + 2] !== 0 || this.keys[i * WORDS + 3] !== 0) i = (i + 1) & this.mask;
      this.keys.set(old.subarray(o, o + WORDS), i * WORDS);
      if (this.values && oldValues) this.values[i] = oldValues[s]!;
      this.n++;
    }
  }
}

/** The key words of a hash; an all-zero key (the empty slot's) is moved to a value no hash has in practice. */
function words(h: Hash): [number, number, number, number] {
  const a = h.readUInt32LE(0);
  const b = h.readUInt32LE(4);
  const c = h.readUInt32LE(8);
  const d = h.readUInt32LE(12);
  return a === 0 && b === 0 && c === 0 && d === 0 ? [0, 0, 0, 1] : [a, b, c, d];
}
