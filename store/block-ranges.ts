/**
 * A set of block indices kept as sorted, disjoint, non-adjacent inclusive ranges: a change list
 * (`snapshot --changed-blocks`) of one line `0-16777215` is one range, not sixteen million
 * numbers. Memory follows the number of ranges, whatever the number of blocks they cover.
 */
export interface BlockRanges {
  /** Sorted by first; disjoint and not adjacent (a range that could be merged with the next is). */
  readonly ranges: ReadonlyArray<{ readonly first: number; readonly last: number }>;
  /** Blocks the ranges cover. */
  readonly count: number;
}

/** Merge inclusive ranges in any order, overlapping or not. `ranges` is sorted in place. */
export function mergeRanges(ranges: Array<{ first: number; last: number }>): BlockRanges {
  ranges.sort((a, b) => a.first - b.first);
  const out: Array<{ first: number; last: number }> = [];
  let count = 0;
  for (const r of ranges) {
    const prev = out[out.length - 1];
    if (prev !== undefined && r.first <= prev.last + 1) {
      if (r.last > prev.last) {
        count += r.last - prev.last;
        prev.last = r.last;
      }
    } else {
      out.push({ first: r.first, last: r.last });
      count += r.last - r.first + 1;
    }
  }
  return { ranges: out, count };
}

/** Block indices in any order, repeats allowed, as ranges. */
export function rangesOf(indices: readonly number[]): BlockRanges {
  return mergeRanges(indices.map((i) => ({ first: i, last: i })));
}

/** Every index the ranges cover, in order (for tests and small lists). */
export function* indicesIn(set: BlockRanges): Generator<number> {
  for (const r of set.ranges) for (let i = r.first; i <= r.last; i++) yield i;
}

/**
 * The indices of `set` in order, `max` at a time: a part that is one run of consecutive blocks
 * as { first, count }, another with its indices listed. Memory: one part.
 */
export function* partsOf(set: BlockRanges, max: number): Generator<{ first: number; count: number; indices?: number[] }> {
  let part: number[] = [];
  for (const r of set.ranges) {
    let i = r.first;
    // Whole runs of `max` inside a range need no list, when no part is being filled.
    while (i <= r.last) {
      if (part.length === 0 && r.last - i + 1 >= max) {
        yield { first: i, count: max };
        i += max;
        continue;
      }
      part.push(i++);
      if (part.length === max) {
        yield partOf(part);
        part = [];
      }
    }
  }
  if (part.length > 0) yield partOf(part);
}

function partOf(part: number[]): { first: number; count: number; indices?: number[] } {
  const first = part[0]!;
  return part[part.length - 1]! - first === part.length - 1 ? { first, count: part.length } : { first, count: part.length, indices: part };
}
