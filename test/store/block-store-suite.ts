/**
 * The ReplicaStore contract, runnable against any implementation: the local Store, and the HTTP
 * client of a peer (api/). Usage:
 *
 *   blockStoreSuite('Store', async () => { const s = await Store.open(dir); return { store: s, close: () => s.close() }; });
 *
 * Each test gets a fresh, empty store from the factory.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { hashBlock, makeNode, ZERO_HASH, newSnapshotId, type ReplicaStore, type SnapshotRecord, type TreeNode, type BlockFrame } from '../../store/index.js';

export interface SuiteStore {
  readonly store: ReplicaStore;
  close(): Promise<void>;
}

/** Block size used by the suite: small so a test moves kilobytes, not megabytes. */
export const SUITE_BLOCK_SIZE = 4096;

function block(seed?: number): { hash: Buffer; data: Buffer } {
  const data = seed === undefined ? randomBytes(SUITE_BLOCK_SIZE) : Buffer.alloc(SUITE_BLOCK_SIZE, seed);
  return { hash: hashBlock(data), data };
}

async function* frames(list: readonly BlockFrame[]): AsyncGenerator<BlockFrame> {
  for (const f of list) yield f;
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

function codeOf(e: unknown): unknown {
  return (e as { code?: unknown })?.code;
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (e) => {
    assert.equal(codeOf(e), code, `expected ${code}, got ${codeOf(e)}: ${(e as Error)?.message}`);
    return true;
  });
}

/** A one-level snapshot record over `blocks` (volume size = blocks x SUITE_BLOCK_SIZE). */
function snapshotOf(volume: string, root: TreeNode, blocks: number, at = new Date()): SnapshotRecord {
  return {
    id: newSnapshotId(at), volume, size: blocks * SUITE_BLOCK_SIZE, blockSize: SUITE_BLOCK_SIZE, root: root.hash.toString('hex'),
    height: 1, created: at.toISOString(), parent: null, origin: 'test', nonZeroBlocks: root.children.filter((c) => !c.equals(ZERO_HASH)).length,
  };
}

