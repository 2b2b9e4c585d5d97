/**
 * The sync engine: copy one snapshot from a source store to a target store, moving only what the
 * target lacks. Both sides are {@link ReplicaStore}s (the local Store, or a peer through
 * api/client's RemotePeer), so push and pull are the same code with the roles swapped.
 *
 * Steps (sync/README.md, "Engine"):
 * 1. target already has the snapshot → done.
 * 2. target has the root node → its whole tree is there: commit only.
 * 3. Walk the source tree level by level from the root. For each level, ask the target which
 *    child nodes it lacks (all of a level in batched requests) and descend only into those.
 *    With a base (a snapshot the target holds in full, usually the last one synced), children
 *    equal to the base's at the same position are known present and not asked about.
 * 4. Level-1 nodes are handled in windows: ask which of their blocks the target lacks, stream
 *    exactly those (source.getBlocks → target.putBlocks, both bounded), then put the window's
 *    level-1 nodes. Upper nodes go last, bottom-up, then the snapshot is committed.
 * A push of a snapshot just taken, to a target that holds the base (`fresh`), skips step 1 and the
 * node questions of step 3; blocks early sending saw stored there (`atTarget`) are not asked about.
 *
 * Crash safety and resumption come from the target's invariant "a node is present only when its
 * whole subtree is": a rerun skips every complete subtree and every block already stored, so
 * nothing stored is sent twice. Memory is bounded by the window, not by the volume.
 */
import { linkedAbort } from '../common/abort.js';
import { abortError, TandemError } from '../common/errors.js';
import { ZERO_HASH } from '../store/index.js';
import type { BlockFrame, Hash, NodeToPut, ReplicaStore, SnapshotRecord, TreeNode } from '../store/types.js';
import { DeltaSizes, frameBlockLength, MAX_HASHES_PER_REQUEST, MAX_NODES_PER_REQUEST, batches, fromHex, toHex } from './protocol.js';
import { trace } from './trace.js';

/** Level-1 nodes per window: with a 256 fanout that is up to 256 Ki block hashes (8 MiB) in memory. */
const WINDOW_NODES = 1024;
/**
 * Block streams run at once. Three keep both cores of a small appliance busy on either side and
 * fill a long fat pipe better than one TCP window; more only adds contention.
 */
const BLOCK_STREAMS = 3;
/** A stream is worth its own request (and fsync on the receiver) from this many blocks. */
const MIN_BLOCKS_PER_STREAM = 8;

export interface CopyProgress {
  readonly phase: 'walk' | 'blocks' | 'nodes' | 'commit' | 'done';
  /** Blocks streamed so far. */
  readonly blocksSent: number;
  /** Uncompressed bytes of those blocks. */
  readonly bytesSent: number;
  /** Best estimate of the blocks to send (grows exact as windows are resolved). */
  readonly blocksTotal: number;
  /** Best estimate of the bytes to send. */
  readonly bytesTotal: number;
}

export interface CopyOptions {
  /**
   * A snapshot of the same volume that the target is known to hold in full and the source can
   * read (the last one synced): subtrees and blocks equal to the base's at the same position are
   * not asked about, so a small change asks the target about the changed blocks only, not every
   * block under a changed level-1 node. Ignored unless its tree has the same shape.
   */
  readonly base?: SnapshotRecord | null;
  /**
   * Where the base's nodes are read: the source (the default, a push's local store), or the
   * target when it is the local one (a pull: the target holds its own snapshots in full, and the
   * source may no longer hold the base).
   */
  readonly baseFrom?: 'source' | 'target';
  /**
   * The target lacks this snapshot and holds `base` in full, and the caller knows it without
   * asking: a push of a snapshot just taken, whose base the target's lock answer named as its
   * latest (appliance/replicate.ts). The engine then asks the target nothing about the snapshot or
   * its nodes: the nodes that differ from the base's go (putting one it holds does no harm), a
   * round trip saved per level and two at the start. Ignored without a usable base. Not for the
   * rerun of a push that stopped midway: the nodes it put may be there, and asked about, none is
   * sent twice (appliance/push-attempts.ts tells the two apart).
   */
  readonly fresh?: boolean;
  /**
   * Blocks known to be at the target already, by the hash's latin1 string (early sending's, sync/
   * early.ts): not asked about. One it lacks after all makes its node's put fail
   * (ERR_SNAPSHOT_INCOMPLETE), storing nothing: the target checks every node's children.
   */
  readonly atTarget?: ReadonlySet<string>;
  /** Walk and count, but put and commit nothing. */
  readonly dryRun?: boolean;
  readonly onProgress?: (p: CopyProgress) => void;
  readonly signal?: AbortSignal;
}

