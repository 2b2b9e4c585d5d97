/**
 * The local block store: pack files for block data, a classic-level index for everything else.
 * store/README.md documents the on-disk format and the crash-safety arguments.
 *
 * Concurrency: one process holds a store (lock file + LevelDB lock). Inside it, every method may
 * be called concurrently: pack appends and index batches are serialized by a mutex, and gc runs
 * alone (snapshot builds share a lock that gc takes exclusively).
 */
import { existsSync } from 'node:fs';
import { mkdir, open, rename, statfs, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ClassicLevel } from 'classic-level';
import { TandemError, abortError, diskFullError, fromSystemError, isIndexIoError, isTandemError } from '../common/errors.js';
import { blake3, hashBlock, isHash, isZeroHash, MAX_BLOCK_SIZE, parseHex, toHex, ZERO_HASH } from './hash.js';
import { STORED_DELTA_DIVISOR, applyPatches, composeDeltas, diffBlock, mayBeSparse } from './delta.js';
import { checkSnapshotId, checkVolumeName, isValidSnapshotId, isValidVolumeName, newSnapshotId, snapshotIdTime } from './ids.js';
import {
  blockKey, decodeLocation, encodeLocation, encodeU64, decodeU64, metaKey, metaRange, namespaceRange, nodeKey, NS,
  packKey, snapshotKey, snapshotRange, volumeKey, type BlockLocation,
} from './keys.js';
import { busyError, acquireStoreLock } from './lock.js';
import { Mutex, SharedLock } from './mutex.js';
import { ByteBudget } from './budget.js';
import {
  CODEC_DELTA, CODEC_RAW, CODEC_SPARSE, DELTA_PAYLOAD_MIN, decodePayload, sparsePayload, SPARSE_PAYLOAD_MIN, decodeRecord, decodeRecordHeader, encodeRecordParts, recordLength, RECORD_HEADER_LENGTH, RECORD_TRAILER_LENGTH,
  type RecordParts,
} from './pack.js';
import { PackFiles, type RecoveryReport } from './pack-files.js';
import { DEFAULT_BLOCK_SIZE, checkBlockSize, checkSize, normalizeSnapshot, normalizeVolume, sameJson } from './records.js';

export { DEFAULT_BLOCK_SIZE };
import { applyNodeChange, blockCount, buildTree, checkNode, checkNodeChange, checkTreeOnce, childCount, countNonZero, decodeNode, isNodeChange, diffTrees, encodeNode, walkBlocks, type BlockChange, type TreeShape } from './tree.js';
import { scanVolume } from './scan.js';
import { HashPools } from './hash-pool.js';
import { verifyStore, type VerifyOptions } from './verify.js';
import { collectGarbage } from './gc.js';
import { AheadBudget } from './ahead-budget.js';
import type {
  BlockFrame, GcProgress, GcReport, GetBlocksOptions, Hash, NodeChangeToPut, NodeToPut, PutBlocksCallOptions, PutBlocksResult, ReplicaStore, SnapshotOptions, SnapshotRecord, TreeNode, VerifyReport, VolumeReader, VolumeRecord,
} from './types.js';

/** A block read from a pack, with the function that gives its pooled buffer back (if pooled). */
type ReadBlock = Omit<BlockFrame, 'hash'> & {
  /** Read from a delta record: its base (a raw record) and patches, for a delta of this block to be stored as a delta of that base. */
  readonly stored?: StoredDelta;
};
/** A delta record's content: the raw block it patches and the patches (store/delta.ts). */
interface StoredDelta {
  readonly base: Hash;
  readonly patches: Buffer;
}
/** @internal A block to store (putVerifiedMany), with the delta payload to store it as, if any. */
export type PutFrame = BlockFrame & { readonly asDelta?: AsDelta };

/** A byte budget as putBlocks watches it: told when someone waits for it (store/budget.ts). */
type ContendedBudget = Pick<ByteBudget, 'onContended'>;

/** How {@link Store.putBlocks} takes its input. */
export interface PutBlocksOptions extends PutBlocksCallOptions {
  /** The byte budget the input's frames hold until released, shared with other streams (sync/framing.ts DecodeOptions.budget). */
  readonly budget?: ContendedBudget;
}
interface AsDelta {
  /** A block this store holds whole; ZERO_HASH for a sparse record (CODEC_SPARSE). */
  readonly base: Hash;
  /** The record's payload: the base's hash, then the patches (sparse: the block's length, then the patches). */
  readonly payload: Buffer;
}

/**
 * How a block that `patches` make of block `base` is stored: as a delta of `base`, or, when
 * `base` is itself stored as a delta (`baseStored`), of that one's base, with the two composed
 * (a delta is never the base of another); as a sparse record when that base is the zero block;
 * undefined when that is more than 1/{@link STORED_DELTA_DIVISOR} of the block (stored whole).
 * putVerifiedMany checks, under the write lock, that a delta's base is still stored whole.
 */
function storedDelta(base: Hash, baseStored: StoredDelta | undefined, patches: Buffer, length: number, hash: Hash): AsDelta | undefined {
  const first = baseStored?.base ?? base;
  const delta = baseStored ? composeDeltas(baseStored.base, baseStored.patches, patches, length, hash) : Buffer.concat([base, patches]);
  // Patches of the zero block need no base: a sparse record, which carries the block's length.
  const payload = isZeroHash(first) ? sparsePayload(length, delta.subarray(32)) : delta;
  return payload.length * STORED_DELTA_DIVISOR <= length ? { base: first, payload } : undefined;
}

/**
 * What {@link Store.deltaOf} found: how to store the block (`stored`; undefined: whole), and the
 * patches that make it of the block it replaced (at most half the block), which a sync sends a
 * peer that holds that one (SnapshotOptions.onNewBlocks' `patches`).
 */
export interface DeltaOf {
  readonly stored: AsDelta | undefined;
  readonly patches: Buffer;
}

/** The block a delta or sparse record at `loc` patches (ZERO_HASH for a sparse one); undefined for a raw record. */
function storedBase(loc: BlockLocation): Hash | undefined {
  return loc.codec === CODEC_SPARSE ? ZERO_HASH : loc.base;
}

/** The record codec of a block stored as `d`: a delta of a raw block, or patches of zeros. */
function deltaCodec(d: AsDelta): number {
  return isZeroHash(d.base) ? CODEC_SPARSE : CODEC_DELTA;
}

/** A zero buffer of `n` bytes to diff against (never written): the largest asked for so far. */
let zeros = Buffer.alloc(0);
function zeroBlock(n: number): Buffer {
  if (zeros.length < n) zeros = Buffer.alloc(n);
  return zeros.subarray(0, n);
}

/** `data` as patches of zeros ({@link Store.deltaOf} against the zero block); `stored` when they make a sparse record. */
function sparseOf(hash: Hash, data: Buffer): DeltaOf | undefined {
  const patches = diffBlock(data, ZERO_HASH, zeroBlock(data.length))?.subarray(32);
  return patches && { stored: storedDelta(ZERO_HASH, undefined, patches, data.length, hash), patches };
}


/** Blocks read ahead by getBlocks: 8 x 512 KiB = 4 MiB in memory per stream, while few streams run (below). */
const READ_AHEAD = 8;
/**
 * Blocks read ahead by every getBlocks of this process together: a sync's three block streams
 * (sync/engine.ts BLOCK_STREAMS) at full depth. More streams at once (a daemon's two jobs, a peer
 * serving several pulls) share it: six read 4 ahead each (store/ahead-budget.ts).
 */
export const readAheadBudget = new AheadBudget(3 * READ_AHEAD, READ_AHEAD);

/** getBlocks looks up block locations this many at a time. */
const LOCATE_BATCH = 32;

/**
 * Good copies written at a time by {@link Store.repairBlocks}: bounds memory, and a repair stopped
 * midway keeps what its batches wrote (one fsync and one synced index batch each).
 */
const REPAIR_BATCH_BYTES = 8 * 1024 * 1024;

/** putBlocks reads this many bases of delta frames at once (4 MiB of 512 KiB blocks). */
const DELTA_READS = 8;
/** putBlocks writes verified blocks in batches of about this many bytes (8 blocks of 512 KiB). */
const PUT_BATCH_BYTES = 4 * 1024 * 1024;
/**
 * Bytes of blocks built from delta frames that all of a store's putBlocks streams hold at once
 * (store/budget.ts): taken before a delta's base is read, given back when the block is written or
 * dropped. 12 uploads of 24 deltas of 16 MiB blocks (2.3 KB each on the wire) took a server's peak
 * RSS from 119 MiB to 1,510-1,639 MiB without it (3 runs), to 230-232 MiB with it (6 runs;
 * hostile-upload.test.ts). A stream holds at most DELTA_READS being built, a batch and one being
 * written (24 blocks): 6 streams of 512 KiB blocks (two jobs of 3 streams) need 72 MiB and never
 * wait; at 16 MiB blocks 8 are built at once, which keeps a disk busy. One stream of 4096 deltas
 * of 512 KiB blocks costs putBlocks the same CPU with it as without (1.22-1.42 s against
 * 1.15-1.37 s in process, 3 alternated pairs of 2 runs on 2 shared cores).
 */
const DELTA_BUDGET_BYTES = 128 * 1024 * 1024;
/** Yielded by resolveDeltas to have putBlocks write the batch it holds now (the budget is wanted). */
const FLUSH = Symbol('flush');
/** onContended's answer in resolveDeltas' race with the next frame. */
const CONTENDED = Symbol('contended');

/** New nodes are written in batches of this many (each batch is one LevelDB write). */
const NODE_BATCH = 512;
/** Index bytes of nodes written without a sync that the store keeps to put again ({@link Store.unsyncedNodes}); past it, a node write is synced. */
const UNSYNCED_NODE_BYTES = 8 * 1024 * 1024;

/**
 * Index lookups of at most this many keys are made on the calling thread (LevelDB's synchronous
 * get), larger ones in one getMany on libuv's pool. A trip through the pool costs ~80 us whatever
 * it asks (2,000 keys of a 20,000-key index: a get awaited in turn 78-90 us per key, getMany of
 * 32 at a time 7-14 us per key, getSync 3-4 us); a key read from a table file costs its read
 * either way. A sync of a small change makes a few hundred single lookups one after another (the
 * bases of deltas, stored deltas' bases, tree nodes).
 */
const SYNC_LOOKUP_MAX = 64;

/**
 * Decoded tree nodes kept (the least recently used go first): ~34 KiB each at 256 children, so
 * ~9 MiB. A sync of a small change read the same nodes up to three times (the scan's paths to
 * the changed blocks, the tree built on the parent, the engine's walk), ~130 decodes of ~28 us
 * and 25 KiB of garbage each.
 */
const NODE_CACHE_MAX = 256;

/**
 * Store format written in the 'f' key; a store of another format is refused. Format 2 added
 * delta records, format 3 sparse records (store/README.md, "Delta records"); a store of an
 * earlier format holds none of the newer records, and is marked 3 when it is opened (a build that
 * reads only an earlier format then refuses it clearly).
 */
const FORMAT = 3;
/** Formats this build opens as they are, and marks as {@link FORMAT}. */
const UPGRADABLE_FORMATS: readonly number[] = [1, 2];

type Db = ClassicLevel<Buffer, Buffer>;

/** The first try at reopening the index after a failed write ({@link Store.reopenIndex}); each next one waits twice as long, up to {@link REOPEN_MAX_MS}. */
const REOPEN_FIRST_MS = Number(process.env.TANDEM_INDEX_REOPEN_MS ?? 1000);
const REOPEN_MAX_MS = 60_000;

export interface BuildSnapshotOptions {
  readonly volume: string;
  readonly size: number;
  readonly blockSize: number;
  readonly parent: SnapshotRecord | null;
  /** Ascending; the blocks are already put and flushed (or at least put: the build flushes). */
  readonly changes: Iterable<BlockChange> | AsyncIterable<BlockChange>;
  readonly origin: string;
  readonly labels?: Record<string, string>;
  readonly created?: string;
  readonly id?: string;
}

