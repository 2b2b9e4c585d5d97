/**
 * `appliance repair [VOL[@SNAP]] --peer NAME`: heal what verify finds wrong in this store with
 * good copies from the paired appliance.
 *
 * A sync cannot do it: the store still names a damaged block's hash, so a sync from the peer
 * finds it "held" and sends nothing. Repair runs verify, then:
 * - each damaged or missing block is fetched from the peer by its hash (verified on arrival,
 *   and again by the store), appended anew, and the index is pointed at the good copy
 *   (Store.repairBlocks; gc later reclaims the damaged record's bytes);
 * - each damaged or missing tree node is fetched with the part of its subtree this store lacks
 *   (nodes and blocks), and put back bottom-up (a node in the index implies its subtree is here);
 * then verifies the same snapshots again and reports what is left. What the peer does not hold,
 * or holds damaged too, stays listed: nothing is written for it.
 */
import { TandemError, isTandemError } from '../common/errors.js';
import { isZeroHash, parseHex, toHex } from '../store/hash.js';
import type { Store } from '../store/store.js';
import type { BlockFrame, Hash, TreeNode, VerifyProblem, VerifyProgress, VerifyReport } from '../store/types.js';
import { connectPeer, getPeer } from './peers.js';
import type { RemotePeer } from '../api/client.js';
import { recordDamage } from './damage.js';

/** Meta namespace of the last repair's outcome (key `last`: peer, time, counts). */
export const REPAIR_NS = 'repair';

export interface RepairReport {
  /** What verify found before the repair. */
  readonly before: VerifyReport;
  readonly blocksRepaired: number;
  readonly nodesRepaired: number;
  /** Hashes the peer could not give a good copy of, with why. */
  readonly unrepaired: ReadonlyArray<{ readonly kind: 'block' | 'node'; readonly hash: string; readonly code: string; readonly message: string }>;
  /** What verify finds after it. */
  readonly after: VerifyReport;
}

export async function repairStore(
  store: Store,
  peerName: string,
  filter: { volume?: string; snapshot?: string },
  opts: { onNotice?: (m: string) => void; onVerifyProgress?: (pass: 'before' | 'after', p: VerifyProgress) => void } = {},
): Promise<RepairReport> {
  await getPeer(store, peerName); // an unknown peer is refused before anything is read
  const verify = (pass: 'before' | 'after') => store.verify(filter, opts.onVerifyProgress ? { onProgress: (p) => opts.onVerifyProgress!(pass, p) } : {});
  const before = await verify('before');
  const healed = await healProblems(store, peerName, before.problems, opts);
  const after = healed.blocksRepaired + healed.nodesRepaired > 0 || healed.unrepaired.length > 0 ? await verify('after') : before;
  await recordDamage(store, after, filter.volume === undefined);
  return { before, ...healed, after };
}

export type HealReport = Pick<RepairReport, 'blocksRepaired' | 'nodesRepaired' | 'unrepaired'>;

/**
 * Fetch good copies of what `problems` (a verify's) name from peer `peerName` and put them back.
 * Each copy is verified before it is written (by the client as it arrives, and by the store).
 */
