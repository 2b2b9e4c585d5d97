/**
 * scanVolume: snapshot a volume by reading it.
 *
 * Pipeline: large aligned chunks are read into slots of one SharedArrayBuffer (several in
 * flight) and a {@link HashPool} hashes each chunk's blocks on worker threads (zero blocks found
 * by memcmp, not hashed). A local file or device (reader.path and reader.kind set) is read by
 * the workers themselves, each block hashed right after its read while it is in the CPU cache;
 * other readers are read on the main thread. Then, chunk by chunk in volume order, the store is
 * asked which non-zero blocks it lacks (one batched lookup), those are appended to the pack
 * straight from the shared buffer (one writev per chunk), and the (index, hash) changes stream into the tree builder.
 * A hole of a sparse image (reader.holes) of a chunk or more is one job, not read, and one run of
 * zero blocks for the tree builder (fullScanJobs): the cost is per hole and per chunk of data,
 * not per chunk of the volume's size.
 * Memory: SLOTS x CHUNK_BYTES of buffers (2 on the calling thread) plus one node per tree level,
 * whatever the volume size.
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { TandemError, fromSystemError, isTandemError } from '../common/errors.js';
import { IO_SKEW, alignedSlots } from '../common/io-buffers.js';
import { CODEC_RAW, RECORD_HEADER_LENGTH, recordPartsWithCrc } from './pack.js';
import { STORED_DELTA_DIVISOR, mayBeSparse } from './delta.js';
import { hashBlock, isZeroHash, HASH_LENGTH, parseHex, ZERO_HASH } from './hash.js';
import { checkVolumeName } from './ids.js';
import { DEFAULT_BLOCK_SIZE, checkBlockSize, checkSize, normalizeSnapshot } from './records.js';
import { prestartHashPool, type Slots } from './hash-pool.js';
import { partsOf, rangesOf, type BlockRanges } from './block-ranges.js';
import { trace } from '../sync/trace.js';
import { blockCount, blockHashRanges, blockHashesAt, type BlockChange } from './tree.js';
import type { DeltaOf, PutFrame, Store } from './store.js';
import type { Hash, SnapshotOptions, SnapshotRecord, VolumeReader } from './types.js';

/** Bytes per read: large sequential reads keep disks and page cache streaming. */
const CHUNK_BYTES = 8 * 1024 * 1024;

/**
 * Chunks in flight (being read, hashed or written): 6 x 8 MiB keeps 2 hash workers busy while
 * {@link PUTS_AHEAD} chunks are being stored. A warm re-scan of 4 GiB took 2.07-2.23 s with 6,
 * 2.12-2.49 s with 4 (4 runs each). Scans running at once in a process (a daemon runs two jobs
 * at once, scheduler/runner.ts) share one pool of these slots and its workers (HashPools.share):
 * three slots each while two run.
 */
const SLOTS = 6;

/**
 * Slots of a pool start this far apart (a chunk's bytes and a page): scans sharing the pool
 * start their chunks at different offsets in their slots (SCAN_SKEW or 0, below), and one's
 * full slot must not reach into the next, while every slot keeps the offset in its page that
 * its scan chose.
 */
const SLOT_GAP = 4096;

/** Whether [start, end) lies inside one of `holes` (ascending, disjoint: VolumeReader.holes), by binary search. */
export function holeTest(holes: VolumeReader['holes']): (start: number, end: number) => boolean {
  const hs = holes ?? [];
  return (start, end) => {
    let lo = 0;
    let hi = hs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const h = hs[mid]!;
      if (h.end <= start) lo = mid + 1;
      else if (h.start > start) hi = mid - 1;
      else return end <= h.end;
    }
    return false;
  };
}

/**
 * The path a local file or device reader names (VolumeReader.path), which the hash workers read
 * themselves, and whether they read it past the page cache: a block device is read with
 * O_DIRECT, as its data is seldom cached (guests and filesystems keep their own), so a read
 * through the cache would evict the host's hot pages for nothing, and the kernel's copy out of
 * it costs CPU (cold, 2 GiB here: dd with 512 KiB direct reads 1.9-2.3 GB/s, buffered
 * 0.46-0.85 GB/s). An image file is read through the cache, where it often is (a test image, a
 * VM's cached writes). Null for other readers. materialize reads its target the same way.
 */
export function localSource(reader: Pick<VolumeReader, 'path' | 'kind'>): { path: string; direct: boolean } | null {
  return typeof reader.path === 'string' && (reader.kind === 'file' || reader.kind === 'device') ? { path: reader.path, direct: reader.kind === 'device' } : null;
}

