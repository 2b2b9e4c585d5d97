/**
 * Types-only module: the store's records and the role interfaces other folders code against.
 *
 * Vocabulary (see ../shared/DESIGN.md and store/README.md):
 * - block: a fixed-size piece of a volume; the last block of a volume may be short.
 * - block hash: BLAKE3-256 of the block's bytes; its address in the store.
 * - ZERO_HASH (32 zero bytes) stands in a tree for a block of all zeros of any length:
 *   such a block is never stored and never sent.
 * - node: a tree node; level 1 nodes list block hashes, level k > 1 nodes list level k-1
 *   node hashes. Nodes are content-addressed and shared between snapshots.
 * - snapshot: a tree root plus metadata ({@link SnapshotRecord}).
 */

import type { BlockRanges } from './block-ranges.js';

/** A 32-byte BLAKE3-256 digest. Keys and wire formats use the raw bytes; JSON uses lowercase hex. */
export type Hash = Buffer;

export interface TreeNode {
  /** Hash of the node (see store/README.md for the exact encoding that is hashed). */
  readonly hash: Hash;
  /** 1 = children are block hashes; k > 1 = children are level k-1 node hashes. */
  readonly level: number;
  /** 1..FANOUT child hashes, in volume order. */
  readonly children: readonly Hash[];
}

export interface SnapshotRecord {
  /** Time-sortable id, unique per store, kept unchanged when a snapshot is copied to a peer. */
  readonly id: string;
  readonly volume: string;
  /** Volume size in bytes (need not be a multiple of blockSize). */
  readonly size: number;
  readonly blockSize: number;
  /** Root node hash, lowercase hex. */
  readonly root: string;
  /** Height of the tree: the level of the root node. */
  readonly height: number;
  /** ISO-8601 time at which the volume was read (the recovery point). */
  readonly created: string;
  /** Id of the snapshot this one was built from, or null. */
  readonly parent: string | null;
  /** Where it came from: 'scan', 'changed-blocks', 'peer:NAME', 'ebs:snap-...'. */
  readonly origin: string;
  /** Number of non-zero blocks (for status, cost and progress estimates). */
  readonly nonZeroBlocks: number;
  /** Free-form labels (e.g. group id, drill marker). */
  readonly labels?: Readonly<Record<string, string>>;
}

export interface VolumeRecord {
  readonly name: string;
  /** Device or image path on this appliance; absent for a volume that only exists as replicas. */
  readonly path?: string;
  readonly blockSize: number;
  /** Last known size in bytes. */
  readonly size: number;
  /** Explicit policy name; policies may also match by name glob or tag (config). */
  readonly policy?: string;
  readonly tags?: readonly string[];
  readonly created: string;
  /** Set while a restore/apply is writing the volume; such a volume is not a sync source. */
  readonly materializing?: { readonly snapshot: string; readonly since: string };
}

/** Read side of blocks. */
export interface BlockSource {
  /** For each hash, whether the store holds that block. ZERO_HASH is always "held". */
  hasBlocks(hashes: readonly Hash[]): Promise<boolean[]>;
  /** The block's bytes, verified against the hash. Throws ERR_BLOCK_MISSING / ERR_BLOCK_CORRUPT. */
  getBlock(hash: Hash): Promise<Buffer>;
}

/** Write side of blocks. */
export interface BlockSink {
  /**
   * Verify BLAKE3(data) === hash (ERR_BLOCK_CORRUPT otherwise, nothing stored) and store the block
   * unless present. Idempotent. Durable only after {@link flush} resolves.
   */
  putBlock(hash: Hash, data: Buffer): Promise<void>;
  /** Make every block put so far durable (fsync packs, write index entries). */
  flush(): Promise<void>;
}

export interface NodeSource {
  hasNodes(hashes: readonly Hash[]): Promise<boolean[]>;
  /**
   * Nodes in the order asked; throws ERR_NODE_MISSING for an absent one. `known`: for some of
   * them, a node the caller holds at the same position of an earlier tree (its base), which a
   * peer uses to send only the children that differ from it; a store ignores it.
   */
  getNodes(hashes: readonly Hash[], known?: ReadonlyArray<TreeNode | undefined>): Promise<TreeNode[]>;
}

/**
 * A node to store, with the node at its position in an earlier tree of the volume (the sync's
 * base snapshot) when the sender knows one. A target that holds that base node knows its whole
 * subtree is present, so the children the two share need no presence check there (a 1 % change
 * of a 4 GiB volume puts 31 level-1 nodes naming ~7,400 blocks, of which 82 are new).
 */