export function blockStoreSuite(name: string, factory: () => Promise<SuiteStore>): void {
  describe(`ReplicaStore contract: ${name}`, () => {
    const withStore = (fn: (s: ReplicaStore) => Promise<void>) => async () => {
      const h = await factory();
      try {
        await fn(h.store);
      } finally {
        await h.close();
      }
    };

    it('stores verified blocks, reports them held, and streams them back in order', withStore(async (s) => {
      const bs = [block(), block(), block()];
      assert.deepEqual(await s.hasBlocks(bs.map((b) => b.hash)), [false, false, false]);
      assert.deepEqual(await s.putBlocks(frames(bs)), { stored: 3, bytes: 3 * SUITE_BLOCK_SIZE });
      assert.deepEqual(await s.hasBlocks([bs[2]!.hash, ZERO_HASH, block().hash, bs[0]!.hash]), [true, true, false, true]);
      const back = await collect(s.getBlocks([bs[1]!.hash, bs[0]!.hash, bs[2]!.hash, bs[1]!.hash]));
      assert.deepEqual(back.map((f) => f.data), [bs[1]!.data, bs[0]!.data, bs[2]!.data, bs[1]!.data]);
      assert.ok(back.every((f, i) => f.hash.equals([bs[1], bs[0], bs[2], bs[1]][i]!.hash)));
    }));

    it('putBlocks is idempotent: a second put stores nothing', withStore(async (s) => {
      const bs = [block(), block()];
      await s.putBlocks(frames(bs));
      assert.deepEqual(await s.putBlocks(frames([...bs, bs[0]!])), { stored: 0, bytes: 0 });
    }));

    it('rejects a block that does not match its hash and stores nothing under that hash', withStore(async (s) => {
      const good = block();
      const bad = block();
      const flipped = Buffer.from(bad.data);
      flipped[100]! ^= 1;
      await rejectsWith(s.putBlocks(frames([good, { hash: bad.hash, data: flipped }])), 'ERR_BLOCK_CORRUPT');
      assert.deepEqual(await s.hasBlocks([bad.hash]), [false]);
      const truncated = block();
      await rejectsWith(s.putBlocks(frames([{ hash: truncated.hash, data: truncated.data.subarray(0, 1000) }])), 'ERR_BLOCK_CORRUPT');
      assert.deepEqual(await s.hasBlocks([truncated.hash]), [false]);
    }));

    it('getBlocks fails with ERR_BLOCK_MISSING for an absent block', withStore(async (s) => {
      await rejectsWith(collect(s.getBlocks([block().hash])), 'ERR_BLOCK_MISSING');
    }));

    it('putNodes stores nodes whose children are present, and getNodes returns them', withStore(async (s) => {
      const bs = [block(), block()];
      await s.putBlocks(frames(bs));
      const leaf = makeNode(1, [bs[0]!.hash, ZERO_HASH, bs[1]!.hash]);
      const top = makeNode(2, [leaf.hash, ZERO_HASH]);
      // Parent before child in one call is allowed.
      await s.putNodes([top, leaf]);
      assert.deepEqual(await s.hasNodes([leaf.hash, top.hash, makeNode(1, [block().hash]).hash]), [true, true, false]);
      const [a, b] = await s.getNodes([top.hash, leaf.hash]);
      assert.equal(a!.level, 2);
      assert.deepEqual(a!.children, top.children);
      assert.deepEqual(b!.children, leaf.children);
      await s.putNodes([leaf]); // idempotent
    }));

    it('putNodes refuses nodes with absent children and stores none of the batch', withStore(async (s) => {
      const present = block();
      await s.putBlocks(frames([present]));
      const absent = block();
      const ok = makeNode(1, [present.hash]);
      const broken = makeNode(1, [present.hash, absent.hash]);
      await rejectsWith(s.putNodes([ok, broken]), 'ERR_SNAPSHOT_INCOMPLETE');
      assert.deepEqual(await s.hasNodes([ok.hash, broken.hash]), [false, false]);
      const orphan = makeNode(2, [makeNode(1, [present.hash, present.hash]).hash]);
      await rejectsWith(s.putNodes([orphan]), 'ERR_SNAPSHOT_INCOMPLETE');
    }));

    it('putNodes with a base: children shared with a held base node are known present, every other child is checked', withStore(async (s) => {
      const [a, b, c] = [block(), block(), block()];
      await s.putBlocks(frames([a, b, c]));
      const base = makeNode(1, [a.hash, b.hash]);
      const upper = makeNode(2, [base.hash]);
      await s.putNodes([base, upper]);
      // One child changed, to a block the store holds: stored.
      const next = makeNode(1, [a.hash, c.hash]);
      await s.putNodes([{ ...next, base: base.hash }]);
      assert.deepEqual(await s.hasNodes([next.hash]), [true]);
      // The changed child absent: refused, nothing of the batch stored.
      const absent = block();
      const lacking = makeNode(1, [a.hash, absent.hash]);
      const lackingTop = makeNode(2, [lacking.hash]);
      await rejectsWith(s.putNodes([{ ...lacking, base: base.hash }, { ...lackingTop, base: upper.hash }]), 'ERR_SNAPSHOT_INCOMPLETE');
      assert.deepEqual(await s.hasNodes([lacking.hash, lackingTop.hash]), [false, false]);
      // A base the store does not hold proves nothing: its "shared" children are checked.
      const [x, y] = [block(), block()];
      const unknownBase = makeNode(1, [x.hash, y.hash]);
      const claims = makeNode(1, [x.hash, y.hash, a.hash]);
      await rejectsWith(s.putNodes([{ ...claims, base: unknownBase.hash }]), 'ERR_SNAPSHOT_INCOMPLETE');
      // Nor does a held node of another level: a level-2 node's children are nodes, not blocks.
      const posing = makeNode(1, [base.hash]);
      await rejectsWith(s.putNodes([{ ...posing, base: upper.hash }]), 'ERR_SNAPSHOT_INCOMPLETE');
      assert.deepEqual(await s.hasNodes([claims.hash, posing.hash]), [false, false]);
    }));

    it('putNodes takes a node as a change of a held base node, and refuses a bad change storing nothing', withStore(async (s) => {
      const bs = Array.from({ length: 8 }, () => block());
      await s.putBlocks(frames(bs));
      const base = makeNode(1, bs.slice(0, 6).map((b) => b.hash));
      await s.putNodes([base]);
      // Children 1 and 4 replaced; the rest are the base's.
      const next = makeNode(1, base.children.map((c, i) => (i === 1 ? bs[6]!.hash : i === 4 ? bs[7]!.hash : c)));
      await s.putNodes([{ hash: next.hash, level: 1, base: base.hash, changed: [[1, bs[6]!.hash], [4, bs[7]!.hash]] }]);
      assert.deepEqual((await s.getNodes([next.hash]))[0]!.children, next.children, 'rebuilt with every child');
      // A whole node with its base's children (as the sync engine gives it) is stored the same way.
      const third = makeNode(1, next.children.map((c, i) => (i === 0 ? bs[7]!.hash : c)));
      await s.putNodes([{ ...third, base: next.hash, baseChildren: next.children }]);
      assert.deepEqual((await s.getNodes([third.hash]))[0]!.children, third.children);
      // Its base not held (gone, or never synced): a peer gets it whole at once after refusing the change.
      const elsewhere = makeNode(1, [bs[0]!.hash, bs[1]!.hash, bs[2]!.hash]);
      const onElsewhere = makeNode(1, [bs[0]!.hash, bs[1]!.hash, bs[3]!.hash]);
      await s.putNodes([{ ...onElsewhere, base: elsewhere.hash, baseChildren: elsewhere.children }]);
      assert.deepEqual(await s.hasNodes([onElsewhere.hash, elsewhere.hash]), [true, false]);
      // Refused, nothing stored: a changed child absent, a base not held (a receiver cannot
      // build on it: send the node whole), a change that does not give the node named, an
      // index past the base's children, indices out of order.
      const absent = block();
      const lacking = makeNode(1, base.children.map((c, i) => (i === 2 ? absent.hash : c)));
      await rejectsWith(s.putNodes([{ hash: lacking.hash, level: 1, base: base.hash, changed: [[2, absent.hash]] }]), 'ERR_SNAPSHOT_INCOMPLETE');
      const unknownBase = makeNode(1, [bs[0]!.hash, bs[1]!.hash]);
      const onUnknown = makeNode(1, [bs[0]!.hash, bs[2]!.hash]);
      await rejectsWith(s.putNodes([{ hash: onUnknown.hash, level: 1, base: unknownBase.hash, changed: [[1, bs[2]!.hash]] }]), 'ERR_SNAPSHOT_INCOMPLETE');
      const wrong = makeNode(1, base.children.map((c, i) => (i === 3 ? bs[7]!.hash : c)));
      await rejectsWith(s.putNodes([{ hash: wrong.hash, level: 1, base: base.hash, changed: [[3, bs[6]!.hash]] }]), 'ERR_NODE_CORRUPT');
      const longer = makeNode(1, [...base.children, bs[6]!.hash]);
      await rejectsWith(s.putNodes([{ hash: longer.hash, level: 1, base: base.hash, changed: [[6, bs[6]!.hash]] }]), 'ERR_NODE_CORRUPT');
      const swapped = makeNode(1, base.children.map((c, i) => (i === 1 ? bs[6]!.hash : i === 4 ? bs[7]!.hash : c)));
      await rejectsWith(s.putNodes([{ hash: swapped.hash, level: 1, base: base.hash, changed: [[4, bs[7]!.hash], [1, bs[6]!.hash]] }]), 'ERR_NODE_CORRUPT');
      assert.deepEqual(await s.hasNodes([lacking.hash, onUnknown.hash, wrong.hash, longer.hash]), [false, false, false, false]);
    }));

    it('getNodes with nodes the caller holds (an earlier tree) returns the same nodes', withStore(async (s) => {
      const bs = Array.from({ length: 8 }, () => block());
      await s.putBlocks(frames(bs));
      const base = makeNode(1, bs.slice(0, 6).map((b) => b.hash));
      const near = makeNode(1, base.children.map((c, i) => (i === 2 ? bs[6]!.hash : c)));
      const far = makeNode(1, [bs[7]!.hash, bs[6]!.hash, bs[5]!.hash, bs[4]!.hash, bs[3]!.hash, bs[2]!.hash]);
      const other = makeNode(1, [bs[0]!.hash, bs[7]!.hash]);
      const top = makeNode(2, [near.hash, far.hash]);
      await s.putNodes([base, near, far, other, top]);
      // near differs from base in one child (a peer sends it so), far in all (whole), other has
      // fewer children (whole), top's "base" is of another level, and one is offered nothing.
      const got = await s.getNodes([near.hash, far.hash, other.hash, top.hash, base.hash], [base, base, base, base, undefined]);
      assert.deepEqual(got.map((n) => [n.hash, n.level, n.children]), [near, far, other, top, base].map((n) => [n.hash, n.level, n.children]));
      // A base the peer does not hold is ignored too.
      const unknown = makeNode(1, [block().hash, ...base.children.slice(1)]);
      assert.deepEqual((await s.getNodes([near.hash], [unknown]))[0]!.children, near.children);
    }));

    it('putNodes refuses a node that does not match its hash', withStore(async (s) => {
      const b = block();
      await s.putBlocks(frames([b]));
      const n = makeNode(1, [b.hash]);
      await rejectsWith(s.putNodes([{ ...n, level: 2 }]), 'ERR_NODE_CORRUPT');
      await rejectsWith(s.putNodes([{ ...n, hash: randomBytes(32) }]), 'ERR_NODE_CORRUPT');
      assert.deepEqual(await s.hasNodes([n.hash]), [false]);
    }));

    it('getNodes fails with ERR_NODE_MISSING for an absent node', withStore(async (s) => {
      await rejectsWith(s.getNodes([randomBytes(32)]), 'ERR_NODE_MISSING');
    }));

    it('commits a snapshot only when its root is present; idempotent; latest is the newest', withStore(async (s) => {
      const bs = [block(1), block(2)];
      await s.putBlocks(frames(bs));
      const root = makeNode(1, bs.map((b) => b.hash));
      const first = snapshotOf('suite-vol', root, 2, new Date(Date.now() - 60_000));
      await rejectsWith(s.commitSnapshot(first), 'ERR_SNAPSHOT_INCOMPLETE');
      assert.equal(await s.getSnapshot('suite-vol', first.id), null);
      assert.equal(await s.latestSnapshot('suite-vol'), null);
      await s.putNodes([root]);
      await s.commitSnapshot(first);
      await s.commitSnapshot(first);
      assert.deepEqual(await s.getSnapshot('suite-vol', first.id), first);
      const root2 = makeNode(1, [bs[1]!.hash, bs[0]!.hash]);
      await s.putNodes([root2]);
      const second = { ...snapshotOf('suite-vol', root2, 2), parent: first.id };
      await s.commitSnapshot(second);
      assert.deepEqual(await s.latestSnapshot('suite-vol'), second);
      assert.equal(await s.latestSnapshot('other-vol'), null);
    }));

    it('commits the snapshot of an all-zero volume (root ZERO_HASH) without nodes', withStore(async (s) => {
      const snap: SnapshotRecord = {
        id: newSnapshotId(), volume: 'zeros', size: 10 * SUITE_BLOCK_SIZE, blockSize: SUITE_BLOCK_SIZE, root: ZERO_HASH.toString('hex'),
        height: 1, created: new Date().toISOString(), parent: null, origin: 'test', nonZeroBlocks: 0,
      };
      await s.commitSnapshot(snap);
      assert.deepEqual(await s.latestSnapshot('zeros'), snap);
    }));
  });
}