/**
 * How a scan of a volume of `blockSize` blocks lays out its hash pool: blocks per chunk (a read
 * of {@link CHUNK_BYTES}, at least one block), bytes per slot, how far apart slots start
 * ({@link SLOT_GAP}), slots, and the pool's buffer size, by which the pool that scans share and
 * idle pools are found again (HashPools.share, HashPools.borrow). materialize borrows the same
 * pools (slots of its own layout: IO_SKEW + slot x slotBytes).
 */
export function scanLayout(blockSize: number): { chunkBlocks: number; slotBytes: number; slotStride: number; slots: number; poolBytes: number } {
  const chunkBlocks = Math.max(1, Math.floor(CHUNK_BYTES / blockSize));
  const slotBytes = chunkBlocks * blockSize;
  const slotStride = slotBytes + SLOT_GAP;
  return { chunkBlocks, slotBytes, slotStride, slots: SLOTS, poolBytes: slotStride * SLOTS };
}

/**
 * Start the hash workers of a full scan now, before the store is open (prestartHashPool): a
 * one-shot `appliance snapshot` of 1 MiB took a median 127 ms against 136 ms (25 alternated
 * pairs), their start hidden behind the store's; of 1 GiB, 329 against 331 ms (there the workers'
 * start competes with the calling thread for the two cores). A volume of any block size that divides
 * {@link CHUNK_BYTES} (the powers of two up to 8 MiB, the default 512 KiB among them) gets a pool
 * laid out alike; one of another size starts a pool of its own, and this one ends with the process.
 */
export function prestartScan(): void {
  prestartHashPool(scanLayout(DEFAULT_BLOCK_SIZE).poolBytes);
}

/**
 * Chunks handed to the store at once: the next one's lookup and checksums overlap this one's
 * write. A 4 GiB first snapshot took 10.4-11.5 s this way, 11.5-12.9 s one chunk at a time.
 */
const PUTS_AHEAD = 2;

/** During a long first scan, make new blocks durable every this many bytes (bounds writeback bursts). */
const FLUSH_BYTES = 1024 * 1024 * 1024;

/**
 * A scan stops trying to store changed blocks as deltas once at least this many tries were made
 * and fewer than half gave one: each try reads the replaced block from the store, which a volume
 * rewritten wholesale (a restored backup, a reformatted disk) would pay for nothing.
 */
const DELTA_TRIES_TO_JUDGE = 32;

/** Whether deltas are still worth trying in a scan, judged by what the tries so far gave (a block stored as one). */
function deltaTries(): { worth(): boolean; tried(p: Promise<DeltaOf | undefined>): Promise<DeltaOf | undefined> } {
  let tries = 0;
  let hits = 0;
  return {
    worth: () => tries < DELTA_TRIES_TO_JUDGE || hits * 2 >= tries,
    tried: async (p) => {
      tries++;
      const r = await p;
      if (r?.stored) hits++;
      return r;
    },
  };
}

/*
 * A scan's new blocks go to the disk directly (O_DIRECT, PackFiles), from the first one: the
 * kernel's copy into the page cache was half the CPU of a first snapshot here, a snapshot of a
 * large volume would evict everything else from the cache, and the commit's fsync then has no
 * dirty pages to write. A 4 GiB first snapshot took 5.4-7.0 s this way against 11.8-13.4 s
 * buffered (6 alternated pairs; 6.0-7.1 CPU s against 14.1-15.5). The first 64 MiB used to stay
 * buffered, so that a one-shot command would not pay for the staging slots of a direct write for
 * a small change; measured again (hyperfine, 12 runs each, the CLI on a 4 GiB image; in a
 * running appliance the slots were already kept, Store.keepWarm):
 * - snapshot --changed-blocks of 82 blocks (41 MiB): 234 +- 16 ms direct, 305 +- 21 buffered
 *   (system CPU 73 against 171 ms); of 8 blocks: 151 +- 11 against 163 +- 21 ms; of 1 block:
 *   140 +- 11 against 134 +- 11 ms;
 * - a sync from that change list: 441 +- 26 against 515 +- 38 ms; with a rescan (8 runs each):
 *   1.19 +- 0.03 s against 1.35 +- 0.06 s.
 * A sync's early sending reads back the ones it holds no copy of past the cache as well
 * (onNewBlocks says they went directly).
 */