export interface NodeToPut extends TreeNode {
  readonly base?: Hash;
  /**
   * The children of the `base` node, when the sender has read them (the sync engine does): a
   * peer is then sent only the children that differ from them ({@link NodeChangeToPut}). A
   * store ignores it.
   */
  readonly baseChildren?: readonly Hash[];
}

/**
 * A node to store, given as its base node with some children replaced: every child not named in
 * `changed` is the base's child at the same index, and the node has as many children as the
 * base. A store rebuilds it from its copy of the base (which it must hold at the same level,
 * else ERR_SNAPSHOT_INCOMPLETE) and verifies the result against `hash` as any node. What a 1 %
 * change of 4 GiB puts (31 level-1 nodes) is then ~90 children instead of ~7,900.
 */
export interface NodeChangeToPut {
  readonly hash: Hash;
  readonly level: number;
  readonly base: Hash;
  /** [index, child] pairs, indices strictly increasing, each below the base's child count. */
  readonly changed: ReadonlyArray<readonly [number, Hash]>;
}

export interface NodeSink {
  /**
   * Store nodes (verified: the hash must match the encoding). A node is only stored when every
   * child it names is present (blocks for level 1, nodes above): "a node present implies its
   * whole subtree is present". Nodes in one call may reference each other (children first or not).
   * A child equal to the child at the same index of the node's `base`, when this store holds
   * that base at the same level, is present by that invariant and is not looked up.
   * Throws ERR_SNAPSHOT_INCOMPLETE naming the missing children otherwise, storing nothing.
   * A node may come as a change of its base ({@link NodeChangeToPut}): a store that lacks that
   * base throws ERR_SNAPSHOT_INCOMPLETE (send the node whole), storing nothing.
   */
  putNodes(nodes: ReadonlyArray<NodeToPut | NodeChangeToPut>): Promise<void>;
}

/** One block on its way between stores. */
export interface BlockFrame {
  readonly hash: Hash;
  readonly data: Buffer;
  /**
   * Set when `data` lives in a reusable buffer (sync/framing's BufferPool): the consumer that is
   * done with the bytes calls it once, and must not touch `data` afterwards. A consumer that never
   * calls it only costs an allocation.
   */
  readonly release?: () => void;
  /**
   * Sender side: the bytes of a block the receiver most likely holds (the block at the same
   * position of the sync's base snapshot), handed out by getBlocks when asked (`bases`). A
   * block stream to a peer sends the block as the ranges that differ from it (a delta frame,
   * sync/README.md "Framing"); `base.release` as `release`. A consumer that stores the block
   * ignores it (and releases it).
   */
  readonly base?: { readonly hash: Hash; readonly data: Buffer; readonly release?: () => void };
  /**
   * `data` is not the block but the patches of a delta frame, to be applied to a copy of the
   * block `base`, which yields `length` bytes. Receiver side: decoded from a stream that asked for
   * deltas; this store's putBlocks builds the block and verifies it against `hash`. Sender side:
   * a delta the store holds, handed out as it is (GetBlocksOptions.storedDeltas); a block stream
   * to a peer sends it as a delta frame.
   */
  readonly delta?: { readonly base: Hash; readonly length: number };
}

/** What {@link ReplicaStore.putBlocks} did. */
export interface PutBlocksResult {
  /** Blocks new to the store, and their bytes. */
  readonly stored: number;
  readonly bytes: number;
  /**
   * Blocks that came as deltas of a base this store does not hold (or cannot read): not stored;
   * send them whole. Absent or empty when there were none.
   */
  readonly needWhole?: Hash[];
}

