/**
 * verify: re-read and re-hash every node and block reachable from the selected snapshots.
 *
 * Each node and block is checked once per run (a block shared by many snapshots is read once,
 * and a subtree found all good is not walked again when a later snapshot shares it), but a bad
 * one is reported for every (volume, snapshot, block index) that reaches it, so the operator
 * sees exactly which restores it would break. Block records are checked end to end:
 * header, CRC-32 of the record, and BLAKE3 of the payload against the hash the index names.
 */
import { TandemError, isTandemError } from '../common/errors.js';
import { isZeroHash, toHex, blake3 } from './hash.js';
import { blockKey, nodeKey, namespaceRange, NS, decodeLocation } from './keys.js';
import { decodePayload, decodeRecord, recordLength } from './pack.js';
import { decodeNode, FANOUT, span } from './tree.js';
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

export async function verifyStore(store: Store, filter: { volume?: string; snapshot?: string } = {}, onProgress?: (p: VerifyProgress) => void): Promise<VerifyReport> {
  const snaps = await selectSnapshots(store, filter);
  /** Good blocks. */
  const goodBlocks = new HashTable(MAX_REMEMBERED_BLOCKS);
  /** Nodes whose subtree is all good, with the number of non-zero blocks under each. */
  const cleanNodes = new HashTable(MAX_REMEMBERED_NODES, true);
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
    const v = await store.db.get(nodeKey(h));
    const n = v === undefined ? undefined : decodeNode(h, v);
    if (!dirtyNodes.has(key)) nodes++;
    if (n && n.level === level) return { children: n.children };
    const code: Code = v === undefined ? 'ERR_NODE_MISSING' : 'ERR_NODE_CORRUPT';
    badNodes.set(key, code);
    return { code };
  };

  const checkBlock = async (h: Hash): Promise<Code | null> => {
    if (goodBlocks.has(h)) return null;
    const key = h.toString('latin1');
    const bad = badBlocks.get(key);
    if (bad) return bad;
    let code: Code | null = null;
    const v = await store.db.get(blockKey(h));
    if (v === undefined) code = 'ERR_BLOCK_MISSING';
    else {
      const loc = decodeLocation(v);
      try {
        // Past the page cache (PackFiles.readDirect): verify reads every block of the store once.
        const { buf: raw, release } = await store.packs.readPooled(loc.pack, loc.offset, recordLength(loc.length), { direct: true });
        try {
          const rec = decodeRecord(raw);
          const data = rec && rec.hash.equals(h) ? decodePayload(rec.codec, rec.payload) : undefined;
          if (!data || !blake3(data).equals(h)) code = 'ERR_BLOCK_CORRUPT';
          else bytes += data.length;
        } finally {
          release?.();
        }
      } catch (e) {
        if (!isTandemError(e, 'ERR_STORE_CORRUPT')) throw e;
        code = 'ERR_BLOCK_CORRUPT';
      }
    }
    blocks++;
    if (code) badBlocks.set(key, code);
    else goodBlocks.set(h);
    return code;
  };

  for (const snap of snaps) {
    const problem = (kind: 'block' | 'node', code: Code, h: Hash, blockIndex: number) =>
      problems.push({ kind, code, hash: toHex(h), volume: snap.volume, snapshot: snap.id, blockIndex });
    const shape = shapeOf(snap);
    /** Walk the subtree of node h (level k, j-th of its level): its non-zero blocks, and whether all is good under it. */
    const walk = async (h: Hash, k: number, j: number): Promise<{ nonZero: number; clean: boolean }> => {
      if (isZeroHash(h)) return { nonZero: 0, clean: true };
      const remembered = cleanNodes.get(h);
      if (remembered !== undefined) return { nonZero: remembered, clean: true };
      const first = j * span(k);
      const node = await readNode(h, k);
      if ('code' in node) {
        problem('node', node.code, h, first);
        return { nonZero: 0, clean: false };
      }
      let nonZero = 0;
      let clean = true;
      if (k === 1) {
        const { children } = node;
        for (let i = 0; i < children.length; i += VERIFY_CONCURRENCY) {
          const part = children.slice(i, i + VERIFY_CONCURRENCY);
          const codes = await Promise.all(part.map((c) => (isZeroHash(c) ? null : checkBlock(c))));
          codes.forEach((c, n) => {
            if (isZeroHash(part[n]!)) return;
            nonZero++;
            if (c) {
              clean = false;
              problem('block', c, part[n]!, first + i + n);
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
      if (clean) cleanNodes.set(h, nonZero);
      else dirtyNodes.add(h.toString('latin1'));
      return { nonZero, clean };
    };
    await walk(shape.root, shape.height, 0);
  }
  report(true);
  return { snapshots: snaps.length, nodes, blocks, bytes, problems };
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

async function selectSnapshots(store: Store, filter: { volume?: string; snapshot?: string }): Promise<SnapshotRecord[]> {
  if (filter.snapshot !== undefined && filter.volume === undefined) {
    throw new TandemError('ERR_BAD_REQUEST', 'verify: a snapshot filter needs its volume (VOL@SNAPSHOT)');
  }
  if (filter.volume !== undefined) {
    if (filter.snapshot !== undefined) return [await store.resolveSnapshot(`${filter.volume}@${filter.snapshot}`)];
    const list = await store.listSnapshots(filter.volume);
    if (list.length === 0 && !(await store.getVolume(filter.volume))) await store.resolveSnapshot(filter.volume); // throws the right error
    return list;
  }
  const out: SnapshotRecord[] = [];
  for await (const v of store.db.values(namespaceRange(NS.snapshot))) out.push(JSON.parse(v.toString('utf8')) as SnapshotRecord);
  return out;
}