export async function healProblems(store: Store, peerName: string, problems: readonly VerifyProblem[], opts: { onNotice?: (m: string) => void } = {}): Promise<HealReport> {
  const peerRecord = await getPeer(store, peerName);
  const unrepaired: Array<RepairReport['unrepaired'][number]> = [];
  // A tree that does not fit its snapshot (a good block in the wrong place, a node of the wrong
  // width, a wrong count of non-zero blocks) has no better copy to fetch: the snapshot is the fault.
  for (const p of problems) {
    if (p.code !== 'ERR_SNAPSHOT_INVALID') continue;
    unrepaired.push({ kind: p.kind, hash: p.hash, code: p.code, message: `${p.volume}@${p.snapshot}, block ${p.blockIndex}: ${p.detail ?? 'its tree does not fit the snapshot'}; no copy heals that: delete the snapshot (\`appliance snapshots ${p.volume} --delete ${p.snapshot}\`) and sync again from a sound appliance` });
  }
  const healable = problems.filter((p) => p.code !== 'ERR_SNAPSHOT_INVALID');
  const unique = (kind: VerifyProblem['kind']) => [...new Map(healable.filter((p) => p.kind === kind).map((p) => [p.hash, Buffer.from(p.hash, 'hex')])).values()];
  const blocks = unique('block');
  const nodes = unique('node');
  let blocksRepaired = 0;
  let nodesRepaired = 0;
  if (blocks.length + nodes.length === 0) return { blocksRepaired, nodesRepaired, unrepaired };
  const peer = connectPeer(peerRecord);
  /** Good copies of `hashes` from the peer; one it has none of (or a damaged one) is listed as unrepaired. Other peer failures stop the repair. */
  async function* goodCopies(hashes: readonly Hash[]): AsyncGenerator<BlockFrame> {
    for (const h of hashes) {
      try {
        let got = false;
        for await (const f of peer.getBlocks([h])) {
          got = true;
          yield f;
        }
        if (!got) throw new TandemError('ERR_PEER_PROTOCOL', `peer ${peerName} answered with no block for ${toHex(h)}`);
      } catch (e) {
        if (!isTandemError(e, 'ERR_BLOCK_MISSING') && !isTandemError(e, 'ERR_BLOCK_CORRUPT')) throw e;
        unrepaired.push({ kind: 'block', hash: toHex(h), code: e.code, message: `peer ${peerName}: ${e.message}` });
      }
    }
  }
  try {
    // Damaged or missing blocks: replaced in place (Store.repairBlocks points the index at the good copy).
    blocksRepaired += await store.repairBlocks(goodCopies(blocks));

    // Damaged or missing nodes: each with the part of its subtree this store lacks, bottom-up.
    const restoreNode = async (h: Hash): Promise<boolean> => {
      let node: TreeNode;
      try {
        [node] = (await peer.getNodes([h])) as [TreeNode];
      } catch (e) {
        if (!isTandemError(e) || !['ERR_NODE_MISSING', 'ERR_NODE_CORRUPT', 'ERR_NOT_FOUND'].includes(e.code)) throw e;
        unrepaired.push({ kind: 'node', hash: toHex(h), code: e.code, message: `peer ${peerName}: ${e.message}` });
        return false;
      }
      const children = node.children.filter((c) => !isZeroHash(c));
      if (node.level === 1) {
        // The children are in the index before their node.
        const held = await store.hasBlocks(children);
        const missing = unrepaired.length;
        blocksRepaired += await store.repairBlocks(goodCopies(children.filter((_, i) => !held[i])));
        if (unrepaired.length > missing) return false;
      } else {
        const held = await store.hasNodes(children);
        for (const [i, c] of children.entries()) if (!held[i] && !(await restoreNode(c))) return false;
      }
      await store.putNodes([{ hash: node.hash, level: node.level, children: node.children }]);
      nodesRepaired++;
      return true;
    };
    for (const h of nodes) {
      opts.onNotice?.(`fetching tree node ${toHex(h)} and what this store lacks under it from ${peerName}`);
      await restoreNode(h);
    }
  } finally {
    await peer.close();
  }
  // A synced write: it also makes the nodes put above durable (the index's log is written in order).
  await store.putMeta(REPAIR_NS, 'last', { peer: peerName, at: new Date().toISOString(), blocksRepaired, nodesRepaired, unrepaired: unrepaired.length });
  return { blocksRepaired, nodesRepaired, unrepaired };
}

export interface PushRepairReport {
  /** When the peer's last verify ended, and what it found. */
  readonly peerVerifiedAt: string;
  readonly peerDamagedBlocks: number;
  readonly peerDamagedNodes: number;
  /** Good copies sent, and how many the peer wrote. */
  readonly blocksSent: number;
  readonly blocksRepaired: number;
  /** Blocks this store does not hold, or holds damaged too (hex). */
  readonly notHeld: readonly string[];
  readonly damagedHere: readonly string[];
  /** Tree nodes put back there (each with what the peer lacked under it), and those this store could not give (not held, or damaged here too; hex). */
  readonly nodesRepaired: number;
  readonly nodesNotRepaired: readonly string[];
}

/**
 * Heal the peer's store with this store's copies of the blocks and tree nodes its last verify
 * found damaged or missing (GET /v1/damage, POST /v1/blocks/repair, POST /v1/nodes/put): the way
 * to heal the cloud appliance's store from on-premises, which reaches it anyway. Each copy is
 * read verified here and verified again there. A node goes after the blocks, lowest level first,
 * each after what the peer lacks under it (a node in an index implies its whole subtree).
 */