/** How {@link ReplicaStore.getBlocks} checks the blocks it hands out. */
export interface GetBlocksOptions {
  /**
   * The consumer verifies every block against its BLAKE3 hash itself (a store's putBlocks does,
   * and so does a peer's store behind a block upload), so hashing it here too is CPU spent twice:
   * a local store then checks each pack record's CRC-32 and header instead (local damage is
   * still reported as such), and a peer's stream is not re-hashed by the client. Default false:
   * every block is verified against its hash before it is handed out.
   */
  readonly consumerVerifies?: boolean;
  /**
   * Read the packs with O_DIRECT, past the page cache (where the filesystem allows it): for a
   * reader of much data that is usually not cached and will not be read again soon (a restore,
   * the sync engine, a peer answering blocks/get). Default false: buffered reads, which find
   * blocks written a moment ago in the cache (early sending of the blocks a scan just stored).
   */
  readonly direct?: boolean;
  /**
   * For each hash, a block the consumer holds that it may differ little from (the block at the
   * same position of the sync's base snapshot; ZERO_HASH for an all-zero one), or null. A local
   * store attaches those it holds to the frames (`BlockFrame.base`) for a peer's block stream to
   * send deltas; a peer (api/client) asks for delta frames, which the consumer's store resolves.
   * Only given when one side is a peer that takes them ({@link ReplicaStore.deltas}).
   */
  readonly bases?: ReadonlyArray<Hash | null>;
  /**
   * With `bases`: a block the local store holds as a delta of the very base named for it is
   * handed out as that delta (`BlockFrame.delta`, `data` the patches), read without its base and
   * not diffed again. Only for a consumer that sends it to a peer that takes delta frames (the
   * peer's store builds the block from its own copy of the base and verifies it).
   */
  readonly storedDeltas?: boolean;
  /**
   * The bytes of blocks the caller holds in memory already, by the hash's latin1 string (a scan's
   * buffers, or copies of them: SnapshotOptions.onNewBlocks): handed out as they are rather than
   * read from the packs. The consumer verifies them (a peer's store does). A peer (api/client)
   * ignores it.
   */
  readonly held?: HeldBlocks;
  /**
   * Ends the stream early when aborted: a peer (api/client) drops its request, even one waiting
   * for a bandwidth cap's tokens; a local store hands out no further frame. The iteration then
   * throws the signal's reason (a TandemError) or ERR_INTERRUPTED.
   */
  readonly signal?: AbortSignal;
}

/** Options of {@link ReplicaStore.putBlocks}. */
export interface PutBlocksCallOptions {
  /**
   * Ends the upload early when aborted (the sync engine's other streams failed): a peer drops
   * its request, even one waiting for a bandwidth cap's tokens; nothing is committed by it, and
   * blocks stored before stay (each was verified). Throws the signal's reason or ERR_INTERRUPTED.
   */
  readonly signal?: AbortSignal;
}

/** Told the blocks a scan adds to the store, as it appends them (SnapshotOptions.onNewBlocks). */
export type NewBlocksListener = (hashes: Hash[], direct: boolean, replaced: Array<Hash | null>, views?: Buffer[], kept?: boolean, patches?: Array<Buffer | undefined>) => void | Promise<void>;

/**
 * Blocks a caller holds in memory, by the hash's latin1 string (GetBlocksOptions.held). `take`
 * hands a block's bytes over: a `release` that comes with them is called once the consumer is
 * done with the bytes (the holder may then reuse the buffer, and takes no block out twice).
 */
export interface HeldBlocks {
  has(key: string): boolean;
  take(key: string): { readonly data: Buffer; readonly release?: () => void } | undefined;
  /**
   * The patches (store/delta.ts) that make the block of `base`, when the holder has them (a
   * scan's diff against the block it replaced), and the block's length; handed over once.
   */
  takePatches?(key: string, base: Hash): { readonly patches: Buffer; readonly length: number } | undefined;
  /** Whether {@link takePatches} would hand patches of `base` over. */
  hasPatches?(key: string, base: Hash): boolean;
}

/**
 * What the sync engine needs of either side. The local store implements it; so does the HTTP
 * client of a peer (api/client). "A peer is just another store."
 */
