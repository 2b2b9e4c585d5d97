/**
 * Properties of the Merkle tree builder and diff (store/tree.ts), over random block-hash vectors:
 * building from a parent plus changes equals building from scratch, diff returns exactly the
 * changed indices, and walking a tree gives back the vector.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { blockHashRanges, buildTree, diffTrees, walkBlocks, treeHeight, type BlockChange, type TreeShape } from '../../store/tree.js';
import { ZERO_HASH, blake3 } from '../../store/hash.js';
import type { Hash, TreeNode } from '../../store/types.js';
import { TandemError } from '../../common/errors.js';

/** A few distinct block hashes; value 0 stands for the zero block. */
const POOL = [ZERO_HASH, ...[1, 2, 3, 4].map((i) => blake3(Buffer.from([i])))];

/** A sparse vector: length and non-zero entries (index -> pool value). */
interface Vec {
  readonly n: number;
  readonly at: ReadonlyMap<number, number>;
}

function nodeStore() {
  const nodes = new Map<string, TreeNode>();
  return {
    nodes,
    get: async (h: Hash) => {
      const n = nodes.get(h.toString('hex'));
      if (!n) throw new TandemError('ERR_NODE_MISSING', 'missing');
      return n;
    },
    emit: (n: TreeNode) => void nodes.set(n.hash.toString('hex'), n),
  };
}

function changesOf(v: Vec): BlockChange[] {
  return [...v.at].filter(([, x]) => x !== 0).sort((a, b) => a[0] - b[0]).map(([index, x]) => ({ index, hash: POOL[x]! }));
}

function valueAt(v: Vec, i: number): number {
  return i < v.n ? v.at.get(i) ?? 0 : 0;
}

function vecArb(maxN: number): fc.Arbitrary<Vec> {
  return fc.integer({ min: 0, max: maxN }).chain((n) =>
    fc.array(fc.tuple(fc.integer({ min: 0, max: Math.max(0, n - 1) }), fc.integer({ min: 0, max: 4 })), { maxLength: n === 0 ? 0 : 300 })
      .map((entries) => ({ n, at: new Map(n === 0 ? [] : entries) })),
  );
}

/** A new vector derived from `v`: new size, and random changes (some back to zero). */
function nextArb(v: Vec, maxN: number): fc.Arbitrary<{ next: Vec; changes: BlockChange[] }> {
  return fc.integer({ min: 0, max: maxN }).chain((n) =>
    fc.array(fc.tuple(fc.integer({ min: 0, max: Math.max(0, n - 1) }), fc.integer({ min: 0, max: 4 })), { maxLength: n === 0 ? 0 : 200 }).map((entries) => {
      const changed = new Map(n === 0 ? [] : entries);
      const at = new Map<number, number>();
      for (let i = 0; i < n; i++) {
        const x = changed.has(i) ? changed.get(i)! : valueAt(v, i);
        if (x !== 0) at.set(i, x);
      }
      const changes = [...changed].sort((a, b) => a[0] - b[0]).map(([index, x]) => ({ index, hash: POOL[x]! }));
      return { next: { n, at }, changes };
    }),
  );
}