/**
 * Where a local volume's blocks are read into the slots: just under {@link IO_SKEW} bytes past a
 * page boundary (reads into page-aligned memory are slow here), at the offset modulo 8 that a
 * block's bytes have in its pack record, after the record's 44-byte header (store/pack.ts; a
 * record of a 512 KiB block is a multiple of 8 long, so every one in a pack agrees). The store
 * copies new blocks into page-aligned staging slots for their direct write (PackFiles), and V8
 * copies out of a SharedArrayBuffer word by word only when source and destination agree modulo
 * 8, else byte by byte (v8::internal::relaxed_memmove: a quarter of a first snapshot's CPU
 * samples at +64). A 4 GiB first snapshot took 6.21-7.27 s and 3.11-3.95 user CPU s with the
 * blocks at +64, 5.63-6.30 s and 2.11-2.76 s at +60 (3 alternated pairs, cold CLI); a
 * re-snapshot reads as fast either way (0.97-1.08 s, 4 pairs).
 */
const SCAN_SKEW = IO_SKEW - (((IO_SKEW - RECORD_HEADER_LENGTH) % 8) + 8) % 8;

/** onProgress is called at most this often (plus once at the end). */
const PROGRESS_INTERVAL_MS = 100;
/**
 * A change list this short (128 MiB at 512 KiB blocks) is read and hashed on the calling thread
 * unless a warm worker pool is idle: starting the pool costs more than hashing the blocks (a
 * snapshot of 82 listed blocks of a 2 GiB image took 0.13-0.16 s in the command this way and
 * 0.22-0.33 s with the pool started for it; 250 blocks 0.17-0.22 s against 0.24-0.70 s). The
 * thread stays responsive: it hashes 16 blocks (~3 ms) at a time between reads.
 * A process that lives on (Store.keepWarm: `serve`, `daemon`) starts the pool at its first scan
 * and keeps it, so its change lists go to the workers, and the calling thread, free of reads and
 * hashing, stores and sends: a change-list sync of 82 blocks of a 4 GiB image in a running
 * appliance, 20 in a row, 3 alternated rounds: medians 0.164, 0.165, 0.226 s with the workers,
 * 0.220, 0.203, 0.206 s on the calling thread.
 */
const MAIN_THREAD_MAX_BLOCKS = 256;

/**
 * The calling thread's slots, kept for the next scan in this process (a running appliance's
 * change-list syncs): fresh memory costs a page fault per 4 KiB on its first read, 9 ms of every
 * 12 ms spent reading 16 cached blocks into a new 8 MiB buffer, against 3 ms into a used one.
 */
let spareSlots: { buf: ArrayBuffer; aligned: boolean } | null = null;

/**
 * The spare slots when they have this size (and are page-aligned if `aligned`: a device's
 * direct reads go straight into them), else new ones. Aligned memory is WebAssembly memory,
 * which V8 maps on a page boundary, rounded up to its 64 KiB pages.
 */
function takeSpareSlots(bytes: number, aligned: boolean): ArrayBuffer {
  const spare = spareSlots && spareSlots.aligned === aligned && spareSlots.buf.byteLength >= bytes && spareSlots.buf.byteLength < bytes + 65536 ? spareSlots.buf : null;
  if (spare) spareSlots = null;
  return spare ?? (aligned ? (alignedSlots(1, bytes)[0]!.buffer as ArrayBuffer) : new ArrayBuffer(bytes));
}

/** The `n` slots of a scan's own buffer (a change list hashed on the calling thread). */
function ownSlots(n: number): Slots {
  const free = Array.from({ length: n }, (_, i) => n - 1 - i);
  return {
    take: () => free.pop(),
    takeAll: (k) => (free.length >= k ? free.splice(free.length - k, k).reverse() : null),
    give: (slot) => void free.push(slot),
    onFree: null,
  };
}

/** Reads of one scattered job in flight at once (libuv's pool has 4 threads). */
const SCATTERED_READS = 4;

export interface Job {
  readonly first: number;
  readonly count: number;
  /** Scattered blocks (a change list): block i of the job is block indices[i] of the volume. */
  readonly indices?: readonly number[];
  /** Every block of the job lies in a hole of the volume (reader.holes): it is not read, hashed or compared. */
  readonly hole?: true;
}

interface Done extends Job {
  readonly slot: number;
  readonly length: number;
  readonly hashes: Buffer;
  /** The pack record CRC of each block that may be stored, 4 bytes each, when hash workers hashed the chunk (HashPool). */
  readonly crcs?: Buffer;
  /** The parent's hashes of these blocks (a full scan with a parent of the same shape). */
  readonly expect?: Buffer;
  /** The parent's hashes of a change list's blocks, for onNewBlocks (not given to the hash workers, which skip blocks equal to `expect`). */
  readonly replaced?: Hash[];
  /** The hash workers read the chunk with O_DIRECT. */
  readonly direct?: boolean;
}

/**
 * The parent snapshot's block hashes, `count` at a time from block `first`, for jobs asked in
 * volume order (calls are chained, so concurrent jobs get consecutive ranges).
 */