export interface ReplicaStore extends NodeSource, NodeSink {
  hasBlocks(hashes: readonly Hash[]): Promise<boolean[]>;
  /** Verified blocks (see {@link GetBlocksOptions}) in the order asked. Must not buffer more than a bounded window. */
  getBlocks(hashes: readonly Hash[], opts?: GetBlocksOptions): AsyncIterable<BlockFrame>;
  /** Store a stream of blocks (each verified on arrival) durably; returns what was new. */
  putBlocks(frames: AsyncIterable<BlockFrame>, opts?: PutBlocksCallOptions): Promise<PutBlocksResult>;
  /**
   * Set (true) by a peer that takes and sends delta frames (api/client.ts: it said so in its
   * answers' `x-tandem-features`): the engine then names each block's base. A local store
   * leaves it unset: between two local stores whole blocks are as cheap.
   */
  readonly deltas?: boolean;
  /**
   * False when putBlocks may drop a frame's `release` (a peer under a bandwidth cap slices each
   * payload and lets the buffer be collected): early sending then lends it no copies, which would
   * not come back (sync/early.ts). A local store releases each frame once written.
   */
  readonly releasesFrames?: boolean;
  /** The latest snapshot of a volume, or null. */
  latestSnapshot(volume: string): Promise<SnapshotRecord | null>;
  getSnapshot(volume: string, id: string): Promise<SnapshotRecord | null>;
  /**
   * Commit a snapshot whose root node (and so its whole tree) is present; registers the volume
   * if new. Idempotent for the same record. ERR_SNAPSHOT_INCOMPLETE if the root is absent.
   */
  commitSnapshot(record: SnapshotRecord): Promise<void>;
  /**
   * Optional: {@link NodeSink.putNodes} of the snapshot's last nodes (at most
   * MAX_NODES_PER_REQUEST) and {@link commitSnapshot}, as one call. A peer makes it one request
   * where it can (api/client.ts); the engine otherwise puts, then commits.
   */
  commitWithNodes?(record: SnapshotRecord, nodes: ReadonlyArray<NodeToPut | NodeChangeToPut>): Promise<void>;
}

/** A volume being read (image file, block device, EBS snapshot). */
export interface VolumeReader {
  readonly size: number;
  /**
   * Set by readers of a local regular file or block device ({@link kind} set too) whose read()
   * returns exactly the bytes of that path: scanVolume then has its hash workers read the path
   * themselves (each block read and hashed on one thread while it is in cache) instead of
   * calling read(). A reader that transforms or fakes the data must not set them.
   */
  readonly path?: string;
  readonly kind?: 'file' | 'device';
  /**
   * Byte ranges [start, end) known to read as zeros (the holes of a sparse file), ascending and
   * disjoint. scanVolume does not read a chunk that lies inside one: reading holes through the
   * page cache is slow (the kernel fills the cache with zero pages). The whole blocks of a hole of
   * a chunk or more are one job of the scan, taken as zero blocks without a look at each: a hole
   * must read as zeros for the whole scan (a write into it after the reader was opened is not seen).
   */
  readonly holes?: ReadonlyArray<{ readonly start: number; readonly end: number }>;
  /** Fill buf from byte offset `position`; returns bytes read (short only at end of volume). */
  read(buf: Buffer, position: number): Promise<number>;
  close(): Promise<void>;
}

/** A volume being written (restore / materialize target). */
export interface VolumeWriter extends VolumeReader {
  /** Write `buf` at `position`; once it resolves the writer holds no reference to `buf` (materialize reuses it). */
  write(buf: Buffer, position: number): Promise<void>;
  /** Make a range read back as zeros (punch a hole or write zeros). */
  zero(position: number, length: number): Promise<void>;
  sync(): Promise<void>;
  /**
   * Optional: start writing back what went through the page cache, so that the final sync()
   * finds little to do; not a durability point. A writer without it gets sync() instead.
   */
  writeback?(): Promise<void>;
}

export interface ScanProgress {
  readonly blocksDone: number;
  readonly blocksTotal: number;
  /** Bytes read from the volume: a hole of a sparse image that the scan skips is not counted. */
  readonly bytesRead: number;
  /** Of bytesRead, those read past the page cache (O_DIRECT: a block device). */
  readonly bytesReadDirect: number;
  readonly blocksStored: number;
  /** Of blocksStored, those stored as deltas of the block they replaced (store/README.md, "Delta records"). */
  readonly blocksStoredAsDeltas: number;
}