async function build(v: Vec, s: ReturnType<typeof nodeStore>, parent: (TreeShape & { nonZeroBlocks: number }) | null = null, changes = changesOf(v)) {
  const t = await buildTree({ blocks: v.n, parent, changes, get: s.get, emit: s.emit });
  return { ...t, blocks: v.n };
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

const nonZero = (v: Vec) => [...v.at.values()].filter((x) => x !== 0).length;

describe('tree properties', () => {
  it('building from parent + changes equals building from scratch (sizes across levels)', async () => {
    await fc.assert(
      fc.asyncProperty(vecArb(1500).chain((v) => nextArb(v, 1500).map((n) => ({ v, ...n }))), async ({ v, next, changes }) => {
        const s = nodeStore();
        const t1 = await build(v, s);
        assert.equal(t1.height, treeHeight(v.n));
        assert.equal(t1.nonZeroBlocks, nonZero(v));
        const incremental = await build(next, s, t1, changes);
        const scratch = await build(next, nodeStore());
        assert.equal(incremental.root.toString('hex'), scratch.root.toString('hex'));
        assert.equal(incremental.height, scratch.height);
        assert.equal(incremental.nonZeroBlocks, nonZero(next));
      }),
      { numRuns: 150 },
    );
  });

  it('diff returns exactly the indices whose hash changed; walk returns the vector', async () => {
    await fc.assert(
      fc.asyncProperty(vecArb(1500).chain((v) => nextArb(v, 1500).map((n) => ({ v, ...n }))), fc.boolean(), async ({ v, next }, nullBase) => {
        const s = nodeStore();
        const t1 = await build(v, s);
        const t2 = await build(next, s);
        const base = nullBase ? null : t1;
        const got = await collect(diffTrees(base, t2, s.get));
        const want: BlockChange[] = [];
        for (let i = 0; i < next.n; i++) {
          const before = nullBase ? 0 : valueAt(v, i);
          if (valueAt(next, i) !== before) want.push({ index: i, hash: POOL[valueAt(next, i)]! });
        }
        assert.deepEqual(got.map((c) => [c.index, c.hash.toString('hex')]), want.map((c) => [c.index, c.hash.toString('hex')]));
        const walked = await collect(walkBlocks(t2, s.get));
        assert.equal(walked.length, next.n);
        walked.forEach((c, i) => assert.ok(c.index === i && c.hash.equals(POOL[valueAt(next, i)]!)));
      }),
      { numRuns: 150 },
    );
  });

  it('blockHashRanges gives the vector, in consecutive ranges of any lengths (two- and three-level trees, sparse)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 70_000 }).chain((n) => fc.tuple(
          fc.constant(n),
          fc.array(fc.tuple(fc.integer({ min: 0, max: n - 1 }), fc.integer({ min: 1, max: 4 })), { maxLength: 200 }),
          fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 40 }),
        )),
        async ([n, entries, lengths]) => {
          const v: Vec = { n, at: new Map(entries) };
          const s = nodeStore();
          const t = await build(v, s);
          const read = blockHashRanges(t, s.get);
          let first = 0;
          for (let k = 0; first < n; k++) {
            const count = Math.min(lengths[k % lengths.length]!, n - first);
            const got = await read(first, count);
            assert.equal(got.length, count * 32);
            for (let i = 0; i < count; i++) assert.ok(got.subarray(i * 32, (i + 1) * 32).equals(POOL[valueAt(v, first + i)]!), `block ${first + i}`);
            first += count;
          }
        },
      ),
      { numRuns: 60 },
    );
  });

  it('three-level trees (more than 65536 blocks): incremental equals scratch and diff is exact', async () => {
    const big = fc.integer({ min: 65_000, max: 140_000 }).chain((n) =>
      fc.array(fc.tuple(fc.integer({ min: 0, max: n - 1 }), fc.integer({ min: 1, max: 4 })), { maxLength: 40 }).map((e) => ({ n, at: new Map(e) })),
    );
    await fc.assert(
      fc.asyncProperty(big.chain((v) => nextArb(v, 140_000).map((n) => ({ v, ...n }))), async ({ v, next, changes }) => {
        const s = nodeStore();
        const t1 = await build(v, s);
        const inc = await build(next, s, t1, changes);
        const scratch = await build(next, nodeStore());
        assert.equal(inc.root.toString('hex'), scratch.root.toString('hex'));
        const got = (await collect(diffTrees(t1, inc, s.get))).map((c) => c.index);
        const want: number[] = [];
        for (const i of new Set([...v.at.keys(), ...next.at.keys()])) if (i < next.n && valueAt(next, i) !== valueAt(v, i)) want.push(i);
        assert.deepEqual(got, want.sort((a, b) => a - b));
      }),
      { numRuns: 8 },
    );
  });

  /**
   * Changes with runs of zero blocks (BlockChange.end: a hole of a sparse volume, scanVolume)
   * among single blocks, from a parent of any size: `steps` walk the new vector, each a gap
   * (blocks kept), a block changed to a pool value, or a run of zeros.
   */
  const withRuns = (v: Vec, n: number, steps: ReadonlyArray<readonly [number, number, number]>): { next: Vec; changes: BlockChange[] } => {
    const at = new Map<number, number>();
    for (let i = 0; i < n; i++) if (valueAt(v, i) !== 0) at.set(i, valueAt(v, i));
    const changes: BlockChange[] = [];
    let pos = 0;
    for (const [kind, len, x] of steps) {
      if (pos >= n) break;
      if (kind === 0) pos += len;
      else if (kind === 1) {
        changes.push({ index: pos, hash: POOL[x]! });
        if (x === 0) at.delete(pos);
        else at.set(pos, x);
        pos++;
      } else {
        const end = Math.min(n, pos + len);
        changes.push({ index: pos, hash: ZERO_HASH, end });
        for (let i = pos; i < end; i++) at.delete(i);
        pos = end;
      }
    }
    return { next: { n, at }, changes };
  };
  const stepsArb = (maxLen: number) => fc.array(fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer({ min: 1, max: maxLen }), fc.integer({ min: 0, max: 4 })), { maxLength: 60 });

  it('runs of zero blocks among changes: incremental equals scratch, nonZeroBlocks exact (sizes across levels, grown or shrunk)', async () => {
    await fc.assert(
      fc.asyncProperty(vecArb(1500), fc.integer({ min: 1, max: 1500 }), stepsArb(1200), async (v, n, steps) => {
        const s = nodeStore();
        const t1 = await build(v, s);
        const { next, changes } = withRuns(v, n, steps);
        const incremental = await build(next, s, t1, changes);
        const scratch = await build(next, nodeStore());
        assert.equal(incremental.root.toString('hex'), scratch.root.toString('hex'));
        assert.equal(incremental.nonZeroBlocks, nonZero(next));
      }),
      { numRuns: 300 },
    );
  });

  it('runs of zero blocks over three-level trees, and a run over zero subtrees reads no node below them', async () => {
    const big = fc.integer({ min: 65_000, max: 140_000 }).chain((n) =>
      fc.array(fc.tuple(fc.integer({ min: 0, max: n - 1 }), fc.integer({ min: 1, max: 4 })), { maxLength: 40 }).map((e) => ({ n, at: new Map(e) })),
    );
    await fc.assert(
      fc.asyncProperty(big, fc.integer({ min: 60_000, max: 140_000 }), stepsArb(90_000), async (v, n, steps) => {
        const s = nodeStore();
        const t1 = await build(v, s);
        const { next, changes } = withRuns(v, n, steps);
        const inc = await build(next, s, t1, changes);
        const scratch = await build(next, nodeStore());
        assert.equal(inc.root.toString('hex'), scratch.root.toString('hex'));
        assert.equal(inc.nonZeroBlocks, nonZero(next));
      }),
      { numRuns: 25 },
    );
    // 2^24 blocks (8 TiB of 512 KiB blocks) with data in blocks 5 and 2^24 - 1: a run over
    // everything between reads the root and the nodes down to those two blocks only.
    const s = nodeStore();
    const n = 2 ** 24;
    const t1 = await build({ n, at: new Map([[5, 1], [n - 1, 2]]) }, s);
    let reads = 0;
    const counted = { ...s, get: async (h: Hash) => (reads++, s.get(h)) };
    const t2 = await build({ n, at: new Map([[5, 1], [n - 1, 2]]) }, counted, t1, [{ index: 6, hash: ZERO_HASH, end: n - 1 }]);
    assert.ok(t2.root.equals(t1.root));
    assert.ok(reads <= 2 * t1.height, `${reads} node reads`);
  });

  it('refuses a run of zero blocks that is empty, past the end, or not zero', async () => {
    const s = nodeStore();
    for (const changes of [[{ index: 3, hash: ZERO_HASH, end: 3 }], [{ index: 3, hash: ZERO_HASH, end: 11 }], [{ index: 3, hash: POOL[1]!, end: 5 }], [{ index: 2, hash: ZERO_HASH, end: 5 }, { index: 4, hash: POOL[1]! }]]) {
      await assert.rejects(buildTree({ blocks: 10, parent: null, changes, get: s.get, emit: s.emit }), { code: 'ERR_BAD_REQUEST' });
    }
  });

  it('an all-zero volume has root ZERO_HASH and no nodes, whatever its size', async () => {
    const s = nodeStore();
    const t = await build({ n: 131072, at: new Map() }, s);
    assert.ok(t.root.equals(ZERO_HASH));
    assert.equal(t.height, 3);
    assert.equal(s.nodes.size, 0);
  });

  it('refuses changes that are not strictly ascending or out of range', async () => {
    const s = nodeStore();
    for (const changes of [[{ index: 3, hash: POOL[1]! }, { index: 3, hash: POOL[2]! }], [{ index: 5, hash: POOL[1]! }, { index: 2, hash: POOL[1]! }], [{ index: 10, hash: POOL[1]! }]]) {
      await assert.rejects(buildTree({ blocks: 10, parent: null, changes, get: s.get, emit: s.emit }), { code: 'ERR_BAD_REQUEST' });
    }
  });
});