export class Store implements ReplicaStore {
  readonly dir: string;
  /** What recovery did when the store was opened (for logs and tests). */
  readonly recovery: RecoveryReport;
  /**
   * The disk was too full for the index to open, and the store's reserve file was deleted to
   * open it ({@link RESERVE_BYTES}): free space (retention, gc). A later open makes it again.
   */
  reserveReleased = false;
  /** @internal */ readonly db: Db;
  /** @internal */ readonly packs: PackFiles;
  /** @internal serializes pack appends and index writes. */ readonly writeLock = new Mutex();
  /** @internal shared by snapshot builds, exclusive for gc. */ readonly gcLock = new SharedLock();
  /** @internal The old packs the last gc is deleting after its locks (store/gc.ts); close and the next gc wait for it. */
  reclaiming: Promise<void> = Promise.resolve();
  /** @internal hash workers kept between scans. */ readonly hashPools = new HashPools();
  /** @internal The memory of blocks putBlocks builds from deltas, shared by its streams ({@link DELTA_BUDGET_BYTES}). */
  readonly deltaBudget = new ByteBudget(DELTA_BUDGET_BYTES);
  /** Blocks appended but not yet durable, by hash (latin1 string of the 32 bytes). */
  private readonly pending = new Map<string, BlockLocation>();
  /**
   * Tree nodes read and verified since the last gc, by hash (latin1), least recently used first
   * ({@link NODE_CACHE_MAX}). A node's content never changes and only gc deletes nodes, which
   * empties this ({@link forgetNodes}): what it holds is in the index. verify reads the index
   * itself.
   */
  private readonly nodeCache = new Map<string, TreeNode>();
  /** Counts {@link forgetNodes}: a node looked up before one is not cached after it (gc may have deleted it in between). */
  private nodeEpoch = 0;
  /**
   * Index entries of the nodes written without a sync since the last synced batch (key as
   * latin1, value), {@link UNSYNCED_NODE_BYTES} at most. LevelDB does not fsync a log file it
   * leaves for a new one (when its memtable fills), so a later synced write makes only the new
   * log durable, not the writes before it. Every synced batch of blocks or of a snapshot record
   * puts these again (a node's value never changes): a record is durable only with its tree,
   * even across a power loss. gc, which deletes nodes, empties it ({@link forgetNodes}).
   */
  private readonly unsyncedNodes = new Map<string, Buffer>();
  private unsyncedNodeBytes = 0;
  /** Times unflushed blocks were discarded after a failed direct write, and the last failure ({@link discardFailedLocked}). */
  private discards = 0;
  private discardCause: unknown = null;
  private readonly release: () => Promise<void>;
  private closed = false;
  /**
   * The first write the index refused with an I/O error (LEVEL_IO_ERROR), or null. LevelDB keeps
   * such an error and refuses every later write until the index is reopened, which the store
   * then tries by itself ({@link reopenIndex}); `doctor` names the failure meanwhile.
   */
  indexFailure: { readonly at: string; readonly message: string } | null = null;
  /** The next {@link reopenIndex} try, while {@link indexFailure} is set. */
  private reopenTimer: NodeJS.Timeout | null = null;
  /** Set while {@link reopenIndex} closes and opens the index: reads wait for it ({@link indexRead}). */
  private reopening: Promise<void> | null = null;
  /** Reads of the index under way ({@link indexRead}); a reopen waits until none is. */
  private readsUnderWay = 0;
  private readsDrained: (() => void) | null = null;

  /**
   * @internal Run a read of the index (a lookup off this thread, an iterator). While
   * {@link reopenIndex} swaps the index it waits, and the swap waits for the reads under way, so
   * no read meets a closed index. Lookups on this thread ({@link lookupOne}) cannot overlap a swap:
   * they only wait before it.
   */
  async indexRead<T>(fn: () => Promise<T>): Promise<T> {
    await this.reopened();
    this.readsUnderWay++;
    try {
      return await fn();
    } finally {
      if (--this.readsUnderWay === 0 && this.readsDrained !== null) this.readsDrained();
    }
  }

