/**
 * verify: re-read and re-hash every node and block reachable from the selected snapshots.
 *
 * Each node and block is checked once per run (a block shared by many snapshots is read once,
 * and a subtree found all good is not walked again when a later snapshot shares it), but a bad
 * one is reported for every (volume, snapshot, block index) that reaches it, so the operator
 * sees exactly which restores it would break. Block records are checked end to end:
 * header, CRC-32 of the record, and BLAKE3 of the payload against the hash the index names.
 *
 * It runs without the gc lock, so gc (and the retention before it) need not wait hours for a
 * large store's verify: a block that fails its check is checked again under the gc lock, at the
 * place the index names then (gc may have moved it, and deleted the pack it was read from), and
 * only a problem of a snapshot that still exists at the end is reported (one deleted during the
 * run may have lost its nodes and blocks to gc; one that exists at the end kept them all).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { TandemError, isTandemError } from '../common/errors.js';
import { isZeroHash, toHex, blake3 } from './hash.js';
import { blockKey, nodeKey, namespaceRange, NS, decodeLocation, snapshotKey } from './keys.js';
import { CODEC_DELTA, decodePayload, decodeRecord, recordLength } from './pack.js';
import { blockCount, childCount, decodeNode, FANOUT, span } from './tree.js';
import type { Store } from './store.js';
import { shapeOf } from './store.js';
import { HashTable } from './hash-table.js';
import type { Hash, SnapshotRecord, VerifyProblem, VerifyProgress, VerifyReport } from './types.js';

/** Blocks of one level-1 node read concurrently. */
const VERIFY_CONCURRENCY = 8;

/**
 * Good blocks remembered, so a block shared by many snapshots is read once (20 MiB of table, see
 * {@link HashTable}; a Set of hash strings took ~100 MB for 1M). Past it the table starts again
 * and shared blocks may be read again: slower, never wrong.
 */
const MAX_REMEMBERED_BLOCKS = 1_500_000;

/**
 * Clean nodes remembered (nodes whose whole subtree is good), so a later snapshot's unchanged
 * subtrees are not walked again: 256 blocks a node, 4 MiB of table.
 */
const MAX_REMEMBERED_NODES = 196_608;

/** onProgress is called at most this often (plus once at the end). */
const PROGRESS_INTERVAL_MS = 200;

type Code = VerifyProblem['code'];

export interface VerifyOptions {
  readonly onProgress?: (p: VerifyProgress) => void;
  /** Stops the run (it throws the signal's reason). */
  readonly signal?: AbortSignal;
  /** Read at most this many bytes a second (a scheduled verify leaves the disk to replication). */
  readonly bytesPerSecond?: number;
  /**
   * Resume a run of the whole store: skip the snapshots up to and including this one, in the
   * index's order (by volume, then id). The daemon's scheduled verify resumes this way after a
   * restart, from what {@link onSnapshot} told it.
   */
  readonly after?: { readonly volume: string; readonly id: string };
  /** Told after each snapshot is walked, with the run's report so far (problems not yet checked against deletions). */
  readonly onSnapshot?: (snap: SnapshotRecord, soFar: VerifyReport) => void | Promise<void>;
}