export interface SnapshotOptions {
  readonly volume: string;
  readonly blockSize: number;
  /** Snapshot to build from (reuse subtrees; required with changedBlocks). */
  readonly parent?: SnapshotRecord | null;
  /** Only these blocks changed since parent (indices in any order, or ranges): read only them. */
  readonly changedBlocks?: readonly number[] | BlockRanges;
  readonly origin?: string;
  readonly labels?: Record<string, string>;
  readonly onProgress?: (p: ScanProgress) => void;
  /**
   * Told the hashes of blocks the store did not hold, as soon as they are appended (not yet
   * durable, but readable through getBlocks). A sync uses it to start sending them to the peer
   * while the scan goes on. `direct`: they were written past the page cache (O_DIRECT, as a
   * scan's new blocks are), so a reader should read them that way too.
   * `replaced`: for each, the parent snapshot's block at its position (ZERO_HASH for zeros), or
   * null when the scan did not compare with a parent: a sync sends a delta against it.
   * `patches`: for each, where the scan diffed it against its `replaced` block, the patches that
   * make it of that one (what a peer holding it needs; store/delta.ts).
   * `views`: with {@link keepViewsUntil}, each block's bytes in the scan's own buffer. With
   * `kept`, the scan leaves that buffer alone until keepViewsUntil settles (see there); else the
   * bytes are the callee's to copy until the promise it returns settles: the scan reads nothing
   * more into that part of its buffer until then (so a callee that waits paces the scan).
   */
  readonly onNewBlocks?: NewBlocksListener;
  /**
   * A promise of the caller that settles once it no longer reads the `views` onNewBlocks gave it.
   * A scan whose blocks all fit its buffers at once (a change list of up to 6 chunks of 8 MiB,
   * read by a running appliance's hash workers or of up to 2 on the calling thread) then hands
   * out its new blocks' bytes there, and uses those buffers for nothing else (no other scan
   * either) until the promise settles: a sync sends them from memory instead of reading back
   * what the scan just wrote (41 MiB less read from the disk per 82 changed blocks of 512 KiB).
   */
  readonly keepViewsUntil?: Promise<unknown>;
  /**
   * Told once every block has been read and appended, before the flush and the commit (which
   * take a while: the new blocks are made durable). A sync then sends its last new blocks at once.
   */
  readonly onScanned?: () => void;
  /** Told when the scan does something other than asked, safely (a damaged parent tree it scanned without). */
  readonly onNotice?: (message: string) => void;
  readonly signal?: AbortSignal;
}

export interface VerifyProblem {
  readonly kind: 'block' | 'node';
  /**
   * ERR_SNAPSHOT_INVALID: the snapshot's tree does not fit its record (a faulty peer built it):
   * a good block of the wrong length for its place, a node with more or fewer children than its
   * place has, or a count of non-zero blocks the tree does not hold (`detail` says which). No good
   * copy heals that: the snapshot goes.
   */
  readonly code: 'ERR_BLOCK_CORRUPT' | 'ERR_BLOCK_MISSING' | 'ERR_NODE_CORRUPT' | 'ERR_NODE_MISSING' | 'ERR_SNAPSHOT_INVALID';
  readonly hash: string;
  readonly volume: string;
  readonly snapshot: string;
  /** Block index for blocks; first block index covered for nodes. */
  readonly blockIndex: number;
  /** What is wrong, where the code alone does not say (a good block of the wrong length for its place). */
  readonly detail?: string;
}

export interface VerifyReport {
  readonly snapshots: number;
  readonly nodes: number;
  readonly blocks: number;
  readonly bytes: number;
  readonly problems: readonly VerifyProblem[];
}

/** How far verify has got (store/verify.ts). */
export interface VerifyProgress {
  /** Blocks read and checked so far. */
  readonly blocksDone: number;
  /**
   * About how many will be: each volume's first selected snapshot's non-zero blocks, plus those
   * that changed from one of its snapshots to the next (exact at the last call).
   */
  readonly blocksTotal: number;
  /** Bytes read from packs and re-hashed so far. */
  readonly bytesRead: number;
  /** Problems found so far. */
  readonly problems: number;
}

/** How far gc's copy has got (store/gc.ts): told after each round. */
export interface GcProgress {
  /** Index entries of the packs being rewritten handled so far (moved or deleted), and in all. */
  readonly entriesDone: number;
  readonly entriesTotal: number;
  /** Bytes of live records copied into new packs so far. */
  readonly bytesCopied: number;
}

export interface GcReport {
  readonly blocksKept: number;
  readonly blocksRemoved: number;
  readonly bytesReclaimed: number;
  readonly nodesRemoved: number;
  readonly packsRewritten: number;
  /**
   * Small packs gc was to merge (nothing to reclaim in them) but left as they are: copying one's
   * live records needs `needBytes` free and `freeBytes` were. Nothing is lost; empty when none.
   */
  readonly packsNotMerged: readonly PackLeft[];
}

/** A pack gc left as it is for lack of free space (GcReport.packsNotMerged, ERR_DISK_FULL's details). */
export interface PackLeft {
  readonly pack: number;
  /** Free bytes copying its live records needs (those records, plus room for the index's log and the filesystem's own blocks). */
  readonly needBytes: number;
  /** Free bytes there were when gc came to it. */
  readonly freeBytes: number;
}
