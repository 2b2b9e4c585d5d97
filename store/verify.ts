/**
 * verify: re-read and re-hash every node and block reachable from the selected snapshots.
 *
 * Each node and block is checked once per run (a block shared by many snapshots is read once),
 * but a bad one is reported for every (volume, snapshot, block index) that reaches it, so the
 * operator sees exactly which restores it would break. Block records are checked end to end:
 * header, CRC-32 of the record, and BLAKE3 of the payload against the hash the index names.
 */
import { TandemError, isTandemError } from '../common/errors.js';
import { isZeroHash, toHex, blake3 } from './hash.js';
import { blockKey, nodeKey, namespaceRange, NS, decodeLocation } from './keys.js';
import { decodePayload, decodeRecord, recordLength } from './pack.js';
import { decodeNode, FANOUT, span } from './tree.js';
import type { Store } from './store.js';
import { shapeOf } from './store.js';
import type { Hash, SnapshotRecord, VerifyProblem, VerifyReport } from './types.js';

/** Blocks of one level-1 node read concurrently. */
const VERIFY_CONCURRENCY = 8;

/**
 * At most this many good block hashes are remembered to skip re-reading shared blocks; beyond it
 * the memory is released and shared blocks may be read again (slower, never wrong).
 */
const MAX_REMEMBERED_BLOCKS = 1_000_000;

type Code = VerifyProblem['code'];

export async function verifyStore(store: Store, filter: { volume?: string; snapshot?: string } = {}): Promise<VerifyReport> {
  const snaps = await selectSnapshots(store, filter);
  const nodeResults = new Map<string, Code | null>();
  let goodBlocks = new Set<string>();
  const badBlocks = new Map<string, Code>();
  const problems: VerifyProblem[] = [];
  let nodes = 0;
  let blocks = 0;
  let bytes = 0;

  const checkNode = async (h: Hash, level: number): Promise<{ code: Code | null; children?: Hash[] }> => {
    const key = h.toString('latin1');
    const known = nodeResults.get(key);
    if (known) return { code: known };
    const v = await store.db.get(nodeKey(h));
    let code: Code | null = null;
    let children: Hash[] | undefined;
    if (v === undefined) code = 'ERR_NODE_MISSING';
    else {
      const n = decodeNode(h, v);
      if (!n || n.level !== level) code = 'ERR_NODE_CORRUPT';
      else children = [...n.children];
    }
    if (!nodeResults.has(key)) nodes++;
    nodeResults.set(key, code);
    return { code, children };
  };

  const checkBlock = async (h: Hash): Promise<Code | null> => {
    const key = h.toString('latin1');
    if (goodBlocks.has(key)) return null;
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
    else {
      if (goodBlocks.size >= MAX_REMEMBERED_BLOCKS) goodBlocks = new Set();
      goodBlocks.add(key);
    }
    return code;
  };

  for (const snap of snaps) {
    const report = (kind: 'block' | 'node', code: Code, h: Hash, blockIndex: number) =>
      problems.push({ kind, code, hash: toHex(h), volume: snap.volume, snapshot: snap.id, blockIndex });
    const shape = shapeOf(snap);
    const walk = async (h: Hash, k: number, j: number): Promise<void> => {
      if (isZeroHash(h)) return;
      const first = j * span(k);
      const { code, children } = await checkNode(h, k);
      if (code) return void report('node', code, h, first);
      if (!children) return; // verified earlier in this run, and good
      if (k === 1) {
        for (let i = 0; i < children.length; i += VERIFY_CONCURRENCY) {
          const part = children.slice(i, i + VERIFY_CONCURRENCY);
          const codes = await Promise.all(part.map((c) => (isZeroHash(c) ? null : checkBlock(c))));
          codes.forEach((c, n) => c && report('block', c, part[n]!, first + i + n));
        }
        return;
      }
      for (let c = 0; c < children.length; c++) await walk(children[c]!, k - 1, j * FANOUT + c);
    };
    await walk(shape.root, shape.height, 0);
  }
  return { snapshots: snaps.length, nodes, blocks, bytes, problems };
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
