/**
 * Properties of BlockRanges (store/block-ranges.ts), how a change list reaches a scan: merged
 * ranges cover exactly the listed blocks, and a scan's jobs from them are those it would make
 * from the sorted, deduplicated indices (a run of `max` listed blocks one read, a part with gaps
 * its blocks listed).
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { indicesIn, mergeRanges, partsOf, rangesOf } from '../../store/block-ranges.js';

/** The jobs from sorted unique indices, `max` listed blocks at a time (the reference). */
function partsOfIndices(sorted: readonly number[], max: number): Array<{ first: number; count: number; indices?: number[] }> {
  const out: Array<{ first: number; count: number; indices?: number[] }> = [];
  for (let i = 0; i < sorted.length; i += max) {
    const part = sorted.slice(i, i + max);
    const first = part[0]!;
    out.push(part[part.length - 1]! - first === part.length - 1 ? { first, count: part.length } : { first, count: part.length, indices: part });
  }
  return out;
}

const indices = fc.array(fc.integer({ min: 0, max: 400 }), { maxLength: 300 });

describe('BlockRanges', () => {
  it('covers exactly the listed blocks, in order, ranges disjoint and not adjacent', () => {
    fc.assert(
      fc.property(indices, (list) => {
        const set = rangesOf(list);
        const want = [...new Set(list)].sort((a, b) => a - b);
        assert.deepEqual([...indicesIn(set)], want);
        assert.equal(set.count, want.length);
        for (let i = 1; i < set.ranges.length; i++) assert.ok(set.ranges[i]!.first > set.ranges[i - 1]!.last + 1);
      }),
    );
  });

  it('merges overlapping and nested ranges given in any order', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: 40 })), { maxLength: 40 }), (pairs) => {
        const set = mergeRanges(pairs.map(([first, len]) => ({ first, last: first + len })));
        const want = new Set<number>();
        for (const [first, len] of pairs) for (let i = first; i <= first + len; i++) want.add(i);
        assert.deepEqual([...indicesIn(set)], [...want].sort((a, b) => a - b));
        assert.equal(set.count, want.size);
      }),
    );
  });

  it('gives a scan the jobs the sorted indices would', () => {
    fc.assert(
      fc.property(indices, fc.integer({ min: 1, max: 20 }), (list, max) => {
        const sorted = [...new Set(list)].sort((a, b) => a - b);
        assert.deepEqual([...partsOf(rangesOf(list), max)], partsOfIndices(sorted, max));
      }),
    );
  });

  it('walks a range of billions of blocks one part at a time', () => {
    const set = mergeRanges([{ first: 0, last: 2 ** 34 - 1 }]);
    const it = partsOf(set, 16);
    assert.deepEqual(it.next().value, { first: 0, count: 16 });
    assert.deepEqual(it.next().value, { first: 16, count: 16 });
  });
});