export interface CopyResult {
  readonly nodesSent: number;
  readonly blocksSent: number;
  /** Uncompressed bytes of the blocks sent (the wire may carry fewer). */
  readonly bytesSent: number;
  /** Calls made to either store (each is one request when that store is a peer). */
  readonly requests: number;
  /** The target had the snapshot already: nothing was done. */
  readonly alreadyPresent: boolean;
}

function isZero(h: Hash): boolean {
  return h.equals(ZERO_HASH);
}

/**
 * Copy `snap` from `source` to `target`. Idempotent and resumable; safe to rerun after a crash of
 * either side. Not safe to run twice at once for the same volume (callers hold the volume lock).
 */
export async function copySnapshot(source: ReplicaStore, target: ReplicaStore, snap: SnapshotRecord, opts: CopyOptions = {}): Promise<CopyResult> {
  try {
    return await copyOnce(source, target, snap, opts);
  } catch (e) {
    // Stopped (`signal`): whatever the stream cut short says, the reason is the stop.
    throw opts.signal?.aborted ? stopError(opts.signal) : e;
  }
}

/** The error a stopped copy ends with: the stop's own reason when it is one of ours, else ERR_INTERRUPTED. */
function stopError(signal: AbortSignal): TandemError {
  return abortError(signal, 'sync stopped before its commit; rerun it to resume');
}