export async function verifyStore(store: Store, filter: { volume?: string; snapshot?: string } = {}, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const { onProgress, signal, bytesPerSecond } = opts;
  const snaps = await selectSnapshots(store, filter, opts.after);
  /** Good blocks, with their length. */
  const goodBlocks = new HashTable(MAX_REMEMBERED_BLOCKS, true);
  /**
   * By block size: nodes whose subtree is all good, every block of that length (so good at any
   * place but a volume's end), with the number of non-zero blocks under each.
   */
  const cleanNodesBySize = new Map<number, HashTable>();
  const cleanNodesOf = (blockSize: number): HashTable => {
    let t = cleanNodesBySize.get(blockSize);
    if (!t) cleanNodesBySize.set(blockSize, (t = new HashTable(MAX_REMEMBERED_NODES, true)));
    return t;
  };
  // Bad blocks and nodes, and the good nodes above them, are few: kept exactly, so each
  // (volume, snapshot, block index) that reaches one is reported.
  const badBlocks = new Map<string, Code>();
  const badNodes = new Map<string, Code>();
  const dirtyNodes = new Set<string>();
  const problems: VerifyProblem[] = [];
  let nodes = 0;
  let blocks = 0;
  let bytes = 0;
  const progress = { blocksDone: 0, blocksTotal: onProgress ? await blocksToRead(store, snaps) : 0, bytesRead: 0, problems: 0 };
  let lastProgress = 0;
  const report = (force: boolean) => {
    if (!onProgress) return;
    const now = Date.now();
    if (!force && now - lastProgress < PROGRESS_INTERVAL_MS) return;
    lastProgress = now;
    progress.blocksDone = blocks;
    // The estimate may be high (blocks shared across volumes) or, past the remembered blocks, low.
    progress.blocksTotal = force ? blocks : Math.max(progress.blocksTotal, blocks);
    progress.bytesRead = bytes;
    progress.problems = problems.length;
    onProgress({ ...progress });
  };

  /** The node's children, or the code of what is wrong with it. */
  const readNode = async (h: Hash, level: number): Promise<{ code: Code } | { children: readonly Hash[] }> => {
    const key = h.toString('latin1');
    const known = badNodes.get(key);
    if (known) return { code: known };
    const v = await store.indexRead(() => store.db.get(nodeKey(h)));
    const n = v === undefined ? undefined : decodeNode(h, v);
    if (!dirtyNodes.has(key)) nodes++;
    if (n && n.level === level) return { children: n.children };
    const code: Code = v === undefined ? 'ERR_NODE_MISSING' : 'ERR_NODE_CORRUPT';
    badNodes.set(key, code);
    return { code };
  };

  /** The block's problem, or its length when it is good, read at the place the index names now. */
  const readBlock = async (h: Hash): Promise<Code | number> => {
    const v = await store.indexRead(() => store.db.get(blockKey(h)));
    if (v === undefined) return 'ERR_BLOCK_MISSING';
    const loc = decodeLocation(v);
    if (loc.codec === CODEC_DELTA) {
      // Its record, then its base, patched and re-hashed: a damaged base makes this block bad too.
      try {
        const { data, release } = await store.readDeltaBlock(h, loc, true, true);
        bytes += data.length;
        release?.();
        return data.length;
      } catch (e) {
        if (!isTandemError(e, 'ERR_STORE_CORRUPT') && !isTandemError(e, 'ERR_BLOCK_CORRUPT')) throw e;
        return 'ERR_BLOCK_CORRUPT';
      }
    }
    try {
      // Past the page cache (PackFiles.readDirect): verify reads every block of the store once.
      const { buf: raw, release } = await store.packs.readPooled(loc.pack, loc.offset, recordLength(loc.length), { direct: true });
      try {
        const rec = decodeRecord(raw);
        const data = rec && rec.hash.equals(h) ? decodePayload(rec.codec, rec.payload) : undefined;
        if (!data || !blake3(data).equals(h)) return 'ERR_BLOCK_CORRUPT';
        bytes += data.length;
        return data.length;
      } finally {
        release?.();
      }
    } catch (e) {
      if (!isTandemError(e, 'ERR_STORE_CORRUPT')) throw e;
      return 'ERR_BLOCK_CORRUPT';
    }
  };

  const started = performance.now();
  /** The block's problem, or its length when it is good. */
  const checkBlock = async (h: Hash): Promise<Code | number> => {
    const length = goodBlocks.get(h);
    if (length !== undefined) return length;
    const key = h.toString('latin1');
    const bad = badBlocks.get(key);
    if (bad) return bad;
    signal?.throwIfAborted();
    // Without the gc lock, a failure may be gc's doing (the block moved, its pack deleted): it
    // counts only if the block fails again under the lock.
    const code = await readBlock(h).catch(() => 'retry' as const);
    const confirmed = typeof code === 'number' ? code : await store.gcLock.shared(() => readBlock(h));
    blocks++;
    if (typeof confirmed === 'number') goodBlocks.set(h, confirmed);
    else badBlocks.set(key, confirmed);
    if (bytesPerSecond !== undefined && bytesPerSecond > 0) {
      const wait = started + (bytes / bytesPerSecond) * 1000 - performance.now();
      if (wait > 1) await sleep(wait, undefined, { signal }).catch(() => signal?.throwIfAborted());
    }
    return confirmed;
  };

  for (const snap of snaps) {
    const problem = (kind: 'block' | 'node', code: Code, h: Hash, blockIndex: number, detail?: string) =>
      problems.push({ kind, code, hash: toHex(h), volume: snap.volume, snapshot: snap.id, blockIndex, ...(detail !== undefined ? { detail } : {}) });
    const shape = shapeOf(snap);
    // Every block has the snapshot's block size but the last, which has what is left of the
    // volume: a good block of another length (a tree a faulty peer sent) is no restore's.
    const lastBlock = blockCount(snap.size, snap.blockSize) - 1;
    const lengthAt = (i: number): number => (i === lastBlock ? snap.size - lastBlock * snap.blockSize : snap.blockSize);
    const cleanNodes = cleanNodesOf(snap.blockSize);
    /** Walk the subtree of node h (level k, j-th of its level): its non-zero blocks, and whether all is good under it. */
    const walk = async (h: Hash, k: number, j: number): Promise<{ nonZero: number; clean: boolean }> => {
      if (isZeroHash(h)) return { nonZero: 0, clean: true };
      signal?.throwIfAborted();
      const first = j * span(k);
      // The node over the volume's last block is not remembered: that block's length is its own.
      const atEnd = first + span(k) > lastBlock;
      const remembered = atEnd ? undefined : cleanNodes.get(h);
      if (remembered !== undefined) return { nonZero: remembered, clean: true };
      const node = await readNode(h, k);
      if ('code' in node) {
        problem('node', node.code, h, first);
        return { nonZero: 0, clean: false };
      }
      let nonZero = 0;
      let clean = true;
      const want = childCount(lastBlock + 1, k, j);
      if (node.children.length !== want) {
        clean = false;
        problem('node', 'ERR_SNAPSHOT_INVALID', h, first, `a node of ${node.children.length} children at level ${k} where ${want} belong: the tree does not fit the snapshot's size`);
      }
      if (k === 1) {
        const { children } = node;
        for (let i = 0; i < children.length; i += VERIFY_CONCURRENCY) {
          const part = children.slice(i, i + VERIFY_CONCURRENCY);
          const codes = await Promise.all(part.map((c) => (isZeroHash(c) ? null : checkBlock(c))));
          codes.forEach((c, n) => {
            if (c === null) return; // the zero block, of any length
            nonZero++;
            const index = first + i + n;
            if (typeof c !== 'number') {
              clean = false;
              problem('block', c, part[n]!, index);
            } else if (c !== lengthAt(index)) {
              clean = false;
              problem('block', 'ERR_SNAPSHOT_INVALID', part[n]!, index, `a block of ${c} bytes, good, where ${lengthAt(index)} belong: the tree does not fit the snapshot's size`);
            }
          });
          report(false);
        }
      } else {
        for (let c = 0; c < node.children.length; c++) {
          const r = await walk(node.children[c]!, k - 1, j * FANOUT + c);
          nonZero += r.nonZero;
          clean &&= r.clean;
        }
      }
      if (clean && !atEnd) cleanNodes.set(h, nonZero);
      else dirtyNodes.add(h.toString('latin1'));
      return { nonZero, clean };
    };
    const all = await walk(shape.root, shape.height, 0);
    // Counted only over a whole tree: a missing or damaged node is reported as such.
    if (all.clean && all.nonZero !== snap.nonZeroBlocks) {
      problem('node', 'ERR_SNAPSHOT_INVALID', shape.root, 0, `the snapshot says it holds ${snap.nonZeroBlocks} non-zero blocks; its tree holds ${all.nonZero}`);
    }
    await opts.onSnapshot?.(snap, { snapshots: snaps.indexOf(snap) + 1, nodes, blocks, bytes, problems: [...problems] });
  }
  // A snapshot deleted during the run may have lost its nodes and blocks to gc: its problems are
  // not the store's. One that exists now existed all along, so gc kept everything it reaches.
  const gone = new Set<string>();
  for (const s of snaps) if (!(await store.getSnapshot(s.volume, s.id))) gone.add(`${s.volume}@${s.id}`);
  const kept = problems.filter((p) => !gone.has(`${p.volume}@${p.snapshot}`));
  problems.length = 0;
  problems.push(...kept);
  report(true);
  return { snapshots: snaps.length - gone.size, nodes, blocks, bytes, problems };
}