export async function pushRepairs(store: Store, peerName: string): Promise<PushRepairReport> {
  const peer = connectPeer(await getPeer(store, peerName));
  try {
    return await pushRepairsTo(store, peer, peerName);
  } finally {
    await peer.close();
  }
}

/** {@link pushRepairs} over a connection already open (a scheduled sync's: appliance/scheduler/steps.ts). */
export async function pushRepairsTo(store: Store, peer: RemotePeer, peerName: string): Promise<PushRepairReport> {
  const damage = await peer.damage();
  const hashes = damage.blocks.map(parseHex);
  if (!hashes.every((h) => h !== undefined)) throw new TandemError('ERR_PEER_PROTOCOL', `peer ${peerName} listed damaged blocks that are not hashes`);
  const held = hashes.length > 0 ? await store.hasBlocks(hashes as Hash[]) : [];
  const notHeld = hashes.filter((_, i) => !held[i]).map((h) => toHex(h!));
  const damagedHere: string[] = [];
  let blocksSent = 0;
  /** This store's copies (read verified); one damaged here too is named, not sent. */
  async function* localCopies(of: readonly Hash[]): AsyncGenerator<BlockFrame> {
    for (const h of of) {
      try {
        for await (const f of store.getBlocks([h])) {
          blocksSent++;
          yield f;
        }
      } catch (e) {
        if (!isTandemError(e, 'ERR_BLOCK_CORRUPT') && !isTandemError(e, 'ERR_BLOCK_MISSING')) throw e;
        damagedHere.push(toHex(h));
      }
    }
  }
  // One stream; the peer writes it in batches (Store.repairBlocks).
  let blocksRepaired = held.some(Boolean) ? (await peer.repairBlocks(localCopies(hashes.filter((_, i) => held[i]) as Hash[]))).repaired : 0;

  const nodeHashes = damage.nodes.map(parseHex);
  if (!nodeHashes.every((h) => h !== undefined)) throw new TandemError('ERR_PEER_PROTOCOL', `peer ${peerName} listed damaged tree nodes that are not hashes`);
  let nodesRepaired = 0;
  const nodesNotRepaired: string[] = [];
  /** This store's copy of a node; null (and named) when it has none, or a damaged one. */
  const localNode = async (h: Hash): Promise<TreeNode | null> => {
    try {
      return (await store.getNodes([h]))[0]!;
    } catch (e) {
      if (!isTandemError(e, 'ERR_NODE_MISSING') && !isTandemError(e, 'ERR_NODE_CORRUPT')) throw e;
      nodesNotRepaired.push(toHex(h));
      return null;
    }
  };
  /** Put `node` back on the peer after what it lacks under it; false when something under it could not be given. */
  const pushNode = async (node: TreeNode): Promise<boolean> => {
    const children = node.children.filter((c) => !isZeroHash(c));
    if (node.level === 1) {
      const there = await peer.hasBlocks(children);
      const lacking = children.filter((_, i) => !there[i]);
      if (lacking.length > 0) {
        const mine = await store.hasBlocks(lacking);
        if (!mine.every(Boolean)) {
          nodesNotRepaired.push(toHex(node.hash));
          return false;
        }
        const before = damagedHere.length;
        blocksRepaired += (await peer.repairBlocks(localCopies(lacking))).repaired;
        if (damagedHere.length > before) {
          nodesNotRepaired.push(toHex(node.hash));
          return false;
        }
      }
    } else {
      const there = await peer.hasNodes(children);
      for (const [i, c] of children.entries()) {
        if (there[i]) continue;
        const child = await localNode(c);
        if (!child || !(await pushNode(child))) {
          nodesNotRepaired.push(toHex(node.hash));
          return false;
        }
      }
    }
    await peer.putNodes([{ hash: node.hash, level: node.level, children: node.children }]); // the peer takes it off its damage list
    nodesRepaired++;
    return true;
  };
  const nodes: TreeNode[] = [];
  for (const h of nodeHashes as Hash[]) {
    const n = await localNode(h);
    if (n) nodes.push(n);
  }
  for (const n of nodes.sort((x, y) => x.level - y.level)) await pushNode(n);
  return { peerVerifiedAt: damage.at, peerDamagedBlocks: damage.blocks.length, peerDamagedNodes: damage.nodes.length, blocksSent, blocksRepaired, notHeld, damagedHere, nodesRepaired, nodesNotRepaired };
}