function parentHashes(store: Store, parent: SnapshotRecord): (first: number, count: number) => Promise<Buffer> {
  const read = blockHashRanges({ root: parseHex(parent.root)!, height: parent.height, blocks: blockCount(parent.size, parent.blockSize) }, store.getNode);
  let chain: Promise<unknown> = Promise.resolve();
  return (first, count) => {
    const p = chain.then(() => read(first, count));
    chain = p.catch(() => undefined);
    return p;
  };
}

/** The hashes of a job in a hole: none (its blocks are known to be zero). */
const NO_HASHES = Buffer.alloc(0);

/** The volume's index of block i of a job. */
function blockOf(job: Job, i: number): number {
  return job.indices ? job.indices[i]! : job.first + i;
}

/**
 * A full scan's jobs: chunks of `max` blocks, aligned, except that a run of at least `max` whole
 * blocks inside one of `holes` (ascending, disjoint byte ranges: VolumeReader.holes) is one
 * job however long (the chunks on either side of it are cut short at its ends). Such a job is
 * neither read nor hashed nor compared with the parent block by block: its blocks are given to
 * the tree builder as one run of zero blocks. Shorter holes are left to the chunks (a chunk
 * wholly in one is still not read: {@link holeTest}), so a file of many small holes keeps its
 * 8 MiB jobs. A 16 TiB image with 5 MiB of data was 2 million jobs, each with its parent's
 * hashes read and compared: a re-snapshot took 25.8-37.8 s in the command (76 s in a scale
 * audit), a first one 29.8-30.7 s; as a few jobs, 0.26-0.36 s and 0.31-0.33 s (2 alternated
 * pairs: store/README.md, "Holes").
 */
export function* fullScanJobs(size: number, blockSize: number, max: number, holes: VolumeReader['holes']): Generator<Job> {
  const blocks = blockCount(size, blockSize);
  const hs = holes ?? [];
  let h = 0;
  /** The next run of at least `max` whole blocks in a hole from block `from` on, [first, end), or null (`from` only grows: a hole passed over is not looked at again). */
  const nextRun = (from: number): { first: number; end: number } | null => {
    for (; h < hs.length; h++) {
      const hole = hs[h]!;
      // A hole to the end of the volume holds its last block, however short.
      const end = hole.end >= size ? blocks : Math.floor(hole.end / blockSize);
      const first = Math.max(from, Math.ceil(hole.start / blockSize));
      if (end - first >= max) return { first, end };
    }
    return null;
  };
  let run = nextRun(0);
  for (let first = 0; first < blocks; ) {
    if (run && first >= run.first) {
      yield { first, count: run.end - first, hole: true };
      first = run.end;
      run = nextRun(first);
      continue;
    }
    const end = Math.min(blocks, (Math.floor(first / max) + 1) * max, run ? run.first : blocks);
    yield { first, count: end - first };
    first = end;
  }
}

export async function scanVolume(store: Store, reader: VolumeReader, opts: SnapshotOptions): Promise<SnapshotRecord> {
  try {
    return await scanOnce(store, reader, opts, true);
  } catch (e) {
    // A damaged parent tree (a node missing or corrupt: `verify` names it) must not stop new
    // snapshots of the volume: a full scan reads everything anyway, so it starts again from
    // scratch, without comparing with the parent.
    if (opts.changedBlocks || !opts.parent || !(isTandemError(e, 'ERR_NODE_MISSING') || isTandemError(e, 'ERR_NODE_CORRUPT'))) throw e;
    opts.onNotice?.(`the tree of the parent snapshot ${opts.parent.volume}@${opts.parent.id} is damaged (${e.message}); scanned again without it. Run \`appliance verify\``);
    return await scanOnce(store, reader, opts, false);
  }
}