async function copyOnce(source: ReplicaStore, target: ReplicaStore, snap: SnapshotRecord, opts: CopyOptions): Promise<CopyResult> {
  let requests = 0;
  let nodesSent = 0;
  let blocksSent = 0;
  let bytesSent = 0;
  let blocksTotal = 0;
  const blockSize = snap.blockSize;
  const check = () => {
    if (opts.signal?.aborted) throw stopError(opts.signal);
  };
  const progress = (phase: CopyProgress['phase']) =>
    opts.onProgress?.({ phase, blocksSent, bytesSent, blocksTotal, bytesTotal: blocksTotal * blockSize });
  const result = (alreadyPresent: boolean): CopyResult => {
    progress('done');
    return { nodesSent, blocksSent, bytesSent, requests, alreadyPresent };
  };

  const root = fromHex(snap.root);
  const base = opts.base && sameShape(opts.base, snap) ? opts.base : null;
  const fresh = opts.fresh === true && base !== null && !opts.dryRun;
  let rootPresent = isZero(root); // an all-zero volume's: no node to send
  if (!fresh) {
    // Both questions at once: one round trip instead of two (a peer serves them in parallel).
    requests += 2;
    const [existing, [present]] = await Promise.all([target.getSnapshot(snap.volume, snap.id), target.hasNodes([root])]);
    if (existing) return result(true);
    rootPresent = present === true;
    trace(`engine: snapshot absent, root present=${rootPresent}`);
  }

  /** Nodes whose subtrees are stored on the target, in bottom-up order, waiting to fill a putNodes request. */
  const queued: NodeToPut[] = [];
  const putQueued = async (all: boolean) => {
    while (queued.length >= MAX_NODES_PER_REQUEST || (all && queued.length > 0)) {
      check();
      requests++;
      await target.putNodes(queued.splice(0, MAX_NODES_PER_REQUEST));
    }
  };

  if (!rootPresent) {
    /** Nodes above level 1 that the target lacks, by level, fetched on the way down and put on the way up. */
    const upper: NodeToPut[][] = [];
    let frontier: Hash[] = [root];
    let level = snap.height;
    const baseStore = opts.baseFrom === 'target' ? target : source;
    const deltas = base !== null && (source.deltas === true || target.deltas === true);
    /** For a node of the frontier, the base's node at the same position (hex of the node → base node hash). */
    let pairs = new Map<string, Hash>();
    if (base) pairs.set(toHex(root), fromHex(base.root));
    /**
     * The source's nodes at `hashes`, each with its base's node (read from `baseStore` first, so
     * that a peer source sends only the children that differ from it: api/client.ts getNodes).
     * The walk compares their children with the base's, and the target skips looking up the
     * children the two share (its invariant: it holds the base node's whole subtree, when it
     * holds the node); a peer target is sent only the children that differ (putNodes).
     */
    const fetchWithBase = async (hashes: Hash[]): Promise<NodeToPut[]> => {
      const baseOf = hashes.map((h) => {
        const b = pairs.get(toHex(h));
        return b && !isZero(b) ? b : undefined;
      });
      const baseHashes = unique(baseOf.filter((h): h is Hash => h !== undefined));
      const baseNodes = new Map<string, TreeNode>();
      if (baseHashes.length > 0) for (const b of await getNodes(baseStore, baseHashes, () => requests++)) baseNodes.set(toHex(b.hash), b);
      const known = baseOf.map((b) => (b ? baseNodes.get(toHex(b)) : undefined));
      const nodes = await getNodes(source, hashes, () => requests++, known);
      return nodes.map((n, i) => {
        const b = known[i];
        return b ? { ...n, base: b.hash, baseChildren: b.children } : n;
      });
    };
    /** The children of `nodes` that are not the base's child at the same position, and their new pairs. */
    const changedChildren = (nodes: NodeToPut[]): { children: Hash[]; next: Map<string, Hash>; replaced: Map<string, Hash> } => {
      const children: Hash[] = [];
      const next = new Map<string, Hash>();
      /** Each changed child's base child, ZERO_HASH included (for a block: what a delta is made against). */
      const replaced = new Map<string, Hash>();
      for (const n of nodes) {
        n.children.forEach((c, i) => {
          if (isZero(c)) return;
          const bc = n.baseChildren?.[i];
          if (bc?.equals(c)) return; // part of the base, which the target holds in full
          children.push(c);
          if (bc) replaced.set(toHex(c), bc);
          if (bc && !isZero(bc)) next.set(toHex(c), bc);
        });
      }
      return { children: unique(children), next, replaced };
    };
    progress('walk');
    while (level > 1 && frontier.length > 0) {
      check();
      const nodes = await fetchWithBase(frontier);
      const { children, next } = changedChildren(nodes);
      upper.push(nodes);
      pairs = next;
      frontier = fresh ? children : await missing(children, (b) => target.hasNodes(b), () => requests++);
      level--;
      trace(`engine: walked to level ${level}: ${frontier.length} nodes missing`);
    }
    // frontier: level-1 nodes the target lacks. A rough total for the progress bar until windows resolve.
    const fanoutGuess = upper.length > 0 ? Math.max(...upper[upper.length - 1]!.map((n) => n.children.length)) : 1;
    let unresolved = frontier.length;
    blocksTotal = unresolved * fanoutGuess;
    if (level === 1) {
      for (const window of batches(frontier, WINDOW_NODES)) {
        check();
        const nodes = await fetchWithBase(window);
        const { children: blocks, replaced } = changedChildren(nodes);
        const atTarget = opts.atTarget;
        const unknown = atTarget && atTarget.size > 0 ? blocks.filter((b) => !atTarget.has(b.toString('latin1'))) : blocks;
        const lacking = await missing(unknown, (b) => target.hasBlocks(b), () => requests++);
        trace(`engine: window of ${window.length} level-1 nodes: ${lacking.length} of ${blocks.length} blocks lacking`);
        unresolved -= window.length;
        blocksTotal = blocksSent + lacking.length + unresolved * fanoutGuess;
        progress('blocks');
        if (opts.dryRun) {
          blocksSent += lacking.length;
          bytesSent += lacking.length * blockSize; // the last block may be short: an upper bound
        } else if (lacking.length > 0) {
          // Parallel streams, each a contiguous slice of the lacking blocks: one stream leaves
          // each side idle while the other works (reading packs, TLS, verifying, writing).
          // The first stream to fail ends the others at once (`halt`, which follows the stop too):
          // under a low bandwidth cap they would otherwise send their slices to the end first.
          const { controller: halt, unlink } = linkedAbort(opts.signal);
          const signal = halt.signal;
          /** A stop ends the stream (copySnapshot says why); so does another stream's failure. */
          const halted = () => {
            check();
            if (signal.aborted) throw signal.reason;
          };
          try {
            await allOrFirstError(slices(lacking, BLOCK_STREAMS, MIN_BLOCKS_PER_STREAM).map(async (slice) => {
              for (const part of batches(slice, MAX_HASHES_PER_REQUEST)) {
                halted();
                requests += 2;
                // The target verifies every block it stores: the source need not hash them too.
                // Read past the page cache: what the engine sends is mostly not cached (blocks new
                // to the store during this sync went early, from the cache, sync/early.ts), and a
                // 4 GiB transfer-only push took 14.9-15.0 s this way against 17.7-18.6 s (sender
                // CPU 8.4-8.6 s against 15.3-16.8, 2 alternated pairs).
                // With a peer on either side that takes deltas, each block names the base block it
                // replaced: it travels as the bytes that differ when the receiver holds that.
                const bases = deltas ? part.map((h) => replaced.get(toHex(h)) ?? null) : null;
                const deltaSizes = new DeltaSizes();
                const sent = (f: BlockFrame) => {
                  halted(); // the request fails
                  const length = frameBlockLength(f);
                  blocksSent++;
                  bytesSent += length;
                  deltaSizes.note(f, length);
                  if (blocksSent % 16 === 0) progress('blocks');
                };
                // A block the source holds as a delta of the very base named goes as that delta,
                // read without its base (GetBlocksOptions.storedDeltas).
                const withBases = bases?.some((b) => b) ? { bases, storedDeltas: target.deltas === true } : {};
                const r = await target.putBlocks(counted(source.getBlocks(part, { consumerVerifies: true, direct: true, signal, ...withBases }), sent), { signal });
                if (r.needWhole && r.needWhole.length > 0) {
                  // The receiver lacks those bases (a gc there, a damaged copy): the blocks go whole.
                  trace(`engine: ${r.needWhole.length} blocks sent again whole (their bases are not on the receiver)`);
                  requests += 2;
                  for (const h of r.needWhole) {
                    blocksSent--;
                    bytesSent -= deltaSizes.sizeOf(h);
                  }
                  await target.putBlocks(counted(source.getBlocks(r.needWhole, { consumerVerifies: true, direct: true, signal }), sent), { signal });
                }
              }
            }), (e) => {
              trace(`engine: a block stream failed (${(e as Error)?.message ?? String(e)}); the others are ended`);
              halt.abort(new TandemError('ERR_INTERRUPTED', 'another block stream of this sync failed'));
            });
          } finally {
            unlink();
          }
        }
        trace(`engine: blocks sent (${blocksSent})`);
        if (!opts.dryRun) {
          progress('nodes');
          // The window's blocks are stored: its level-1 nodes may go. Only full requests go now;
          // the rest travels with the next window's nodes or with the upper nodes below.
          queued.push(...nodes);
          await putQueued(false);
        }
        nodesSent += nodes.length;
        trace('engine: level-1 nodes put');
      }
      blocksTotal = blocksSent;
    }
    // Upper nodes bottom-up, after the level-1 nodes still queued: every node's children are
    // stored by an earlier request or travel in the same one (putNodes accepts nodes of one call
    // that reference each other), so a small change's nodes take one request, not one per level.
    for (let i = upper.length - 1; i >= 0; i--) {
      const nodes = upper[i]!;
      if (!opts.dryRun) queued.push(...nodes);
      nodesSent += nodes.length;
    }
    // What is left of them (under a full request) goes with the commit where the target takes it so.
    await putQueued(!target.commitWithNodes);
  }
  if (!opts.dryRun) {
    check();
    progress('commit');
    trace(queued.length > 0 ? `engine: nodes put but ${queued.length}, which go with the commit` : 'engine: upper nodes put');
    requests++;
    if (queued.length > 0 && target.commitWithNodes) await target.commitWithNodes(snap, queued.splice(0));
    else await target.commitSnapshot(snap);
    trace('engine: committed');
  }
  return result(false);
}