  /** Run an index write; an I/O error it meets is kept in {@link indexFailure} (and thrown). */
  private async indexWrite<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      if (this.indexFailure === null && isIndexIoError(e)) {
        const err = e as { message?: string; cause?: { message?: string } };
        this.indexFailure = { at: new Date().toISOString(), message: err.cause?.message ?? err.message ?? String(e) };
        this.scheduleReopen(REOPEN_FIRST_MS);
      }
      throw e;
    }
  }

  /** Try {@link reopenIndex} after `delay` ms, then again at twice the delay (at most {@link REOPEN_MAX_MS}) until it works. */
  private scheduleReopen(delay: number): void {
    if (this.reopenTimer !== null || this.closed) return;
    this.reopenTimer = setTimeout(() => {
      this.reopenTimer = null;
      void this.reopenIndex().then(
        (ok) => void (ok || this.scheduleReopen(Math.min(2 * delay, REOPEN_MAX_MS))),
        () => this.scheduleReopen(Math.min(2 * delay, REOPEN_MAX_MS)),
      );
    }, delay);
    this.reopenTimer.unref();
  }

  /**
   * After {@link indexFailure}: reopen the index once the disk takes a synced write again (space
   * freed, a fault gone), so that a long-running server heals without a restart; true when the
   * index takes writes again (or never failed). Runs alone (the gc lock shared, the write lock
   * held: no write or gc is under way, no chained batch open), and once the reads under way have
   * ended, new ones waiting for it ({@link indexRead}). The disk is probed first with a small
   * synced file next to the index: an open that fails leaves the index closed until the next try
   * (reads then fail, as writes already do), so it is not closed while the disk still refuses
   * writes. LevelDB replays its log on
   * open: a write whose sync failed may be there or not, as after a crash, which every write's
   * order allows for (blocks and nodes before the records that name them).
   */
  async reopenIndex(): Promise<boolean> {
    if (this.indexFailure === null || this.closed) return true;
    return this.gcLock.shared(() => this.writeLock.run(async () => {
      if (this.indexFailure === null || this.closed) return true;
      const probe = join(this.dir, 'index-probe.tmp');
      try {
        const fh = await open(probe, 'w');
        try {
          await fh.write(Buffer.alloc(4096));
          await fh.datasync();
        } finally {
          await fh.close();
        }
      } catch {
        return false;
      } finally {
        await unlink(probe).catch(() => undefined);
      }
      let swapped!: () => void;
      this.reopening = new Promise<void>((resolve) => (swapped = resolve));
      try {
        if (this.readsUnderWay > 0) await new Promise<void>((resolve) => (this.readsDrained = resolve));
        this.readsDrained = null;
        await this.db.close();
        await this.db.open();
      } catch {
        return false;
      } finally {
        this.reopening = null;
        swapped();
      }
      this.indexFailure = null;
      return true;
    }));
  }

  private constructor(dir: string, db: Db, packs: PackFiles, recovery: RecoveryReport, release: () => Promise<void>) {
    this.dir = dir;
    this.db = db;
    this.packs = packs;
    this.recovery = recovery;
    this.release = release;
  }

  /**
   * Open (creating when absent) the store in `dir`, recovering packs from a crash (torn tails
   * dropped, gc leftovers removed). ERR_STORE_BUSY when another process holds it.
   */
  static async open(dir: string): Promise<Store> {
    try {
      await mkdir(dir, { recursive: true, mode: 0o750 });
    } catch (e) {
      throw fromSystemError(e, `cannot create the store directory ${dir}`);
    }
    // The lock file and LevelDB's log and manifest are written at every open: on a full disk the
    // reserve is given up for them, once.
    let reserveReleased = false;
    const giveUpReserve = async (): Promise<boolean> => !reserveReleased && (reserveReleased = await releaseReserve(dir));
    let release: () => Promise<void>;
    try {
      release = await acquireStoreLock(dir);
    } catch (e) {
      if (!isTandemError(e, 'ERR_DISK_FULL') || !(await giveUpReserve())) throw e;
      release = await acquireStoreLock(dir);
    }
    let db: Db | undefined;
    try {
      for (;;) {
        db = new ClassicLevel<Buffer, Buffer>(`${dir}/index`, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
        try {
          await db.open();
          break;
        } catch (e) {
          const cause = (e as { cause?: { code?: string; message?: string } }).cause;
          if (cause?.code === 'LEVEL_LOCKED') throw busyError(dir, undefined);
          // A full disk does not damage the store.
          const full = diskFullError(e, `cannot open the store index ${dir}/index`, 'free space on that disk, then rerun: the store is not damaged by it');
          if (full && (await giveUpReserve())) continue;
          if (full) throw full;
          if (cause?.code === 'LEVEL_IO_ERROR') {
            throw new TandemError('ERR_IO', `cannot open the store index ${dir}/index: ${cause.message ?? (e as Error).message}; check the disk and its permissions, then rerun`, { cause: e });
          }
          throw new TandemError('ERR_STORE_CORRUPT', `cannot open the store index ${dir}/index: ${cause?.message ?? (e as Error).message}; restore the home from backup or re-initialize`, { cause: e });
        }
      }
      const format = await db.get(Buffer.from([NS.format]));
      const found = format === undefined ? undefined : (JSON.parse(format.toString('utf8')) as { format?: number }).format;
      if (format === undefined || (found !== undefined && UPGRADABLE_FORMATS.includes(found))) {
        await db.put(Buffer.from([NS.format]), Buffer.from(JSON.stringify({ format: FORMAT })), { sync: true });
      } else if (found !== FORMAT) {
        throw new TandemError('ERR_STORE_CORRUPT', `the store ${dir} has format ${found ?? format.toString('utf8')}, this version reads formats ${[...UPGRADABLE_FORMATS, FORMAT].join(' and ')}; use a matching appliance version`, { details: { format: found ?? null } });
      }
      const durable = new Map<number, number>();
      for await (const [k, v] of db.iterator(namespaceRange(NS.pack))) durable.set(k.readUInt32BE(1), decodeU64(v));
      const { packs, recovery } = await PackFiles.open(dir, durable);
      if (!reserveReleased) await keepReserve(dir);
      const store = new Store(dir, db, packs, recovery, release);
      store.reserveReleased = reserveReleased;
      return store;
    } catch (e) {
      await db?.close().catch(() => undefined);
      await release();
      throw isTandemError(e) ? e : fromSystemError(e, `cannot open the store ${dir}`);
    }
  }

  /** Flush pending blocks and release the store. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.reopenTimer !== null) clearTimeout(this.reopenTimer);
    this.reopenTimer = null;
    try {
      await this.flush();
    } finally {
      this.closed = true;
      await this.reclaiming.catch(() => undefined);
      await this.hashPools.close();
      await this.packs.close();
      await this.db.close();
      await this.release();
    }
  }

  private checkOpen(): void {
    if (this.closed) throw new TandemError('ERR_INTERNAL', `the store ${this.dir} is closed`);
  }

  // --- blocks ------------------------------------------------------------------------------

  /** For each hash, whether the block is held (pending blocks count: they become durable at flush). */
  async hasBlocks(hashes: readonly Hash[]): Promise<boolean[]> {
    this.checkOpen();
    for (const h of hashes) checkHash(h);
    const out = hashes.map((h) => isZeroHash(h) || this.pending.has(h.toString('latin1')));
    const ask = hashes.map((_, i) => (out[i] ? -1 : i)).filter((i) => i >= 0);
    if (ask.length > 0) {
      const vals = await this.lookup(ask.map((i) => blockKey(hashes[i]!)));
      ask.forEach((i, n) => (out[i] = vals[n] !== undefined));
    }
    return out;
  }

  /** @internal Location of a block, or undefined. */
  async locate(hash: Hash): Promise<BlockLocation | undefined> {
    const p = this.pending.get(hash.toString('latin1'));
    if (p) return p;
    const v = this.reopening === null ? this.lookupOne(blockKey(hash)) : await this.lookupSettled(blockKey(hash)); // no await on this hot path unless a reopen runs
    return v === undefined ? undefined : decodeLocation(v);
  }

  /** Resolves once no {@link reopenIndex} swaps the index (at once when none does). */
  private async reopened(): Promise<void> {
    while (this.reopening !== null) await this.reopening;
  }

  /** {@link lookupOne} once a reopen under way has ended: for callers that hold no lock. */
  private async lookupSettled(key: Buffer): Promise<Buffer | undefined> {
    await this.reopened();
    return this.lookupOne(key);
  }

  /** The index's value of `key`, looked up on this thread (see {@link SYNC_LOOKUP_MAX}); callers wait out a {@link reopening} first, or hold the write lock. */
  private lookupOne(key: Buffer): Buffer | undefined {
    return this.db.getSync(key);
  }

  /** The index's values of `keys` (undefined where absent): few on this thread, else on the pool ({@link SYNC_LOOKUP_MAX}). */
  private async lookup(keys: Buffer[]): Promise<Array<Buffer | undefined>> {
    if (keys.length > SYNC_LOOKUP_MAX) return this.indexRead(() => this.db.getMany(keys));
    await this.reopened();
    return keys.map((k) => this.lookupOne(k));
  }

  /**
   * The block's bytes, verified against its hash (ERR_BLOCK_CORRUPT with details.hash otherwise;
   * ERR_BLOCK_MISSING when absent). ZERO_HASH gives `length` zeros (default block size).
   */
  async getBlock(hash: Hash, length = DEFAULT_BLOCK_SIZE): Promise<Buffer> {
    this.checkOpen();
    checkHash(hash);
    if (isZeroHash(hash)) return Buffer.alloc(length);
    const loc = await this.locate(hash);
    if (!loc) throw new TandemError('ERR_BLOCK_MISSING', `block ${toHex(hash)} is not in the store; sync or snapshot the volume again`, { details: { hash: toHex(hash) } });
    try {
      return await this.readBlockAt(hash, loc);
    } catch (e) {
      // A concurrent gc may have moved the block and deleted the pack we were reading: read
      // again from the new location. Anything else is a real failure.
      const now = await this.locate(hash);
      if (!now || (now.pack === loc.pack && now.offset === loc.offset)) throw e;
      return this.readBlockAt(hash, now);
    }
  }

  /** @internal Read and verify the record at `loc`. */
  async readBlockAt(hash: Hash, loc: BlockLocation): Promise<Buffer> {
    if (loc.codec === CODEC_DELTA) return (await this.readDeltaBlock(hash, loc, true, false)).data;
    return this.checkRecord(hash, loc, await this.packs.read(loc.pack, loc.offset, RECORD_HEADER_LENGTH + loc.length));
  }

  /**
   * @internal The block a delta record stands for: the record is read and its CRC checked, then
   * its base (a raw record, CRC-checked) is read and patched. With `verify` the result is
   * re-hashed (ERR_BLOCK_CORRUPT); without, the consumer hashes it (as readBlockPooled's
   * `crcOnly`). ERR_STORE_CORRUPT for a damaged record or a base that is missing or not raw.
   * The result carries the record's base and patches (`stored`).
   */
  async readDeltaBlock(hash: Hash, loc: BlockLocation, verify: boolean, direct: boolean): Promise<ReadBlock> {
    return this.applyDeltaPayload(hash, await this.readPatchRecord(hash, loc), verify, direct);
  }

  /**
   * The payload of the delta (base hash, then patches) or sparse (length, then patches) record
   * at `loc`, its CRC and header checked against the index (ERR_STORE_CORRUPT).
   */
  private async readPatchRecord(hash: Hash, loc: BlockLocation): Promise<Buffer> {
    const rec = decodeRecord(await this.packs.read(loc.pack, loc.offset, recordLength(loc.length)));
    const min = loc.codec === CODEC_SPARSE ? SPARSE_PAYLOAD_MIN : DELTA_PAYLOAD_MIN;
    if (!rec || rec.codec !== loc.codec || rec.length !== loc.length || !rec.hash.equals(hash) || rec.length < min || (loc.base && !loc.base.equals(rec.payload.subarray(0, 32)))) {
      throw new TandemError('ERR_STORE_CORRUPT', `the record of block ${toHex(hash)} in pack ${loc.pack} at offset ${loc.offset} is damaged or truncated; run \`appliance verify\``, {
        details: { hash: toHex(hash), pack: loc.pack, offset: loc.offset },
      });
    }
    return rec.payload;
  }

  /**
   * Block `hash`, stored as a delta or sparse record at `loc`, as that delta
   * (GetBlocksOptions.storedDeltas): `data` the patches, `delta` the base (ZERO_HASH for a sparse
   * record) and the block's length (a delta's: its base's, a raw record). Only the record is
   * read, its CRC checked; the consumer's store builds the block and verifies it. Undefined when a
   * delta's base is not indexed as a raw record: the caller reads the block as usual (and
   * reports the damage).
   */
  private async readStoredDelta(hash: Hash, loc: BlockLocation): Promise<ReadBlock | undefined> {
    const payload = await this.readPatchRecord(hash, loc);
    if (loc.codec === CODEC_SPARSE) return { data: payload.subarray(4), delta: { base: ZERO_HASH, length: payload.readUInt32BE(0) } };
    const base = Buffer.from(payload.subarray(0, 32));
    const baseLoc = await this.locate(base);
    if (!baseLoc || baseLoc.codec !== CODEC_RAW) return undefined;
    return { data: payload.subarray(32), delta: { base, length: baseLoc.length } };
  }

  /**
   * The block a sparse record stands for (patches of zeros): built in a new buffer; with `verify`
   * re-hashed (ERR_BLOCK_CORRUPT). Carries `stored` (base ZERO_HASH) so that a delta of it is
   * stored sparse too.
   */
  private async readSparseBlock(hash: Hash, loc: BlockLocation, verify: boolean): Promise<ReadBlock> {
    const payload = await this.readPatchRecord(hash, loc);
    const data = decodePayload(CODEC_SPARSE, payload);
    if (!data || (verify && !blake3(data).equals(hash))) {
      throw new TandemError('ERR_BLOCK_CORRUPT', `block ${toHex(hash)}, stored as patches of zeros in pack ${loc.pack}, does not build its hash (disk corruption); run \`appliance repair --peer NAME\` to verify the store and fetch good copies from the peer`, {
        details: { hash: toHex(hash), pack: loc.pack, offset: loc.offset },
      });
    }
    return { data, stored: { base: ZERO_HASH, patches: payload.subarray(4) } };
  }

  /**
   * @internal The block that delta payload `payload` (base hash, then patches) makes of this
   * store's raw copy of its base: see {@link readDeltaBlock}. gc checks a delta record it copies
   * with it.
   */
  async applyDeltaPayload(hash: Hash, payload: Buffer, verify: boolean, direct: boolean): Promise<ReadBlock> {
    const base = Buffer.from(payload.subarray(0, 32));
    const patches = payload.subarray(32);
    const baseGone = (why: string) =>
      new TandemError('ERR_STORE_CORRUPT', `block ${toHex(hash)} is stored as a delta of block ${toHex(base)}, which ${why}; run \`appliance repair --peer NAME\` to fetch a whole copy`, {
        details: { hash: toHex(hash), base: toHex(base) },
      });
    let loc = await this.locate(base);
    if (!loc) throw baseGone('is missing');
    if (loc.codec !== CODEC_RAW) throw baseGone('is not stored whole');
    let block: ReadBlock;
    try {
      block = await this.readBlockPooled(base, loc, true, direct);
    } catch (e) {
      // A concurrent gc may have moved the base: read it at its new place.
      const now = await this.locate(base);
      if (!now || now.codec !== CODEC_RAW || (now.pack === loc.pack && now.offset === loc.offset)) throw e;
      loc = now;
      block = await this.readBlockPooled(base, loc, true, direct);
    }
    try {
      applyPatches(block.data, patches, hash);
      if (verify && !blake3(block.data).equals(hash)) {
        throw new TandemError('ERR_BLOCK_CORRUPT', `block ${toHex(hash)}, stored as a delta of block ${toHex(base)}, does not match its hash (disk corruption); run \`appliance repair --peer NAME\` to verify the store and fetch good copies from the peer`, {
          details: { hash: toHex(hash), base: toHex(base) },
        });
      }
    } catch (e) {
      block.release?.();
      throw e;
    }
    return { data: block.data, ...(block.release ? { release: block.release } : {}), stored: { base, patches } };
  }

  /**
   * {@link readBlockAt} into a pooled buffer (PackFiles.readPooled): `release` gives it back. With
   * `crcOnly` the whole record is read and its CRC-32 checked instead of re-hashing the payload
   * (GetBlocksOptions.consumerVerifies).
   */
  private async readBlockPooled(hash: Hash, loc: BlockLocation, crcOnly: boolean, direct: boolean): Promise<ReadBlock> {
    if (loc.codec === CODEC_DELTA) return this.readDeltaBlock(hash, loc, !crcOnly, direct);
    if (loc.codec === CODEC_SPARSE) return this.readSparseBlock(hash, loc, !crcOnly);
    const length = RECORD_HEADER_LENGTH + loc.length + (crcOnly ? RECORD_TRAILER_LENGTH : 0);
    const { buf: rec, release } = await this.packs.readPooled(loc.pack, loc.offset, length, { direct });
    try {
      return { data: crcOnly ? this.checkRecordCrc(hash, loc, rec) : this.checkRecord(hash, loc, rec), ...(release ? { release } : {}) };
    } catch (e) {
      release?.();
      throw e;
    }
  }

  /**
   * The payload of the whole record `rec` (header, payload, CRC) at `loc`, checked by its CRC-32
   * and header rather than by re-hashing: for a consumer that hashes the block anyway. The CRC
   * covers every byte of the record, so disk damage is still caught here and reported as a
   * damaged record of this store, not as a block damaged on the way.
   */
  private checkRecordCrc(hash: Hash, loc: BlockLocation, rec: Buffer): Buffer {
    const r = decodeRecord(rec);
    const data = r && r.length === loc.length && r.hash.equals(hash) ? decodePayload(r.codec, r.payload) : undefined;
    if (!data) {
      throw new TandemError('ERR_STORE_CORRUPT', `the record of block ${toHex(hash)} in pack ${loc.pack} at offset ${loc.offset} is damaged or truncated (CRC mismatch); run \`appliance verify\``, {
        details: { hash: toHex(hash), pack: loc.pack, offset: loc.offset },
      });
    }
    return data;
  }

  private checkRecord(hash: Hash, loc: BlockLocation, rec: Buffer): Buffer {
    const header = decodeRecordHeader(rec);
    if (rec.length < RECORD_HEADER_LENGTH + loc.length || !header || header.length !== loc.length || !header.hash.equals(hash)) {
      throw new TandemError('ERR_STORE_CORRUPT', `the record of block ${toHex(hash)} in pack ${loc.pack} at offset ${loc.offset} is damaged or truncated; run \`appliance verify\``, {
        details: { hash: toHex(hash), pack: loc.pack, offset: loc.offset },
      });
    }
    const data = decodePayload(header.codec, rec.subarray(RECORD_HEADER_LENGTH));
    if (!data || !blake3(data).equals(hash)) {
      throw new TandemError('ERR_BLOCK_CORRUPT', `block ${toHex(hash)} in pack ${loc.pack} does not match its hash (disk corruption); run \`appliance repair --peer NAME\` to verify the store and fetch good copies from the peer`, {
        details: { hash: toHex(hash), pack: loc.pack, offset: loc.offset },
      });
    }
    return data;
  }

  /**
   * Verified blocks in the order asked, at most {@link READ_AHEAD} read ahead, fewer while many
   * streams of this process read at once ({@link readAheadBudget}). Locations are
   * looked up {@link LOCATE_BATCH} at a time (one index request each), not one by one. Frames
   * read into pooled buffers carry `release` (BlockFrame.release): a consumer done with the
   * bytes gives the buffer back for the next read. With `consumerVerifies`, records are checked
   * by their CRC-32 instead of re-hashed (GetBlocksOptions): a sync's sender then spends ~0.1
   * CPU s per GiB on it instead of ~0.4 (the receiver hashes every block as it stores it).
   */
  async *getBlocks(hashes: readonly Hash[], opts: GetBlocksOptions = {}): AsyncGenerator<BlockFrame> {
    const crcOnly = opts.consumerVerifies === true;
    const direct = opts.direct === true;
    this.checkOpen();
    for (const h of hashes) checkHash(h);
    const locations = new Map<number, BlockLocation | undefined>();
    let located = 0;
    const bases = opts.bases;
    const storedDeltas = opts.storedDeltas === true;
    const locateUpTo = async (end: number) => {
      while (located < end) {
        const from = located;
        const to = Math.min(hashes.length, from + LOCATE_BATCH);
        located = to;
        const ask: number[] = [];
        for (let i = from; i < to; i++) {
          const h = hashes[i]!;
          const key = h.toString('latin1');
          const p = isZeroHash(h) ? undefined : this.pending.get(key);
          const b = storedDeltas ? bases?.[i] : undefined;
          // A held block is handed out from memory, unless it may go as a stored delta (looked up);
          // so are patches of the very base named that the holder has.
          if (p || isZeroHash(h) || (opts.held?.has(key) && !b) || (b && opts.held?.hasPatches?.(key, b))) locations.set(i, p);
          else ask.push(i);
        }
        if (ask.length > 0) {
          const vals = await this.lookup(ask.map((i) => blockKey(hashes[i]!)));
          ask.forEach((i, n) => locations.set(i, vals[n] === undefined ? undefined : decodeLocation(vals[n]!)));
        }
      }
    };
    const held = opts.held;
    const readOne = async (h: Hash, loc: BlockLocation | undefined): Promise<ReadBlock> => {
      const kept = held?.take(h.toString('latin1'));
      if (kept) return kept;
      if (isZeroHash(h) || !loc) return { data: await this.getBlock(h) }; // zeros, or absent: getBlock answers (or throws ERR_BLOCK_MISSING)
      try {
        return await this.readBlockPooled(h, loc, crcOnly, direct);
      } catch {
        return { data: await this.getBlock(h) }; // moved by a concurrent gc: look it up again (a real failure throws there)
      }
    };
    /** The block's base, for a delta (GetBlocksOptions.bases): read when held; else none (the block goes whole). */
    const readBase = async (b: Hash): Promise<BlockFrame['base']> => {
      const r = await this.readBaseBlock(b, direct);
      return r && { hash: b, data: r.data, ...(r.release ? { release: r.release } : {}) };
    };
    const read = async (i: number): Promise<ReadBlock> => {
      const h = hashes[i]!;
      const loc = locations.get(i);
      locations.delete(i);
      const b = bases?.[i];
      if (!b || b.equals(h)) return readOne(h, loc);
      // The holder has the patches of the very block the consumer holds (a scan diffed them): they go as they are.
      const key = h.toString('latin1');
      const patches = storedDeltas ? held?.takePatches?.(key, b) : undefined;
      if (patches) {
        held?.take(key)?.release?.(); // its bytes are not needed
        return { data: patches.patches, delta: { base: b, length: patches.length } };
      }
      // Stored as a delta of the very block the consumer holds: that delta goes as it is.
      if (storedDeltas && loc && storedBase(loc)?.equals(b)) {
        const d = await this.readStoredDelta(h, loc).catch(() => undefined); // moved by a gc, or damaged: read as usual below
        if (d) {
          held?.take(key)?.release?.(); // its copy is not needed
          return d;
        }
      }
      if (isZeroHash(b)) {
        // Diffed against zeros only when it may be mostly zeros: a block of data throughout (a
        // region of zeros filled wholesale) goes whole at once, without a ~70 us diff.
        const block = await readOne(h, loc);
        return mayBeSparse(block.data) ? { ...block, base: { hash: b, data: zeroBlock(block.data.length) } } : block;
      }
      const [block, base] = await Promise.allSettled([readOne(h, loc), readBase(b)]);
      if (block.status === 'rejected') {
        if (base.status === 'fulfilled') base.value?.release?.();
        throw block.reason;
      }
      const got = base.status === 'fulfilled' ? base.value : undefined;
      return got && got.data.length === block.value.data.length ? { ...block.value, base: got } : (got?.release?.(), block.value);
    };
    const inflight: Promise<ReadBlock>[] = [];
    let next = 0;
    // Each block read ahead holds room in the process-wide budget until it is handed out.
    const share = readAheadBudget.join();
    const fill = async () => {
      while (next < hashes.length && share.tryTake()) {
        if (next >= located) await locateUpTo(next + 1); // a failure: the share is left below, with what it holds
        const p = read(next++);
        p.catch(() => undefined); // observed when its turn comes
        inflight.push(p);
      }
    };
    try {
      await fill();
      for (let i = 0; i < hashes.length; i++) {
        const { data, release, base, delta } = await inflight.shift()!;
        share.give();
        if (opts.signal?.aborted) {
          release?.();
          base?.release?.();
          throw abortError(opts.signal, 'block read stopped');
        }
        await fill();
        yield { hash: hashes[i]!, data, ...(release ? { release } : {}), ...(base ? { base } : {}), ...(delta ? { delta } : {}) };
      }
    } finally {
      // Blocks read ahead and never handed out (the consumer stopped early) go back to the pool.
      for (const p of inflight.splice(0)) void p.then((r) => (r.release?.(), r.base?.release?.()), () => undefined);
      share.leave();
    }
  }

  /**
   * Verify BLAKE3(data) = hash (ERR_BLOCK_CORRUPT, nothing stored) and append the block unless
   * held. Returns true when it was new. Durable after {@link flush}. Idempotent.
   * A zero block is accepted under ZERO_HASH only and never stored.
   */
  async putBlock(hash: Hash, data: Buffer): Promise<boolean> {
    this.checkOpen();
    this.checkBlock(hash, data);
    if (isZeroHash(hash)) return false;
    return this.putVerified(hash, data);
  }

  /** @internal Append a block whose hash the caller computed from `data` itself. */
  async putVerified(hash: Hash, data: Buffer): Promise<boolean> {
    return (await this.putVerifiedMany([{ hash, data }]))[0]!;
  }

  /**
   * @internal Append blocks whose hashes the caller computed from their data itself, skipping
   * those held (and repeats within the batch): one index lookup and one pack write for the whole
   * batch. Returns, per item, whether it was new. Durable after {@link flush}. With `direct`, the
   * batch's whole pages bypass the page cache (PackFiles.appendMany): for blocks nobody will read
   * soon, such as those a sync receives (a scan's new blocks stay cached: a push sends them next).
   */
  async putVerifiedMany(items: readonly PutFrame[], opts: { direct?: boolean; parts?: ReadonlyArray<RecordParts | undefined> } = {}): Promise<boolean[]> {
    this.checkOpen();
    const out = items.map(() => false);
    // The index lookup and the record checksums happen before the write lock, so that parallel
    // streams overlap them with each other's pack writes. A block another stream indexes in
    // between is caught by the pending check under the lock (or, if it was flushed in that
    // instant, stored twice: harmless, gc reclaims the unreferenced copy).
    const candidates = (): number[] => {
      const ask: number[] = [];
      const seen = new Set<string>();
      items.forEach((it, i) => {
        const key = it.hash.toString('latin1');
        if (isZeroHash(it.hash) || this.pending.has(key) || seen.has(key)) return;
        seen.add(key);
        ask.push(i);
      });
      return ask;
    };
    const ask = candidates();
    if (ask.length === 0) return out;
    const vals = await this.lookup(ask.map((i) => blockKey(items[i]!.hash)));
    const absent = ask.filter((_, n) => vals[n] === undefined);
    if (absent.length === 0) return out;
    const parts = new Map(absent.map((i) => {
      const it = items[i]!;
      return [i, opts.parts?.[i] ?? (it.asDelta ? encodeRecordParts(it.hash, deltaCodec(it.asDelta), it.asDelta.payload) : encodeRecordParts(it.hash, CODEC_RAW, it.data))];
    }));
    return this.writeLock.run(async () => {
      this.checkOpen();
      if (this.packs.failed) await this.discardFailedLocked();
      const fresh = absent.filter((i) => !this.pending.has(items[i]!.hash.toString('latin1')));
      if (fresh.length === 0) return out;
      // A delta's base must be stored whole when the delta is appended: it was when the delta
      // was made, but a gc may have collected it since (gc waits for this lock, and then keeps
      // the bases of what it finds; store/README.md, "Delta records"). Otherwise the block is
      // stored whole.
      const deltas = fresh.filter((i) => items[i]!.asDelta && deltaCodec(items[i]!.asDelta!) === CODEC_DELTA); // a sparse record needs no base
      const bases = deltas.length === 0 ? [] : await this.lookup(deltas.map((i) => blockKey(items[i]!.asDelta!.base)));
      const whole = new Set(deltas.filter((i, n) => {
        const base = items[i]!.asDelta!.base;
        const loc = this.pending.get(base.toString('latin1')) ?? (bases[n] === undefined ? undefined : decodeLocation(bases[n]!));
        return loc?.codec !== CODEC_RAW;
      }));
      const record = (i: number) => {
        const it = items[i]!;
        if (it.asDelta && deltaCodec(it.asDelta) === CODEC_SPARSE) return { hash: it.hash, codec: CODEC_SPARSE, payload: it.asDelta.payload, parts: parts.get(i)! };
        if (it.asDelta && !whole.has(i)) return { hash: it.hash, codec: CODEC_DELTA, payload: it.asDelta.payload, parts: parts.get(i)!, base: it.asDelta.base };
        return { hash: it.hash, codec: CODEC_RAW, payload: it.data, parts: it.asDelta ? encodeRecordParts(it.hash, CODEC_RAW, it.data) : parts.get(i)! };
      };
      const records = fresh.map(record);
      let locs: BlockLocation[];
      try {
        locs = await this.packs.appendMany(records, opts);
      } catch (e) {
        if (this.packs.failed) await this.discardFailedLocked();
        throw e;
      }
      fresh.forEach((i, n) => {
        const base = records[n]!.base;
        this.pending.set(items[i]!.hash.toString('latin1'), base ? { ...locs[n]!, base } : locs[n]!);
        out[i] = true;
      });
      return out;
    });
  }

  /**
   * Store good copies of blocks whose record in the store is damaged or gone (`appliance repair`
   * fetches them from a peer, a peer pushes them with POST /v1/blocks/repair). Each must hash to
   * its hash. They are appended even though the index names their hashes, in batches of
   * {@link REPAIR_BATCH_BYTES}: each batch is made durable and then the index points at its new
   * records, in one synced batch, so a repair stopped midway keeps what its batches wrote. The
   * damaged records' bytes are no longer referenced, and gc reclaims them. A copy that does not
   * match its hash stops the stream with ERR_BLOCK_CORRUPT; the batches before its own stay.
   * `onRepaired` is told the hashes of each batch once it is durable. Each frame is held until
   * its batch is written (no copy) and its `release` called then, or when it is dropped.
   * `opts.budget`: as {@link putBlocks}' (a receiving server's budget of decoded frames): while
   * someone waits for it and this stream waits for its next frame, the batch is written at once.
   */
  async repairBlocks(frames: Iterable<BlockFrame> | AsyncIterable<BlockFrame>, onRepaired?: (hashes: readonly Hash[]) => void | Promise<void>, opts: PutBlocksOptions = {}): Promise<number> {
    this.checkOpen();
    let repaired = 0;
    let batch: BlockFrame[] = [];
    let bytes = 0;
    const write = async () => {
      const items = batch;
      batch = [];
      bytes = 0;
      try {
        await this.gcLock.shared(() => this.writeLock.run(async () => {
          this.checkOpen();
          await this.flushLocked();
          let locs: BlockLocation[];
          try {
            locs = await this.packs.appendMany(items.map((it) => ({ hash: it.hash, codec: CODEC_RAW, payload: it.data })));
          } catch (e) {
            if (this.packs.failed) await this.discardFailedLocked();
            throw e;
          }
          items.forEach((it, i) => this.pending.set(it.hash.toString('latin1'), locs[i]!));
          await this.flushLocked();
        }));
      } finally {
        for (const it of items) it.release?.(); // written (or failed): the bytes are no longer needed
      }
      repaired += items.length;
      await onRepaired?.(items.map((it) => it.hash));
    };
    // A block this store holds whole and readable, or that came earlier in the stream, is not
    // written again: each copy was appended (a peer sending one block 32 times added 512 MiB).
    const seen = new Set<string>();
    /** Blocks found good here: a damage record of them is stale, cleared with the last batch. */
    const good: Hash[] = [];
    const it = (async function* () {
      yield* frames;
    })();
    /** The next frame while it is on its way (not awaited on a failure: the sender may never send it). */
    let inFlight: Promise<IteratorResult<BlockFrame>> | undefined;
    let failed = true;
    try {
      for (;;) {
        const next = it.next();
        inFlight = next;
        let r: IteratorResult<BlockFrame>;
        if (opts.budget && batch.length > 0) {
          // Holding budget while the sender is slow: the batch is written as soon as another stream wants it.
          next.catch(() => undefined); // observed below
          let cancel = (): void => undefined;
          const wanted = new Promise<typeof CONTENDED>((resolve) => {
            cancel = opts.budget!.onContended(() => resolve(CONTENDED));
          });
          const got = await Promise.race([next, wanted]);
          cancel();
          if (got === CONTENDED) {
            await write();
            r = await next;
          } else r = got;
        } else r = await next;
        inFlight = undefined;
        if (r.done) break;
        const f = r.value;
        if (!isHash(f.hash) || isZeroHash(f.hash) || !blake3(f.data).equals(f.hash)) {
          f.release?.();
          throw new TandemError('ERR_BLOCK_CORRUPT', `the copy of block ${isHash(f.hash) ? toHex(f.hash) : '?'} to repair with does not match its hash; it was not written`, { details: { hash: isHash(f.hash) ? toHex(f.hash) : null } });
        }
        const key = f.hash.toString('latin1');
        if (seen.has(key)) {
          f.release?.();
          continue;
        }
        seen.add(key);
        if (await this.holdsGoodCopy(f.hash)) {
          good.push(Buffer.from(f.hash));
          f.release?.();
          continue;
        }
        // Held until written (its buffer may be a pooled one, or hold budget), then released.
        batch.push({ ...f, hash: Buffer.from(f.hash) });
        bytes += f.data.length;
        if (bytes >= REPAIR_BATCH_BYTES) await write();
      }
      failed = false;
    } finally {
      if (failed) {
        for (const f of batch.splice(0)) f.release?.(); // not written: a rerun sends them again
        if (inFlight) {
          void inFlight.then((r) => void (!r.done && r.value?.release?.()), () => undefined);
          void it.return(undefined).catch(() => undefined);
        } else await it.return(undefined).catch(() => undefined);
      }
    }
    if (batch.length > 0) await write();
    if (good.length > 0) await onRepaired?.(good);
    return repaired;
  }

  /** Whether block `hash` is held here and its record reads back whole (hash and CRC checked). */
  private async holdsGoodCopy(hash: Hash): Promise<boolean> {
    const loc = await this.locate(hash);
    if (!loc) return false;
    try {
      const b = await this.readBlockPooled(hash, loc, false, true);
      b.release?.();
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Verify and store a stream of blocks, then flush. Returns what was new. Blocks are verified as
   * they arrive and written in batches of about {@link PUT_BATCH_BYTES}; while one batch is being
   * written the next is verified, so hashing and disk writes overlap. A block that fails its
   * hash stops the stream with ERR_BLOCK_CORRUPT; the blocks before it are kept (flushed).
   * Each frame's `release` is called once its bytes are written or dropped.
   *
   * `opts.budget`: the byte budget `input`'s frames hold until released (sync/framing.ts
   * DecodeOptions.budget). While someone waits for it and this stream waits for its next frame,
   * the frames held go to the writer at once, as for the delta budget ({@link resolveDeltas}):
   * a stream waiting for its sender, or for that budget, holds none of it but writes under way.
   */
  async putBlocks(input: AsyncIterable<BlockFrame>, opts: PutBlocksOptions = {}): Promise<PutBlocksResult> {
    this.checkOpen();
    const needWhole: Hash[] = [];
    const frames = this.resolveDeltas(input, needWhole, opts.budget);
    const discards = this.discards;
    let stored = 0;
    let bytes = 0;
    let writing: Promise<void> = Promise.resolve();
    /** Hand a batch to the writer (writes stay in order); returns the write of the batch before. */
    const write = (batch: PutFrame[], parts: RecordParts[]): Promise<void> => {
      const prev = writing;
      writing = (async () => {
        try {
          const news = await this.putVerifiedMany(batch, { direct: true, parts });
          news.forEach((isNew, i) => {
            if (!isNew) return;
            stored++;
            bytes += batch[i]!.data.length;
          });
        } finally {
          for (const f of batch) f.release?.(); // written (or failed): the bytes are no longer needed
        }
        await prev;
      })();
      writing.catch(() => undefined); // observed below
      return prev;
    };
    let batch: PutFrame[] = [];
    let batchParts: RecordParts[] = [];
    let batchBytes = 0;
    let failure: unknown = null;
    try {
      for await (const received of frames) {
        if (received === FLUSH) {
          // The delta budget is wanted: the blocks held go to the writer now, not when the batch is full.
          if (batch.length > 0) {
            const older = write(batch, batchParts);
            batch = [];
            batchParts = [];
            batchBytes = 0;
            await older;
          }
          continue;
        }
        let f = received;
        try {
          if (opts.signal?.aborted) throw abortError(opts.signal, 'block upload stopped');
          this.checkBlock(f?.hash, f?.data);
        } catch (e) {
          f?.release?.();
          throw e;
        }
        // A whole block of little data is stored as patches of zeros (a sparse record), as a
        // scan stores it: a sender deflates such a block on the wire, which is smaller than its
        // patches, so it arrives whole.
        if (!f.asDelta && mayBeSparse(f.data, STORED_DELTA_DIVISOR)) {
          const asDelta = sparseOf(f.hash, f.data)?.stored;
          if (asDelta) f = { ...f, asDelta };
        }
        batch.push(f);
        // The record's checksum now, while the block just hashed is in the CPU's cache: later,
        // after a batch's index lookup, it is read from memory once more (~15 % of a receiving
        // appliance's main thread).
        batchParts.push(f.asDelta ? encodeRecordParts(f.hash, deltaCodec(f.asDelta), f.asDelta.payload) : encodeRecordParts(f.hash, CODEC_RAW, f.data));
        batchBytes += f.data.length;
        if (batchBytes >= PUT_BATCH_BYTES) {
          // At most two batches in memory: wait for the one before the batch just handed over.
          const older = write(batch, batchParts);
          batch = [];
          batchParts = [];
          batchBytes = 0;
          await older;
        }
      }
    } catch (e) {
      failure = e;
    }
    // Blocks verified before a failure (a cut stream, a corrupt block) are kept: a rerun skips them.
    if (batch.length > 0) write(batch, batchParts);
    try {
      await writing;
    } catch (e) {
      failure ??= e;
    }
    await this.flush();
    // A failed direct write (of this stream or another) discarded what was not yet durable,
    // which may include blocks of this stream: it must not be acknowledged as stored.
    if (this.discards !== discards) failure ??= this.discardCause;
    if (failure !== null) throw failure;
    return needWhole.length > 0 ? { stored, bytes, needWhole } : { stored, bytes };
  }

  /**
   * The frames of a block stream with delta frames (BlockFrame.delta) turned into blocks: this
   * store's copy of each base is read (its record's CRC checked; up to {@link DELTA_READS} at
   * once, past the page cache: bases are old blocks) and patched. The result is verified against
   * the frame's hash by the caller, as any block. A base this store lacks or cannot read leaves
   * the block out, named in `needWhole` for the sender to send it whole. Other frames pass as
   * they come (a `base` a sender attached is released: it is not needed here).
   *
   * Each block built takes its length of the store's {@link deltaBudget} first, given back by its
   * `release` (putBlocks calls it once the block is written). When the budget is short, or another
   * stream waits for it (or for `held`, the budget the input's frames hold) while this one waits
   * for its next frame, the blocks built and frames passed on are handed over and FLUSH has
   * putBlocks write its batch at once: a stream waiting for budget or for its sender holds none
   * but what is being written, so streams never wait on each other's budget. (The two budgets are
   * apart: a stream whose frames decoded ahead hold `held` may wait for the delta budget, whose
   * holders need nothing of `held` to write theirs.) A delta frame's `release` is called with the
   * block built from it, whose stored record may be its patches.
   */
  private async *resolveDeltas(input: AsyncIterable<BlockFrame>, needWhole: Hash[], held?: ContendedBudget): AsyncGenerator<PutFrame | typeof FLUSH> {
    const budget = this.deltaBudget;
    const pending: Array<Promise<PutFrame | null>> = [];
    /** Frames handed to putBlocks since its last FLUSH that hold budget (built from deltas, or holding `held`). */
    let unflushed = false;
    /** Everything built so far to putBlocks, then FLUSH: this stream then holds budget only for writes under way. */
    async function* flushOut(): AsyncGenerator<PutFrame | typeof FLUSH> {
      while (pending.length > 0) {
        const r = await pending.shift()!;
        if (r) yield r;
      }
      unflushed = false;
      yield FLUSH;
    }
    const it = input[Symbol.asyncIterator]();
    let next: Promise<IteratorResult<BlockFrame>> | undefined;
    try {
      for (;;) {
        if (!next) {
          next = it.next();
          next.catch(() => undefined); // observed below
        }
        let r: IteratorResult<BlockFrame>;
        if (pending.length === 0 && !unflushed) r = await next;
        else {
          // Holding budget while the sender is slow: given up as soon as another stream wants it.
          let cancel = (): void => undefined;
          let cancelHeld = (): void => undefined;
          const wanted = new Promise<typeof CONTENDED>((resolve) => {
            cancel = budget.onContended(() => resolve(CONTENDED));
            if (held) cancelHeld = held.onContended(() => resolve(CONTENDED));
          });
          const got = await Promise.race([next, wanted]);
          cancel();
          cancelHeld();
          if (got === CONTENDED) {
            yield* flushOut();
            continue;
          }
          r = got;
        }
        next = undefined;
        if (r.done) break;
        const f = r.value;
        if (!f?.delta) {
          f?.base?.release?.();
          if (held) unflushed = true;
          yield f;
          continue;
        }
        const { length } = f.delta;
        const n = Number.isInteger(length) && length > 0 && length <= MAX_BLOCK_SIZE ? length : 0; // resolveDelta refuses the rest
        if (!budget.tryTake(n)) {
          if (pending.length > 0 || unflushed) yield* flushOut();
          await budget.take(n);
        }
        const p = this.resolveDelta(f, needWhole).then(
          (b) => {
            if (!b) {
              f.release?.();
              budget.give(n);
              return null;
            }
            let given = false;
            const release = () => {
              b.release?.();
              f.release?.();
              if (!given) budget.give(n);
              given = true;
            };
            return { ...b, release };
          },
          (e: unknown) => {
            f.release?.();
            budget.give(n);
            throw e;
          },
        );
        p.catch(() => undefined); // observed in order below
        pending.push(p);
        while (pending.length >= DELTA_READS) {
          const b = await pending.shift()!;
          if (b) {
            unflushed = true;
            yield b;
          }
        }
      }
      while (pending.length > 0) {
        const b = await pending.shift()!;
        if (b) yield b;
      }
    } finally {
      for (const p of pending.splice(0)) void p.then((b) => b?.release?.(), () => undefined);
      // Not awaited when a frame is still on its way: the sender may never send it (the request
      // is ended by its route), and this stream's failure must not wait for it.
      if (next) {
        void next.then((r) => void (!r.done && r.value?.release?.()), () => undefined);
        void it.return?.(undefined).catch(() => undefined);
      } else await it.return?.(undefined).catch(() => undefined);
    }
  }

  /**
   * A block held here read as the base of a delta (its record's CRC checked), or undefined when
   * it is absent, damaged or moved by a concurrent gc: the block made from it then goes whole
   * (`verify` reports damage).
   */
  private async readBaseBlock(hash: Hash, direct: boolean): Promise<ReadBlock | undefined> {
    try {
      const loc = await this.locate(hash);
      return loc ? await this.readBlockPooled(hash, loc, true, direct) : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * @internal How a scan stores `data`, the new block `hash` at a position where the parent
   * snapshot has block `was`: as a delta of it (storedDelta) when this store holds a readable
   * copy (read past the page cache, its record's CRC checked) and the two differ in little;
   * for a `was` of ZERO_HASH, as patches of zeros (a sparse record; nothing is read) when it
   * holds little data; else undefined (whole).
   */
  async deltaOf(hash: Hash, data: Buffer, was: Hash): Promise<DeltaOf | undefined> {
    if (was.equals(hash)) return undefined;
    if (isZeroHash(was)) return sparseOf(hash, data); // nothing to read
    const b = await this.readBaseBlock(was, true);
    if (!b) return undefined;
    try {
      const patches = diffBlock(data, was, b.data)?.subarray(32);
      return patches && { stored: storedDelta(was, b.stored, patches, data.length, hash), patches };
    } catch {
      return undefined; // a stored delta that does not compose: verify reports it; this block goes whole
    } finally {
      b.release?.();
    }
  }

  private async resolveDelta(f: BlockFrame, needWhole: Hash[]): Promise<PutFrame | null> {
    const { base, length } = f.delta!;
    checkHash(f.hash);
    if (length === 0 || length > MAX_BLOCK_SIZE) throw new TandemError('ERR_BLOCK_CORRUPT', `the delta of block ${toHex(f.hash)} claims ${length} bytes`, { details: { hash: toHex(f.hash) } });
    const block = isZeroHash(base) ? { data: Buffer.alloc(length) } : await this.readBaseBlock(base, true);
    if (!block) {
      needWhole.push(f.hash);
      return null;
    }
    try {
      if (block.data.length !== length) {
        throw new TandemError('ERR_BLOCK_CORRUPT', `the delta of block ${toHex(f.hash)} names base ${toHex(base)} as ${length} bytes; it has ${block.data.length} here`, { details: { hash: toHex(f.hash), base: toHex(base) } });
      }
      applyPatches(block.data, f.data, f.hash);
    } catch (e) {
      block.release?.();
      throw e;
    }
    const asDelta = storedDelta(base, block.stored, f.data, length, f.hash);
    return { hash: f.hash, data: block.data, ...(block.release ? { release: block.release } : {}), ...(asDelta ? { asDelta } : {}) };
  }

  /** Throw ERR_BAD_REQUEST / ERR_BLOCK_CORRUPT unless `data` is a block whose BLAKE3 is `hash`. */
  private checkBlock(hash: Hash, data: Buffer): void {
    checkHash(hash);
    if (!Buffer.isBuffer(data) || data.length === 0 || data.length > MAX_BLOCK_SIZE) {
      throw new TandemError('ERR_BAD_REQUEST', `block ${toHex(hash)}: data must be 1 byte to 16 MiB`, { details: { hash: toHex(hash) } });
    }
    const actual = hashBlock(data);
    if (!actual.equals(hash)) {
      throw new TandemError('ERR_BLOCK_CORRUPT', `block ${toHex(hash)} does not match its hash (got ${toHex(actual)}); it was damaged on the way, retry`, { details: { hash: toHex(hash), actual: toHex(actual) } });
    }
  }

  /**
   * For a process that lives on (`serve`, `daemon`): keep one hash pool started between scans
   * (HashPools.keepWarm). Its direct appends' staging slots (27 MiB, PackFiles) are allocated by
   * the first and kept as well.
   */
  keepWarm(): void {
    this.hashPools.keepWarm();
  }

  /** Make every block put so far durable: fsync packs, then write their index entries (one batch). */
  flush(): Promise<void> {
    return this.writeLock.run(() => this.flushLocked());
  }

  /** @internal flush() for a caller that holds the write lock. */
  /**
   * Under the write lock, after a failed direct write (PackFiles.discardUnsynced): forget the
   * blocks appended since the last flush, whose bytes are gone, and throw the failure.
   */
  private async discardFailedLocked(): Promise<never> {
    const failure = await this.packs.discardUnsynced();
    this.pending.clear();
    this.discards++;
    this.discardCause = failure;
    throw failure;
  }

  async flushLocked(): Promise<void> {
    if (this.packs.failed) await this.discardFailedLocked();
    if (this.pending.size === 0) return;
    let lengths: Map<number, number>;
    try {
      lengths = await this.packs.sync();
    } catch (e) {
      if (this.packs.failed) await this.discardFailedLocked();
      throw e;
    }
    const batch = this.db.batch();
    for (const [k, loc] of this.pending) batch.put(blockKey(Buffer.from(k, 'latin1')), encodeLocation(loc));
    for (const [id, n] of lengths) batch.put(packKey(id), encodeU64(n));
    await this.writeSynced(batch);
    this.packs.markDurable(lengths);
    this.pending.clear();
  }

  // --- nodes -------------------------------------------------------------------------------

  async hasNodes(hashes: readonly Hash[]): Promise<boolean[]> {
    this.checkOpen();
    for (const h of hashes) checkHash(h);
    const vals = await this.lookup(hashes.map(nodeKey));
    return hashes.map((h, i) => isZeroHash(h) || vals[i] !== undefined);
  }

  /**
   * Nodes in the order asked, verified. ERR_NODE_MISSING for an absent one, including ZERO_HASH,
   * which names an all-zero subtree rather than a node (walkers treat it as such).
   */
  async getNodes(hashes: readonly Hash[]): Promise<TreeNode[]> {
    this.checkOpen();
    for (const h of hashes) checkHash(h);
    const out = hashes.map((h) => this.cachedNode(h));
    const ask = hashes.flatMap((_, i) => (out[i] ? [] : [i]));
    const epoch = this.nodeEpoch;
    const vals = ask.length === 0 ? [] : await this.lookup(ask.map((i) => nodeKey(hashes[i]!)));
    ask.forEach((i, n) => {
      const h = hashes[i]!;
      const v = vals[n];
      if (v === undefined) {
        throw new TandemError('ERR_NODE_MISSING', isZeroHash(h)
          ? 'ZERO_HASH names an all-zero subtree, not a stored node'
          : `tree node ${toHex(h)} is not in the store`, { details: { hash: toHex(h) } });
      }
      const node = decodeNode(h, v);
      if (!node) throw new TandemError('ERR_NODE_CORRUPT', `tree node ${toHex(h)} is damaged in the index; run \`appliance verify\``, { details: { hash: toHex(h) } });
      this.cacheNode(node, epoch);
      out[i] = node;
    });
    return out as TreeNode[];
  }

  /** A node of {@link nodeCache}, now the most recently used. */
  private cachedNode(h: Hash): TreeNode | undefined {
    const key = h.toString('latin1');
    const n = this.nodeCache.get(key);
    if (n) {
      this.nodeCache.delete(key);
      this.nodeCache.set(key, n);
    }
    return n;
  }

  /** Keep `n`, looked up in `epoch` (see {@link nodeEpoch}). */
  private cacheNode(n: TreeNode, epoch: number): void {
    if (epoch !== this.nodeEpoch) return;
    this.nodeCache.set(n.hash.toString('latin1'), n);
    if (this.nodeCache.size > NODE_CACHE_MAX) this.nodeCache.delete(this.nodeCache.keys().next().value!);
  }

  /** @internal gc, once it deleted nodes: the cache holds only nodes the index holds, and no deleted node is put again. */
  forgetNodes(): void {
    this.nodeEpoch++;
    this.nodeCache.clear();
    this.unsyncedNodes.clear();
    this.unsyncedNodeBytes = 0;
  }

  /**
   * Under the write lock: write nodes' index entries without a sync, kept to be put again by the
   * next synced batch ({@link unsyncedNodes}); synced, with those kept, once they would pass
   * {@link UNSYNCED_NODE_BYTES}.
   */
  private async writeNodesLocked(nodes: readonly TreeNode[]): Promise<void> {
    if (nodes.length === 0) return;
    const batch = this.db.batch();
    const entries = nodes.map((n) => [nodeKey(n.hash), encodeNode(n)] as const);
    let bytes = 0;
    for (const [k, v] of entries) {
      batch.put(k, v);
      bytes += k.length + v.length;
    }
    if (this.unsyncedNodeBytes + bytes <= UNSYNCED_NODE_BYTES) {
      await batch.write();
      for (const [k, v] of entries) this.unsyncedNodes.set(k.toString('latin1'), v);
      this.unsyncedNodeBytes += bytes;
      return;
    }
    await this.writeSynced(batch);
  }

  /** Write `batch` synced, with the nodes written unsynced before it put again ({@link unsyncedNodes}). */
  private async writeSynced(batch: ReturnType<Db['batch']>): Promise<void> {
    for (const [k, v] of this.unsyncedNodes) batch.put(Buffer.from(k, 'latin1'), v);
    await this.indexWrite(() => batch.write({ sync: true }));
    this.unsyncedNodes.clear();
    this.unsyncedNodeBytes = 0;
  }

  /** @internal One node, verified. */
  getNode = async (hash: Hash): Promise<TreeNode> => (await this.getNodes([hash]))[0]!;

  /** The nodes held of `hashes`, verified; undefined for an absent one (or none asked), a damaged one, or ZERO_HASH. */
  async nodesHeld(hashes: ReadonlyArray<Hash | undefined>): Promise<Array<TreeNode | undefined>> {
    this.checkOpen();
    const found = new Map<string, TreeNode>();
    const asked: Hash[] = [];
    for (const h of hashes) {
      if (h === undefined || !isHash(h) || isZeroHash(h)) continue;
      const n = this.cachedNode(h);
      if (n) found.set(h.toString('latin1'), n);
      else asked.push(h);
    }
    const epoch = this.nodeEpoch;
    const vals = asked.length === 0 ? [] : await this.lookup(asked.map(nodeKey));
    asked.forEach((h, i) => {
      const v = vals[i];
      const n = v === undefined ? null : decodeNode(h, v);
      if (n) {
        this.cacheNode(n, epoch);
        found.set(h.toString('latin1'), n);
      }
    });
    return hashes.map((h) => (h === undefined ? undefined : found.get(h.toString('latin1'))));
  }

  /**
   * For each node to put, its base as this store holds it at the node's level, verified; else
   * undefined (absent, damaged or of another level: every child of that node is looked up).
   */
  private async baseNodes(nodes: ReadonlyArray<NodeToPut | NodeChangeToPut>): Promise<Array<TreeNode | undefined>> {
    const held = await this.nodesHeld(nodes.map((n) => n.base));
    return held.map((b, i) => (b && b.level === nodes[i]!.level ? b : undefined));
  }

  /**
   * Store verified nodes whose children are all present (blocks for level 1, nodes of the level
   * below otherwise; nodes in the same call count). Throws ERR_SNAPSHOT_INCOMPLETE naming the
   * missing children, storing nothing. Idempotent. A node given as a change of its base
   * (NodeChangeToPut) is rebuilt from this store's copy of the base, then verified as any.
   */
  async putNodes(input: ReadonlyArray<NodeToPut | NodeChangeToPut>): Promise<void> {
    this.checkOpen();
    if (!Array.isArray(input)) throw new TandemError('ERR_BAD_REQUEST', 'putNodes takes an array of nodes');
    for (const n of input) {
      if (isNodeChange(n)) checkNodeChange(n);
      else checkNode(n);
      if (n.base !== undefined && !isHash(n.base)) throw new TandemError('ERR_BAD_REQUEST', 'a node\'s base must be a 32-byte hash');
    }
    if (input.length === 0) return;
    await this.gcLock.shared(() => this.writeLock.run(async () => {
      await this.flushLocked();
      const batchLevels = new Map<string, number>();
      for (const n of input) batchLevels.set(n.hash.toString('latin1'), n.level);
      const bases = await this.baseNodes(input);
      const nodes = input.map((n, j) => (isNodeChange(n) ? applyNodeChange(n, bases[j]) : n));
      const blockAsk: Hash[] = [];
      const nodeAsk: Array<{ hash: Hash; level: number }> = [];
      const seen = new Set<string>();
      // Index loops: entries() made an array per child (13 MB of garbage in 9 syncs of 82 blocks).
      for (let j = 0; j < nodes.length; j++) {
        const n = nodes[j]!;
        const base = bases[j];
        for (let i = 0; i < n.children.length; i++) {
          const c = n.children[i]!;
          if (isZeroHash(c)) continue;
          if (base?.children[i]?.equals(c)) continue; // in the base's subtree, which is here whole
          const k = c.toString('latin1');
          if (seen.has(k)) continue;
          seen.add(k);
          if (n.level === 1) blockAsk.push(c);
          else if (batchLevels.get(k) === n.level - 1) continue;
          else nodeAsk.push({ hash: c, level: n.level - 1 });
        }
      }
      const missing: string[] = [];
      const bvals = await this.lookup(blockAsk.map(blockKey));
      blockAsk.forEach((h, i) => bvals[i] === undefined && missing.push(toHex(h)));
      const nvals = await this.lookup(nodeAsk.map((x) => nodeKey(x.hash)));
      nodeAsk.forEach((x, i) => (nvals[i] === undefined || nvals[i]![0] !== x.level) && missing.push(toHex(x.hash)));
      if (missing.length > 0) {
        throw new TandemError('ERR_SNAPSHOT_INCOMPLETE', `${missing.length} children of the nodes are not in the store (first ${missing[0]}); send them first`, {
          details: { missing: missing.slice(0, 16), count: missing.length },
        });
      }
      await this.writeNodesLocked(nodes);
      // The next sync's nodes are sent as changes of these (gc waits for this lock).
      for (const n of nodes) this.cacheNode(n, this.nodeEpoch);
    }));
  }

  // --- snapshots ---------------------------------------------------------------------------

  /** Snapshots of a volume, oldest first (ids are time-sortable). Empty for an unknown volume. */
  async listSnapshots(volume: string): Promise<SnapshotRecord[]> {
    this.checkOpen();
    checkVolumeName(volume);
    const out: SnapshotRecord[] = [];
    await this.indexRead(async () => {
      for await (const v of this.db.values(snapshotRange(volume))) out.push(parseJson<SnapshotRecord>(v));
    });
    return out;
  }

  async latestSnapshot(volume: string): Promise<SnapshotRecord | null> {
    this.checkOpen();
    if (!isValidVolumeName(volume)) return null;
    return this.indexRead(async () => {
      for await (const v of this.db.values({ ...snapshotRange(volume), reverse: true, limit: 1 })) return parseJson<SnapshotRecord>(v);
      return null;
    });
  }

  async getSnapshot(volume: string, id: string): Promise<SnapshotRecord | null> {
    this.checkOpen();
    if (!isValidVolumeName(volume) || !isValidSnapshotId(id)) return null;
    const v = await this.lookupSettled(snapshotKey(volume, id));
    return v === undefined ? null : parseJson<SnapshotRecord>(v);
  }

  /** "VOL" = its latest snapshot, "VOL@ID" = that one. ERR_VOLUME_NOT_FOUND / ERR_SNAPSHOT_NOT_FOUND. */
  async resolveSnapshot(spec: string): Promise<SnapshotRecord> {
    this.checkOpen();
    if (typeof spec !== 'string' || spec.length === 0) throw new TandemError('ERR_BAD_REQUEST', 'a snapshot is named VOL or VOL@SNAPSHOT_ID');
    const at = spec.indexOf('@');
    const volume = at < 0 ? spec : spec.slice(0, at);
    const id = at < 0 ? undefined : spec.slice(at + 1);
    checkVolumeName(volume);
    if (id !== undefined) checkSnapshotId(id);
    const snap = id === undefined ? await this.latestSnapshot(volume) : await this.getSnapshot(volume, id);
    if (snap) return snap;
    if (!(await this.getVolume(volume))) {
      throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume named ${volume}; see \`appliance volume list\``, { details: { volume } });
    }
    throw new TandemError('ERR_SNAPSHOT_NOT_FOUND', id === undefined
      ? `volume ${volume} has no snapshot yet; run \`appliance snapshot ${volume}\``
      : `volume ${volume} has no snapshot ${id}; see \`appliance snapshots ${volume}\``, { details: { volume, snapshot: id } });
  }

  /**
   * Commit a snapshot whose root (and so whole tree) is present: flushes pending blocks, then
   * writes the record (and the volume record when the volume is new) in one synced batch.
   * Idempotent for an identical record; ERR_SNAPSHOT_INCOMPLETE when the root is absent.
   */
  async commitSnapshot(record: SnapshotRecord): Promise<void> {
    this.checkOpen();
    const r = normalizeSnapshot(record);
    await this.gcLock.shared(async () => {
      await this.checkReceivedTree(r);
      await this.commitUnderGcLock(r);
    });
  }

  /**
   * A snapshot built elsewhere (a peer's push, a pull from a peer) fits its size and says what it
   * holds. Hashes cannot tell: a short block is as well-formed as any, content addressing lets a
   * tree name it anywhere, and a node may name more or fewer children than its place has. A peer
   * that sent such a tree (a fault, or a peer that means harm) would leave a snapshot that no
   * restore can write, whose root differs from the same content built here, and that `verify`
   * must then report; it is refused with ERR_SNAPSHOT_INVALID, nothing committed. Checked on the
   * tree diff against the volume's latest snapshot here (snapshots this store builds,
   * buildSnapshot, are so by construction):
   * - every block it reaches that the latest does not reach at the same place has the length of
   *   its place: the block size, or what is left of the volume for the last block;
   * - every node read on the way has the children of its place (store/tree.ts childCount);
   * - its nonZeroBlocks is the latest's plus the non-zero blocks gained less those lost (when it
   *   is not, the whole tree is counted before it is refused: the latest may be the one that is
   *   wrong, committed before this check).
   * Cost: one index lookup per block that changed since that snapshot, with the walk of the
   * changed paths: 2,048 blocks took 32-60 ms (so ~0.1-0.25 s for a first sync of 4 GiB, 1-2 %
   * of its transfer; an incremental sync's 82 blocks, 1-3 ms).
   */
  private async checkReceivedTree(r: SnapshotRecord): Promise<void> {
    const root = parseHex(r.root)!;
    if (isZeroHash(root)) {
      if (r.nonZeroBlocks !== 0) throw this.invalid(r, `says it holds ${r.nonZeroBlocks} non-zero blocks; its root is the zero tree, which holds none`, { nonZeroBlocks: r.nonZeroBlocks, counted: 0 });
      return;
    }
    const v = this.lookupOne(nodeKey(root));
    // An absent root or one of another level, or a snapshot committed already: commitUnderGcLock says so.
    if (v === undefined || v[0] !== r.height || this.lookupOne(snapshotKey(r.volume, r.id)) !== undefined) return;
    await this.writeLock.run(() => this.flushLocked()); // a sparse record's length is read from its pack
    const latest = await this.latestSnapshot(r.volume);
    const base = latest && latest.blockSize === r.blockSize && latest.size === r.size ? latest : null;
    const blocks = blockCount(r.size, r.blockSize);
    const tail = r.size - (blocks - 1) * r.blockSize;
    const shape = (node: TreeNode, level: number, j: number): void => {
      const want = childCount(blocks, level, j);
      if (node.children.length !== want) {
        throw this.invalid(r, `has at level ${level}, place ${j}, a node of ${node.children.length} children where ${want} belong`, { node: toHex(node.hash), level, place: j, children: node.children.length, expected: want });
      }
    };
    const delta = await checkTreeOnce(base ? shapeOf(base) : null, shapeOf(r), this.getNode, shape, async (c) => {
      const want = c.last ? tail : r.blockSize;
      const got = await this.blockLength(c.hash);
      if (got === undefined) {
        throw new TandemError('ERR_SNAPSHOT_INCOMPLETE', `snapshot ${r.volume}@${r.id}: block ${c.index} (${toHex(c.hash)}) is not in the store; send it first`, { details: { volume: r.volume, snapshot: r.id, missing: [toHex(c.hash)] } });
      }
      if (got !== want) {
        throw this.invalid(r, `names at block ${c.index} a block of ${got} bytes where ${want} belong`, { blockIndex: c.index, hash: toHex(c.hash), length: got, expected: want });
      }
    });
    let nonZero = (base ? base.nonZeroBlocks : 0) + delta;
    if (nonZero !== r.nonZeroBlocks && base) nonZero = await countNonZero(root, r.height, this.getNode);
    if (nonZero !== r.nonZeroBlocks) throw this.invalid(r, `says it holds ${r.nonZeroBlocks} non-zero blocks; its tree holds ${nonZero}`, { nonZeroBlocks: r.nonZeroBlocks, counted: nonZero });
  }

  /** ERR_SNAPSHOT_INVALID: snapshot `r` (built elsewhere) does not fit its size or record; `what` says how. */
  private invalid(r: SnapshotRecord, what: string, details: Record<string, unknown>): TandemError {
    return new TandemError('ERR_SNAPSHOT_INVALID', `snapshot ${r.volume}@${r.id} (${r.size} bytes in blocks of ${r.blockSize}) ${what}: its tree does not fit its record and no restore could trust it. Nothing was committed: the appliance that built it must be checked (\`appliance verify\` there)`, {
      details: { volume: r.volume, snapshot: r.id, ...details },
    });
  }

  /**
   * @internal The length of a held block from its index entry (a delta's is its base's, a sparse
   * record's is in its payload); undefined when the store lacks it or its base.
   */
  async blockLength(hash: Hash): Promise<number | undefined> {
    const loc = await this.locate(hash);
    if (!loc) return undefined;
    if (loc.codec === CODEC_RAW) return loc.length;
    if (loc.codec === CODEC_SPARSE) return (await this.readPatchRecord(hash, loc)).readUInt32BE(0);
    if (loc.codec === CODEC_DELTA && loc.base) {
      const base = await this.locate(loc.base);
      return base?.codec === CODEC_RAW ? base.length : undefined;
    }
    return undefined;
  }

  /** @internal commitSnapshot for a caller that already holds the shared gc lock. */
  commitUnderGcLock(r: SnapshotRecord): Promise<void> {
    return this.writeLock.run(async () => {
      await this.flushLocked();
      const root = parseHex(r.root)!;
      if (!isZeroHash(root)) {
        const v = this.lookupOne(nodeKey(root));
        if (v === undefined) {
          throw new TandemError('ERR_SNAPSHOT_INCOMPLETE', `snapshot ${r.volume}@${r.id}: its root node ${r.root} is not in the store; send the tree first`, { details: { volume: r.volume, snapshot: r.id, missing: [r.root] } });
        }
        if (v[0] !== r.height) throw new TandemError('ERR_BAD_REQUEST', `snapshot ${r.volume}@${r.id}: the root node has level ${v[0]}, not the height ${r.height}`, { details: { volume: r.volume, snapshot: r.id } });
      }
      const existing = this.lookupOne(snapshotKey(r.volume, r.id));
      if (existing !== undefined) {
        if (sameJson(parseJson(existing), r)) return;
        throw new TandemError('ERR_BAD_REQUEST', `snapshot ${r.volume}@${r.id} exists with other contents; snapshot ids are never reused`, { details: { volume: r.volume, snapshot: r.id } });
      }
      const batch = this.db.batch();
      const vol = await this.getVolume(r.volume);
      if (!vol) {
        batch.put(volumeKey(r.volume), json({ name: r.volume, blockSize: r.blockSize, size: r.size, created: new Date().toISOString() } satisfies VolumeRecord));
      } else if (vol.blockSize !== r.blockSize) {
        throw new TandemError('ERR_BLOCK_SIZE_MISMATCH', `snapshot ${r.volume}@${r.id} has block size ${r.blockSize} but volume ${r.volume} uses ${vol.blockSize}; use the same block size on both appliances`, { details: { volume: r.volume, snapshot: r.id } });
      } else if (vol.size !== r.size) {
        const latest = await this.latestSnapshot(r.volume);
        if (!latest || latest.id < r.id) batch.put(volumeKey(r.volume), json({ ...vol, size: r.size }));
      }
      batch.put(snapshotKey(r.volume, r.id), json(r));
      await this.writeSynced(batch);
    });
  }

  /** Delete a snapshot record; its blocks and nodes come back at gc(). ERR_SNAPSHOT_NOT_FOUND. */
  async deleteSnapshot(volume: string, id: string): Promise<void> {
    await this.deleteSnapshots(volume, [id]);
  }

  /**
   * Delete snapshots of `volume`: all of them in one synced index batch, or none (a crash
   * between two deletions left some deleted, and the rerun of the same command met
   * ERR_SNAPSHOT_NOT_FOUND). ERR_SNAPSHOT_NOT_FOUND, nothing deleted, if one is absent.
   */
  async deleteSnapshots(volume: string, ids: readonly string[]): Promise<void> {
    this.checkOpen();
    checkVolumeName(volume);
    for (const id of ids) checkSnapshotId(id);
    await this.writeLock.run(async () => {
      const batch = this.db.batch();
      for (const id of ids) {
        const key = snapshotKey(volume, id);
        if (this.lookupOne(key) === undefined) {
          throw new TandemError('ERR_SNAPSHOT_NOT_FOUND', `volume ${volume} has no snapshot ${id}; see \`appliance snapshots ${volume}\``, { details: { volume, snapshot: id } });
        }
        batch.del(key);
      }
      await this.writeSynced(batch);
    });
  }

  /**
   * Build and commit a snapshot from a parent plus ascending block changes (blocks already put):
   * subtrees without changes are reused from the parent; memory is one node per level.
   * Blocks beyond the parent's end that are not listed are zeros.
   */
  async buildSnapshot(opts: BuildSnapshotOptions): Promise<SnapshotRecord> {
    this.checkOpen();
    return this.gcLock.shared(() => this.buildUnderGcLock(opts));
  }

  /** @internal buildSnapshot for a caller that already holds the shared gc lock. */
  async buildUnderGcLock(opts: BuildSnapshotOptions, treeParent?: SnapshotRecord | null): Promise<SnapshotRecord> {
    const volume = checkVolumeName(opts.volume);
    const size = checkSize(opts.size);
    const blockSize = checkBlockSize(opts.blockSize);
    const parent = opts.parent ? normalizeSnapshot(opts.parent) : null;
    if (parent && parent.blockSize !== blockSize) {
      throw new TandemError('ERR_BLOCK_SIZE_INVALID', `the parent snapshot ${parent.volume}@${parent.id} has block size ${parent.blockSize}, not ${blockSize}`, { details: { volume } });
    }
    const id = opts.id === undefined ? undefined : checkSnapshotId(opts.id);
    const created = id === undefined ? await this.laterThanLatest(volume, opts.created ?? new Date().toISOString()) : opts.created ?? new Date().toISOString();
    // The tree is built on `treeParent` when given (a full scan passes null: every block is
    // listed), while the record names opts.parent as its parent either way.
    const base = treeParent === undefined ? parent : treeParent;
    {
      const blocks = blockCount(size, blockSize);
      const batch: TreeNode[] = [];
      const writeNodes = async () => {
        if (batch.length === 0) return;
        const nodes = batch.splice(0);
        await this.writeLock.run(async () => {
          // Blocks first: a durable node implies its blocks are durable.
          await this.flushLocked();
          const present = await this.lookup(nodes.map((n) => nodeKey(n.hash)));
          await this.writeNodesLocked(nodes.filter((_, i) => present[i] === undefined));
          // A sync sends them next (gc waits for the scan's shared lock).
          for (const n of nodes) this.cacheNode(n, this.nodeEpoch);
        });
      };
      const checked = this.checkChanges(opts.changes);
      const tree = await buildTree({
        blocks,
        parent: base ? { ...shapeOf(base), nonZeroBlocks: base.nonZeroBlocks } : null,
        changes: checked,
        get: this.getNode,
        emit: async (n) => {
          batch.push(n);
          if (batch.length >= NODE_BATCH) await writeNodes();
        },
      });
      await writeNodes();
      const record: SnapshotRecord = {
        id: id ?? newSnapshotId(new Date(created)),
        volume, size, blockSize, root: toHex(tree.root), height: tree.height, created,
        parent: parent ? parent.id : null, origin: opts.origin, nonZeroBlocks: tree.nonZeroBlocks,
        ...(opts.labels ? { labels: opts.labels } : {}),
      };
      const r = normalizeSnapshot(record);
      await this.commitUnderGcLock(r);
      return r;
    }
  }

  /**
   * `created`, or 1 ms past the volume's latest snapshot when that one is not older. A snapshot's
   * id is made from its time and the latest snapshot is the greatest id: a clock set back (an NTP
   * step, a resumed VM) or running behind the peer's (whose snapshots this store holds, and
   * which a failback pulls back) would otherwise give a new snapshot an id below the latest, so
   * that it would not be the latest: a change-list snapshot would then build on the wrong parent
   * and a sync send an older state.
   */
  private async laterThanLatest(volume: string, created: string): Promise<string> {
    const latest = await this.latestSnapshot(volume);
    if (!latest) return created;
    const floor = Math.max(Date.parse(latest.created) || 0, snapshotIdTime(latest.id) ?? 0) + 1;
    return Date.parse(created) >= floor ? created : new Date(floor).toISOString();
  }

  /** Pass changes through, checking in batches that their blocks are held (node invariant). */
  private async *checkChanges(src: Iterable<BlockChange> | AsyncIterable<BlockChange>): AsyncGenerator<BlockChange> {
    const CHECK_BATCH = 256;
    let buf: BlockChange[] = [];
    const check = async () => {
      const nz = buf.filter((c) => isHash(c?.hash) && !isZeroHash(c.hash));
      const has = await this.hasBlocks(nz.map((c) => c.hash));
      const missing = nz.filter((_, i) => !has[i]);
      if (missing.length > 0) {
        throw new TandemError('ERR_SNAPSHOT_INCOMPLETE', `${missing.length} changed blocks are not in the store (first: block ${missing[0]!.index}, ${toHex(missing[0]!.hash)}); put them first`, {
          details: { missing: missing.slice(0, 16).map((c) => toHex(c.hash)) },
        });
      }
    };
    for await (const c of src as AsyncIterable<BlockChange>) {
      buf.push(c);
      if (buf.length >= CHECK_BATCH) {
        await check();
        yield* buf;
        buf = [];
      }
    }
    await check();
    yield* buf;
  }

  /**
   * Snapshot a volume: read it (or only opts.changedBlocks, with opts.parent), hash on worker
   * threads, store missing blocks, build the tree and commit. `created` is the time the scan started.
   */
  async scanVolume(reader: VolumeReader, opts: SnapshotOptions): Promise<SnapshotRecord> {
    this.checkOpen();
    return scanVolume(this, reader, opts);
  }

  /** Every block index of a snapshot in order, with its hash (ZERO_HASH for zero blocks). */
  async *blockHashes(snap: SnapshotRecord): AsyncGenerator<BlockChange> {
    this.checkOpen();
    yield* walkBlocks(shapeOf(normalizeSnapshot(snap)), this.getNode);
  }

  /**
   * Indices of `target` whose hash differs from `base` (base null: every non-zero block), in
   * order with the target's hash; equal subtrees are skipped without reading them.
   */
  async *diffSnapshots(base: SnapshotRecord | null, target: SnapshotRecord): AsyncGenerator<BlockChange> {
    this.checkOpen();
    const t = normalizeSnapshot(target);
    const b = base ? normalizeSnapshot(base) : null;
    if (b && b.blockSize !== t.blockSize) {
      throw new TandemError('ERR_BLOCK_SIZE_INVALID', `cannot compare snapshots of block sizes ${b.blockSize} and ${t.blockSize}`, { details: { base: b.id, target: t.id } });
    }
    yield* diffTrees(b ? shapeOf(b) : null, shapeOf(t), this.getNode);
  }

  // --- volumes -----------------------------------------------------------------------------

  async getVolume(name: string): Promise<VolumeRecord | null> {
    this.checkOpen();
    if (!isValidVolumeName(name)) return null;
    const v = await this.lookupSettled(volumeKey(name));
    return v === undefined ? null : parseJson<VolumeRecord>(v);
  }

  async listVolumes(): Promise<VolumeRecord[]> {
    this.checkOpen();
    const out: VolumeRecord[] = [];
    await this.indexRead(async () => {
      for await (const v of this.db.values(namespaceRange(NS.volume))) out.push(parseJson<VolumeRecord>(v));
    });
    return out;
  }

  /** Create or replace a volume record (validated). */
  async putVolume(v: VolumeRecord): Promise<void> {
    this.checkOpen();
    const r = normalizeVolume(v);
    await this.writeLock.run(() => this.indexWrite(() => this.db.put(volumeKey(r.name), json(r), { sync: true })));
  }

  /**
   * Remove volume `name` and its snapshots (space comes back at gc()), and the `meta` entries
   * given ([namespace, key]; the caller's records of the volume), in one synced batch: a crash
   * leaves all or none (a removal
   * killed between its steps left a record that refused the next push of the name, with no
   * volume left for \`volume remove\` to find).
   */
  async removeVolume(name: string, meta: ReadonlyArray<readonly [string, string]> = []): Promise<void> {
    this.checkOpen();
    checkVolumeName(name);
    for (const [ns, key] of meta) checkMetaName(ns, key);
    await this.writeLock.run(async () => {
      const batch = this.db.batch();
      for (const [ns, key] of meta) batch.del(metaKey(ns, key));
      let n = 0;
      for await (const k of this.db.keys(snapshotRange(name))) {
        batch.del(k);
        n++;
      }
      const had = this.lookupOne(volumeKey(name)) !== undefined;
      if (!had && n === 0) {
        await batch.close();
        throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume named ${name}; see \`appliance volume list\``, { details: { volume: name } });
      }
      batch.del(volumeKey(name));
      await this.writeSynced(batch);
    });
  }

  // --- meta --------------------------------------------------------------------------------

  async getMeta<T>(ns: string, key: string): Promise<T | undefined> {
    this.checkOpen();
    checkMetaName(ns, key);
    const v = await this.lookupSettled(metaKey(ns, key));
    return v === undefined ? undefined : parseJson<T>(v);
  }

  /**
   * Durable (synced) JSON value; `undefined` is refused (use deleteMeta). With `sync: false` the
   * write survives the process being killed (the OS has it) but not a power loss: for hints whose
   * loss costs a little work, never correctness.
   */
  async putMeta(ns: string, key: string, value: unknown, opts: { sync?: boolean } = {}): Promise<void> {
    this.checkOpen();
    checkMetaName(ns, key);
    if (value === undefined) throw new TandemError('ERR_BAD_REQUEST', `meta ${ns}/${key}: value is undefined; use deleteMeta`);
    const buf = json(value);
    await this.writeLock.run(() => this.indexWrite(() => this.db.put(metaKey(ns, key), buf, { sync: opts.sync !== false })));
  }

  /** Synced, as {@link putMeta} (and `sync: false` as there). */
  async deleteMeta(ns: string, key: string, opts: { sync?: boolean } = {}): Promise<void> {
    this.checkOpen();
    checkMetaName(ns, key);
    await this.writeLock.run(() => this.indexWrite(() => this.db.del(metaKey(ns, key), { sync: opts.sync !== false })));
  }

  /** Every [key, value] of a namespace in key order. */
  async listMeta<T>(ns: string): Promise<Array<[string, T]>> {
    this.checkOpen();
    checkMetaName(ns, 'x');
    const out: Array<[string, T]> = [];
    const prefix = Buffer.byteLength(ns) + 2;
    await this.indexRead(async () => {
      for await (const [k, v] of this.db.iterator(metaRange(ns))) out.push([k.subarray(prefix).toString('utf8'), parseJson<T>(v)]);
    });
    return out;
  }

  // --- integrity ---------------------------------------------------------------------------

  /**
   * Re-hash every block and node reachable from the (filtered) snapshots; see store/verify.ts.
   * Runs beside gc and snapshot builds: it takes the gc lock only to check again what failed.
   */
  async verify(filter?: { volume?: string; snapshot?: string }, opts: VerifyOptions = {}): Promise<VerifyReport> {
    this.checkOpen();
    return verifyStore(this, filter, opts);
  }

  /** Reclaim blocks and nodes no snapshot reaches, by repacking; crash-safe (store/gc.ts). */
  async gc(opts: { onProgress?: (p: GcProgress) => void } = {}): Promise<GcReport> {
    this.checkOpen();
    return collectGarbage(this, opts.onProgress);
  }
}

export function shapeOf(s: SnapshotRecord): TreeShape {
  return { root: parseHex(s.root)!, height: s.height, blocks: blockCount(s.size, s.blockSize) };
}

function checkHash(h: unknown): asserts h is Hash {
  if (!isHash(h)) throw new TandemError('ERR_BAD_REQUEST', `a hash must be a 32-byte Buffer (got ${Buffer.isBuffer(h) ? `${h.length} bytes` : typeof h})`);
}

function checkMetaName(ns: string, key: string): void {
  const ok = (s: unknown) => typeof s === 'string' && s.length > 0 && s.length <= 512 && !s.includes('\0');
  if (!ok(ns) || !ok(key)) throw new TandemError('ERR_BAD_REQUEST', 'meta namespace and key must be non-empty strings without NUL', { details: { ns, key } });
}

function json(v: unknown): Buffer {
  return Buffer.from(JSON.stringify(v), 'utf8');
}

function parseJson<T>(b: Buffer): T {
  try {
    return JSON.parse(b.toString('utf8')) as T;
  } catch (e) {
    throw new TandemError('ERR_STORE_CORRUPT', 'an index record is not valid JSON; run `appliance verify`', { cause: e });
  }
}

/**
 * A store keeps this many bytes in a file of zeros, `reserve`, beside its index and packs: when
 * its disk fills up (a sync or a snapshot that met a full disk keeps what it made durable, for a
 * rerun), the index could not even open, and with it neither retention nor gc that free space.
 * Store.open then deletes the reserve and opens; the next open with room to spare makes it again.
 */
export const RESERVE_BYTES = 8 * 1024 * 1024;
const RESERVE_FILE = 'reserve';

/** Delete the reserve; false when there was none. */
async function releaseReserve(dir: string): Promise<boolean> {
  try {
    await unlink(join(dir, RESERVE_FILE));
    return true;
  } catch {
    return false;
  }
}

/** Make the reserve if it is missing and the disk has room to spare for it (best effort). */
async function keepReserve(dir: string): Promise<void> {
  const path = join(dir, RESERVE_FILE);
  if (existsSync(path)) return;
  try {
    const st = await statfs(dir);
    if (st.bavail * st.bsize < 8 * RESERVE_BYTES) return;
    // Not fsync'd: the filesystem takes the space at write time; one lost in a crash is made again.
    const tmp = `${path}.tmp`;
    await writeFile(tmp, Buffer.alloc(RESERVE_BYTES), { mode: 0o640 });
    await rename(tmp, path);
  } catch {
    // Without a reserve the store works as well; it only cannot open itself on a full disk.
  }
}