async function scanOnce(store: Store, reader: VolumeReader, opts: SnapshotOptions, compareWithParent: boolean): Promise<SnapshotRecord> {
  const created = new Date().toISOString();
  const volume = checkVolumeName(opts.volume);
  const blockSize = checkBlockSize(opts.blockSize);
  const size = checkSize(reader.size);
  const blocks = blockCount(size, blockSize);
  const parent = opts.parent ? normalizeSnapshot(opts.parent) : null;
  let changed: BlockRanges | undefined;
  if (opts.changedBlocks) {
    if (!parent) throw new TandemError('ERR_CHANGED_BLOCKS_INVALID', `a changed-blocks list needs a parent snapshot of ${volume}; take a full snapshot first`, { details: { volume } });
    if (parent.blockSize !== blockSize) throw new TandemError('ERR_BLOCK_SIZE_INVALID', `the parent snapshot has block size ${parent.blockSize}, not ${blockSize}`, { details: { volume } });
    changed = 'ranges' in opts.changedBlocks ? opts.changedBlocks : rangesOf(opts.changedBlocks);
    for (const { first, last } of changed.ranges) {
      for (const i of [first, last]) {
        if (!Number.isSafeInteger(i) || i < 0 || i >= blocks) {
          throw new TandemError('ERR_CHANGED_BLOCKS_INVALID', `changed block index ${i} is outside the volume (0..${blocks - 1})`, { details: { volume, index: i } });
        }
      }
      if (last < first) throw new TandemError('ERR_CHANGED_BLOCKS_INVALID', `changed block range ${first}-${last} ends before it starts`, { details: { volume, first, last } });
    }
  }
  opts.signal?.throwIfAborted();
  // A full scan with a parent of the same shape compares each block's hash with the parent's:
  // only blocks that differ are looked up in the index, appended and given to the tree builder,
  // which builds on the parent (a 1 % change then costs 1 % of the lookups and node writes).
  // The parent is a committed snapshot, read under the shared gc lock: it holds its blocks.
  const onParent = compareWithParent && !changed && parent !== null && parent.blockSize === blockSize && parent.size === size;
  /** The tree is built on the parent's, from the blocks that differ (else from scratch, from every non-zero block). */
  const treeParent = changed || onParent ? parent : null;

  const { chunkBlocks, slotBytes, slotStride, poolBytes } = scanLayout(blockSize);
  // A local file or device is read by the hash workers themselves (see HashPool), a device past
  // the page cache (see localSource).
  const local = localSource(reader);
  const localPath = local?.path;
  const readDirect = local?.direct === true;
  const onMainThread = changed !== undefined && changed.count <= MAIN_THREAD_MAX_BLOCKS && !store.hashPools.hasStarted(poolBytes) && !store.hashPools.keptWarm;
  // Scans running at once in this process (a daemon's jobs) share one pool: its workers and its slots.
  const share = onMainThread ? null : store.hashPools.share(poolBytes, SLOTS);
  const pool = share?.pool ?? null;
  // On the calling thread, reads (libuv) overlap hashing with two slots; more would only hold memory.
  const slots = pool ? SLOTS : Math.min(2, Math.ceil((changed?.count ?? 0) / chunkBlocks));
  // A device's change list read here goes past the page cache as the workers' reads do, straight
  // into page-aligned slots (a pool's SharedArrayBuffer is not page-aligned: store/hash-pool.ts).
  const directOpen = readDirect && localPath !== undefined && !pool ? await open(localPath, constants.O_RDONLY | constants.O_DIRECT).catch(() => null) : null; // refused (EINVAL): read through the cache
  /** Null once the device refused a direct read. */
  let directFh: FileHandle | null = directOpen;
  const own = pool ? null : takeSpareSlots(IO_SKEW + slotBytes * 2, directOpen !== null);
  const sab: ArrayBufferLike = pool ? pool.sab : own!;
  // A local file or device is read through the page cache (pread): its slots start SCAN_SKEW bytes
  // past a page boundary (common/io-buffers.ts, above). Other readers get page-aligned slots, which they
  // may read with O_DIRECT (a sparse image read that way needs no zero pages in the cache), and so
  // does a device read directly here.
  const skew = localPath !== undefined && directOpen === null ? SCAN_SKEW : 0;
  /** Where a slot starts in `sab`. */
  const slotAt = (slot: number): number => skew + slot * (pool ? slotStride : slotBytes);
  /** This scan's slots: of the pool it shares, else of its own buffer. */
  const slotSource: Slots = share ?? ownSlots(slots);
  // A change list's blocks, chunkBlocks at a time: a run of consecutive blocks is one read,
  // scattered ones are read one by one but still hashed, looked up and stored as one job (a
  // change list of 82 blocks spread over a volume is 6 jobs, not 82).
  const jobs: Iterator<Job> = changed ? partsOf(changed, chunkBlocks) : fullScanJobs(size, blockSize, chunkBlocks, reader.holes);
  // The caller wants the new blocks' bytes (SnapshotOptions.onNewBlocks' views). A change list
  // whose chunks all fit the slots at once leaves every slot to its one chunk: the bytes can be
  // lent out where they are until keepViewsUntil settles. Otherwise a slot is reused once the
  // caller has copied what it wants (the promise onNewBlocks returns).
  const wantViews = opts.keepViewsUntil !== undefined && opts.onNewBlocks !== undefined;
  // Lent views keep their slots until keepViewsUntil: the scan takes one per chunk now (within its
  // share of a shared pool: when the other scans hold more, it copies, as for a longer list).
  const lent = wantViews && changed !== undefined && Math.ceil(changed.count / chunkBlocks) <= slots ? slotSource.takeAll(Math.ceil(changed.count / chunkBlocks)) : null;
  const lendViews = lent !== null;
  const total = changed ? changed.count : blocks;
  const progress = { blocksDone: 0, blocksTotal: total, bytesRead: 0, bytesReadDirect: 0, blocksStored: 0, blocksStoredAsDeltas: 0 };
  let lastProgress = 0;
  let unflushed = 0;
  const report = (force: boolean) => {
    if (!opts.onProgress) return;
    const now = Date.now();
    if (!force && now - lastProgress < PROGRESS_INTERVAL_MS) return;
    lastProgress = now;
    opts.onProgress({ ...progress });
  };

  const inHole = holeTest(reader.holes);

  const expected = onParent ? parentHashes(store, parent) : null;
  // A change list's new blocks are stored as deltas of the blocks they replace where small, and
  // told to onNewBlocks with them (a sync sends each as the bytes that differ where the peer
  // holds that one): read from the parent's tree, the nodes on the blocks' paths only, while the
  // blocks are read.
  const replacedOf = changed && parent ? (job: Job) => blockHashesAt({ root: parseHex(parent.root)!, height: parent.height, blocks: blockCount(parent.size, parent.blockSize) }, Array.from({ length: job.count }, (_, i) => blockOf(job, i)), store.getNode) : null;
  const readJob = async (job: Job, slot: number): Promise<Done> => {
    const replacing = replacedOf?.(job);
    replacing?.catch(() => undefined); // awaited below, after the read
    const done = await readJobBlocks(job, slot);
    return replacing ? { ...done, replaced: await replacing } : done;
  };
  const readJobBlocks = async (job: Job, slot: number): Promise<Done> => {
    const start = job.first * blockSize;
    // Blocks sit one after the other in the slot; only the volume's last block may be short.
    const last = blockOf(job, job.count - 1);
    const length = (job.count - 1) * blockSize + Math.min(blockSize, size - last * blockSize);
    // A run in a hole: nothing to read, hash or compare (the tree builder takes it as a run of zero blocks).
    if (job.hole) return { ...job, slot, length, hashes: NO_HASHES };
    const expect = expected ? { expect: await expected(job.first, job.count) } : {};
    const base = { ...job, slot, length, ...expect };
    if (!job.indices && inHole(start, start + length)) return { ...base, hashes: Buffer.alloc(job.count * HASH_LENGTH) };
    if (localPath !== undefined && pool) {
      const positions = job.indices?.map((i) => i * blockSize);
      return { ...base, ...(await pool.hash(slotAt(slot), length, blockSize, { path: localPath, position: start, ...(positions ? { positions } : {}), ...expect, direct: readDirect }, true)) };
    }
    const buf = Buffer.from(sab, slotAt(slot), length);
    // A contiguous job is one range; a scattered one is a range per block.
    const ranges = job.indices
      ? job.indices.map((b, i) => ({ at: i * blockSize, pos: b * blockSize, len: Math.min(blockSize, size - b * blockSize) }))
      : [{ at: 0, pos: start, len: length }];
    let direct = directFh !== null;
    /** Into `into` from `position`: past the page cache while the device takes it. */
    const readInto = async (into: Buffer, position: number): Promise<number> => {
      const fh = directFh;
      if (fh) {
        try {
          return (await fh.read(into, 0, into.length, position)).bytesRead;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw fromSystemError(e, `reading ${localPath} at byte ${position}`);
          // Refused (an offset or length not aligned to the device's sectors): through the cache from now on.
          directFh = null;
        }
      }
      direct = false;
      return reader.read(into, position);
    };
    const readRange = async (r: (typeof ranges)[number]): Promise<void> => {
      let done = 0;
      while (done < r.len) {
        const n = await readInto(buf.subarray(r.at + done, r.at + r.len), r.pos + done);
        if (n <= 0) {
          throw new TandemError('ERR_VOLUME_UNREADABLE', `volume ${volume} ended at byte ${r.pos + done}, before its size ${size}; it shrank during the snapshot, retry`, { details: { volume, offset: r.pos + done } });
        }
        done += n;
      }
    };
    // Scattered blocks are read a few at a time (each read is a thread-pool round trip); every
    // read has ended before the job settles, since the slot is reused after it.
    let next = 0;
    const readers = Array.from({ length: Math.min(SCATTERED_READS, ranges.length) }, async () => {
      while (next < ranges.length) await readRange(ranges[next++]!);
    });
    const failed = (await Promise.allSettled(readers)).find((r) => r.status === 'rejected');
    if (failed) throw (failed as PromiseRejectedResult).reason;
    if (!pool) {
      const hashes = Buffer.alloc(job.count * HASH_LENGTH);
      for (let i = 0; i < job.count; i++) {
        hashBlock(buf.subarray(i * blockSize, Math.min(length, (i + 1) * blockSize))).copy(hashes, i * HASH_LENGTH);
      }
      return { ...base, hashes, ...(direct ? { direct } : {}) };
    }
    return { ...base, ...(await pool.hash(slotAt(slot), length, blockSize, undefined, true)) };
  };

  const inflight: Promise<Done>[] = [];
  /** The next job to start (done: every one is started). */
  let nextJob = jobs.next();
  /** The scan is over (it failed or was aborted): no job is started any more. */
  let over = false;
  /** Start jobs while this scan may take slots. */
  const fill = () => {
    while (!nextJob.done && !over) {
      const slot = lent?.pop() ?? slotSource.take();
      if (slot === undefined) return;
      const p = readJob(nextJob.value, slot);
      p.catch(() => undefined); // observed in order below
      inflight.push(p);
      nextJob = jobs.next();
    }
  };
  /** Resolves the wait of a scan with nothing in flight for a slot of the shared pool. */
  let slotFreed: (() => void) | null = null;
  slotSource.onFree = () => {
    fill();
    slotFreed?.();
  };

  /** A block of a chunk that differs from the parent's: where it sits in the slot, and the parent's hash there (`was`) when known. */
  type Item = BlockChange & { at: number; was?: Hash };
  /** A chunk handed to the store: its blocks the store lacks are being looked up and appended. */
  interface Put {
    readonly d: Done;
    readonly items: Array<Item>;
    /** The items whose block is not all zeros. */
    readonly nonZero: Array<Item>;
    readonly frames: PutFrame[];
    readonly patches: Array<Buffer | undefined>;
    readonly stored: Promise<boolean[]>;
  }
  const puts: Put[] = [];
  const deltas = deltaTries();
  const sparse = deltaTries();
  const startPut = async (): Promise<void> => {
    const d = await inflight.shift()!;
    const items: Item[] = [];
    for (let i = 0; i < (d.hole ? 0 : d.count); i++) {
      const hash = d.hashes.subarray(i * HASH_LENGTH, (i + 1) * HASH_LENGTH);
      if (d.expect?.subarray(i * HASH_LENGTH, (i + 1) * HASH_LENGTH).equals(hash)) continue; // as in the parent
      const was = d.expect ? d.expect.subarray(i * HASH_LENGTH, (i + 1) * HASH_LENGTH) : d.replaced?.[i];
      items.push({ index: blockOf(d, i), hash: Buffer.from(hash), at: i * blockSize, ...(was ? { was } : {}) });
    }
    // One index lookup and one pack write for the chunk's blocks the store lacks.
    const nonZero = items.filter((c) => !isZeroHash(c.hash));
    const frames: PutFrame[] = nonZero.map((c) => ({ hash: c.hash, data: Buffer.from(sab, slotAt(d.slot) + c.at, Math.min(blockSize, size - c.index * blockSize)) }));
    /** For each of `frames`, the patches that make it of the block it replaced, where diffed. */
    const patches: Array<Buffer | undefined> = nonZero.map(() => undefined);
    const stored = (async () => {
      // A block that replaced one the store holds is stored as a delta of it when the two differ
      // in little (store/README.md, "Delta records"). The reads of those blocks overlap the next
      // chunks' hashing.
      // One that replaced a zero block, or with nothing before it (a first snapshot), is compared
      // with zeros (no read: a sparse record when it holds little data), judged apart: a volume
      // filled wholesale stops those tries alone. Only blocks that may be mostly zeros are tried
      // (mayBeSparse): a block of data throughout costs no diff and is not counted.
      const tries = await Promise.all(nonZero.map((c, i) => {
        const base = c.was ?? ZERO_HASH;
        const data = frames[i]!.data;
        if (isZeroHash(base) && !mayBeSparse(data, STORED_DELTA_DIVISOR)) return undefined;
        const judge = isZeroHash(base) ? sparse : deltas;
        return judge.worth() ? judge.tried(store.deltaOf(c.hash, data, base)) : undefined;
      }));
      const asDeltas = tries.map((t) => t?.stored);
      asDeltas.forEach((asDelta, i) => asDelta && (frames[i] = { ...frames[i]!, asDelta }));
      // Told to onNewBlocks: a sync sends these bytes rather than reading the block back.
      tries.forEach((t, i) => (patches[i] = t?.patches));
      // The workers checksummed the records of the blocks that may be new while hashing them (raw ones).
      const crcs = d.crcs;
      const parts = crcs && nonZero.map((c, i) => (asDeltas[i] ? undefined : recordPartsWithCrc(c.hash, CODEC_RAW, frames[i]!.data.length, crcs.readUInt32BE((c.at / blockSize) * 4))));
      return store.putVerifiedMany(frames, { direct: true, ...(parts ? { parts } : {}) });
    })();
    stored.catch(() => undefined); // observed in order below
    puts.push({ d, items, nonZero, frames, patches, stored });
  };

  async function* changes(): AsyncGenerator<BlockChange> {
    fill();
    while (inflight.length > 0 || puts.length > 0 || !nextJob.done) {
      opts.signal?.throwIfAborted();
      if (inflight.length === 0 && puts.length === 0) {
        // Every slot this scan may take is held by the other scans sharing the pool: each gives
        // one back once the chunk in it is stored (onFree); an abort ends the wait.
        const aborted = () => slotFreed?.();
        opts.signal?.addEventListener('abort', aborted, { once: true });
        await new Promise<void>((resolve) => (slotFreed = resolve));
        slotFreed = null;
        opts.signal?.removeEventListener('abort', aborted);
        continue;
      }
      // The next chunk goes to the store before this one's write is awaited: its index lookup
      // and record checksums overlap the pack write (a 2 GiB first snapshot spent 0.44 s in
      // lookups, 0.47 s in checksums and 1.86 s in writes, one after the other).
      while (puts.length < PUTS_AHEAD && inflight.length > 0) await startPut();
      const { d, items, nonZero, frames, patches, stored } = puts.shift()!;
      const fresh: Hash[] = [];
      const replaced: Array<Hash | null> = [];
      const views: Buffer[] = [];
      const freshPatches: Array<Buffer | undefined> = [];
      (await stored).forEach((isNew, i) => {
        if (!isNew) return;
        progress.blocksStored++;
        if (frames[i]!.asDelta) progress.blocksStoredAsDeltas++; // its base stays whole: gc waits for the scan
        unflushed += frames[i]!.data.length;
        fresh.push(frames[i]!.hash);
        replaced.push(nonZero[i]!.was ?? null);
        freshPatches.push(patches[i]);
        if (wantViews) views.push(frames[i]!.data);
      });
      if (fresh.length > 0) {
        const copied = opts.onNewBlocks?.(fresh, true, replaced, wantViews ? views : undefined, lendViews, freshPatches);
        if (copied) await copied; // before the slot is read into again
      }
      if (progress.blocksDone === 0) trace('scan: first chunk stored');
      progress.blocksDone += d.count;
      if (!d.hole) progress.bytesRead += d.length; // a hole is not read
      if (d.direct) progress.bytesReadDirect += d.length;
      if (!lendViews) slotSource.give(d.slot); // lent ones are given back at the end
      if (unflushed >= FLUSH_BYTES) {
        await store.flush();
        unflushed = 0;
      }
      fill();
      report(false);
      // A full scan without a parent rebuilds from scratch, so only non-zero blocks matter; a
      // scan that builds on the parent lists what differs, so a block that became zero must be
      // listed too. A chunk's changes are yielded once its blocks are stored: the tree builder
      // checks they are held.
      if (d.hole) {
        // One change for the run, which the tree builder applies a subtree at a time: a run over
        // the parent's zero subtrees costs no node read. From scratch, zero blocks need none.
        if (treeParent) yield { index: d.first, hash: ZERO_HASH, end: d.first + d.count };
        continue;
      }
      yield* (treeParent ? items : nonZero).map((c) => ({ index: c.index, hash: isZeroHash(c.hash) ? ZERO_HASH : c.hash }));
    }
    // Every block is read: aborted until now (a hook's thaw begun, the daemon stopping), the
    // snapshot is not committed.
    opts.signal?.throwIfAborted();
    trace('scan: every block read and stored');
    opts.onScanned?.();
  }

  try {
    return await store.gcLock.shared(async () => {
      const snap = await store.buildUnderGcLock(
        { volume, size, blockSize, parent, changes: changes(), origin: opts.origin ?? (changed ? 'changed-blocks' : 'scan'), labels: opts.labels, created },
        treeParent,
      );
      report(true);
      trace('scan: snapshot committed');
      return snap;
    });
  } finally {
    over = true;
    // Pack writes read from the slots: they end before the slots can go to another scan.
    await Promise.allSettled([...inflight, ...puts.map((p) => p.stored)]);
    await directOpen?.close().catch(() => undefined);
    const giveBack = async () => {
      if (share) await share.end(localPath);
      else spareSlots = { buf: own!, aligned: directOpen !== null };
    };
    // Lent out: the buffer goes to another scan once the borrower is done with it (it finishes
    // after this scan returns: a sync sends its last new blocks then).
    if (lendViews) void opts.keepViewsUntil!.then(giveBack, giveBack).catch(() => undefined);
    else await giveBack();
  }
}