/**
 * The base of a push ({@link CopyOptions.base}): the target's latest snapshot `theirs` (as its
 * lock answer or latestSnapshot names it), when the source holds it with the same root. Null when
 * the target has none or the source lacks it (pruned by retention, say).
 */
export async function heldBase(source: ReplicaStore, theirs: SnapshotRecord | null | undefined): Promise<SnapshotRecord | null> {
  if (!theirs) return null;
  const mine = await source.getSnapshot(theirs.volume, theirs.id);
  return mine && mine.root === theirs.root ? mine : null;
}

/** `items` cut into at most `n` contiguous slices of at least `min` items (one slice when few). */
function slices<T>(items: readonly T[], n: number, min: number): T[][] {
  const count = Math.max(1, Math.min(n, Math.floor(items.length / min)));
  const size = Math.ceil(items.length / count);
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/**
 * Wait for every task (none is left running behind the caller's back), then throw the failure
 * that came first in time: a later one is often its consequence. (The first in the tasks' order
 * was thrown before: a stream the peer turned away with ERR_SERVER_BUSY was reported as the
 * ERR_PEER_UNREACHABLE of an earlier slice's stream whose connection was cut after it.)
 * `onFirstError` is called at the first failure, to end the other tasks early.
 */
async function allOrFirstError(tasks: Promise<void>[], onFirstError?: (reason: unknown) => void): Promise<void> {
  let first: { reason: unknown } | undefined;
  await Promise.all(
    tasks.map((task) =>
      task.catch((reason: unknown) => {
        if (first) return;
        first = { reason };
        onFirstError?.(reason);
      }),
    ),
  );
  if (first) throw first.reason;
}

/** Trees of the same height and block size pair up position by position. */
function sameShape(a: SnapshotRecord, b: SnapshotRecord): boolean {
  return a.volume === b.volume && a.height === b.height && a.blockSize === b.blockSize && a.size === b.size;
}

function unique(hashes: Hash[]): Hash[] {
  const seen = new Set<string>();
  const out: Hash[] = [];
  for (const h of hashes) {
    const k = toHex(h);
    if (!seen.has(k)) {
      seen.add(k);
      out.push(h);
    }
  }
  return out;
}

/** `known`: for each hash, a node the caller holds that the one asked for may share children with (see ReplicaStore.getNodes). */
async function getNodes(source: ReplicaStore, hashes: Hash[], count: () => void, known?: ReadonlyArray<TreeNode | undefined>): Promise<TreeNode[]> {
  const out: TreeNode[] = [];
  for (let i = 0; i < hashes.length; i += MAX_NODES_PER_REQUEST) {
    count();
    const part = hashes.slice(i, i + MAX_NODES_PER_REQUEST);
    const alike = known?.slice(i, i + MAX_NODES_PER_REQUEST);
    out.push(...(await (alike?.some((k) => k !== undefined) ? source.getNodes(part, alike) : source.getNodes(part))));
  }
  return out;
}

async function missing(hashes: Hash[], has: (b: Hash[]) => Promise<boolean[]>, count: () => void): Promise<Hash[]> {
  const out: Hash[] = [];
  for (const part of batches(hashes, MAX_HASHES_PER_REQUEST)) {
    count();
    const present = await has(part);
    part.forEach((h, i) => {
      if (!present[i]) out.push(h);
    });
  }
  return out;
}

async function* counted(frames: AsyncIterable<BlockFrame>, each: (f: BlockFrame) => void): AsyncGenerator<BlockFrame> {
  for await (const f of frames) {
    each(f);
    yield f;
  }
}