/**
 * About how many blocks verify will read, for its progress: each volume's first selected
 * snapshot's non-zero blocks, then those that changed from one snapshot to the next (a tree diff
 * reads only the nodes on changed paths). A damaged tree counts its whole snapshot.
 */
async function blocksToRead(store: Store, snaps: readonly SnapshotRecord[]): Promise<number> {
  let n = 0;
  let prev: SnapshotRecord | null = null;
  for (const s of snaps) {
    if (!prev || prev.volume !== s.volume || prev.blockSize !== s.blockSize) n += s.nonZeroBlocks;
    else {
      try {
        for await (const c of store.diffSnapshots(prev, s)) if (!isZeroHash(c.hash)) n++;
      } catch {
        n += s.nonZeroBlocks;
      }
    }
    prev = s;
  }
  return n;
}

async function selectSnapshots(store: Store, filter: { volume?: string; snapshot?: string }, after?: { volume: string; id: string }): Promise<SnapshotRecord[]> {
  if (filter.snapshot !== undefined && filter.volume === undefined) {
    throw new TandemError('ERR_BAD_REQUEST', 'verify: a snapshot filter needs its volume (VOL@SNAPSHOT)');
  }
  if (filter.volume !== undefined) {
    if (filter.snapshot !== undefined) return [await store.resolveSnapshot(`${filter.volume}@${filter.snapshot}`)];
    const list = await store.listSnapshots(filter.volume);
    if (list.length === 0 && !(await store.getVolume(filter.volume))) await store.resolveSnapshot(filter.volume); // throws the right error
    return list;
  }
  const range = namespaceRange(NS.snapshot);
  const out: SnapshotRecord[] = [];
  await store.indexRead(async () => {
    for await (const v of store.db.values(after ? { gt: snapshotKey(after.volume, after.id), lt: range.lt } : range)) out.push(JSON.parse(v.toString('utf8')) as SnapshotRecord);
  });
  return out;
}
