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
 * Memory: SLOTS x CHUNK_BYTES of buffers plus one node per tree level, whatever the volume size.
 */
import { TandemError } from '../common/errors.js';
import { hashBlock, isZeroHash, HASH_LENGTH, ZERO_HASH } from './hash.js';
import { checkVolumeName } from './ids.js';
import { checkBlockSize, checkSize, normalizeSnapshot } from './records.js';
import { blockCount, type BlockChange } from './tree.js';
import type { Store } from './store.js';
import type { Hash, SnapshotOptions, SnapshotRecord, VolumeReader } from './types.js';

/** Bytes per read: large sequential reads keep disks and page cache streaming. */
const CHUNK_BYTES = 8 * 1024 * 1024;

/** Chunks in flight (being read or hashed): 6 x 8 MiB = 48 MiB keeps 2 hash workers and the reader busy. */
const SLOTS = 6;

/** During a long first scan, make new blocks durable every this many bytes (bounds writeback bursts). */
const FLUSH_BYTES = 1024 * 1024 * 1024;

/** onProgress is called at most this often (plus once at the end). */
const PROGRESS_INTERVAL_MS = 100;
/**
 * A change list this short (32 MiB at 512 KiB blocks) is read and hashed on the calling thread:
 * starting the worker pool (0.3-0.5 s) would cost more than hashing the blocks (~10 ms).
 */
const MAIN_THREAD_MAX_BLOCKS = 64;

interface Job {
  readonly first: number;
  readonly count: number;
}

interface Done extends Job {
  readonly slot: number;
  readonly length: number;
  readonly hashes: Buffer;
}

/** Consecutive runs of the sorted indices, cut at `max` blocks. */
function* runs(indices: readonly number[], max: number): Generator<Job> {
  let i = 0;
  while (i < indices.length) {
    const first = indices[i]!;
    let count = 1;
    while (i + count < indices.length && count < max && indices[i + count] === first + count) count++;
    yield { first, count };
    i += count;
  }
}

function* all(blocks: number, max: number): Generator<Job> {
  for (let first = 0; first < blocks; first += max) yield { first, count: Math.min(max, blocks - first) };
}

export async function scanVolume(store: Store, reader: VolumeReader, opts: SnapshotOptions): Promise<SnapshotRecord> {
  const created = new Date().toISOString();
  const volume = checkVolumeName(opts.volume);
  const blockSize = checkBlockSize(opts.blockSize);
  const size = checkSize(reader.size);
  const blocks = blockCount(size, blockSize);
  const parent = opts.parent ? normalizeSnapshot(opts.parent) : null;
  let changed: number[] | undefined;
  if (opts.changedBlocks) {
    if (!parent) throw new TandemError('ERR_CHANGED_BLOCKS_INVALID', `a changed-blocks list needs a parent snapshot of ${volume}; take a full snapshot first`, { details: { volume } });
    if (parent.blockSize !== blockSize) throw new TandemError('ERR_BLOCK_SIZE_INVALID', `the parent snapshot has block size ${parent.blockSize}, not ${blockSize}`, { details: { volume } });
    for (const i of opts.changedBlocks) {
      if (!Number.isInteger(i) || i < 0 || i >= blocks) {
        throw new TandemError('ERR_CHANGED_BLOCKS_INVALID', `changed block index ${i} is outside the volume (0..${blocks - 1})`, { details: { volume, index: i } });
      }
    }
    changed = [...new Set(opts.changedBlocks)].sort((a, b) => a - b);
  }
  opts.signal?.throwIfAborted();

  const chunkBlocks = Math.max(1, Math.floor(CHUNK_BYTES / blockSize));
  const slotBytes = chunkBlocks * blockSize;
  // A local file or device is read by the hash workers themselves (see HashPool).
  const localPath = typeof reader.path === 'string' && (reader.kind === 'file' || reader.kind === 'device') ? reader.path : undefined;
  const onMainThread = changed !== undefined && changed.length <= MAIN_THREAD_MAX_BLOCKS;
  const pool = onMainThread ? null : store.hashPools.borrow(slotBytes * SLOTS);
  const sab: ArrayBufferLike = pool ? pool.sab : new ArrayBuffer(slotBytes * SLOTS);
  const jobs = changed ? runs(changed, chunkBlocks) : all(blocks, chunkBlocks);
  const total = changed ? changed.length : blocks;
  const progress = { blocksDone: 0, blocksTotal: total, bytesRead: 0, blocksStored: 0 };
  let lastProgress = 0;
  let unflushed = 0;
  const report = (force: boolean) => {
    if (!opts.onProgress) return;
    const now = Date.now();
    if (!force && now - lastProgress < PROGRESS_INTERVAL_MS) return;
    lastProgress = now;
    opts.onProgress({ ...progress });
  };

  const holes = reader.holes ?? [];
  /** True when [start, end) lies inside one hole (binary search: holes are sorted). */
  const inHole = (start: number, end: number): boolean => {
    let lo = 0;
    let hi = holes.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const h = holes[mid]!;
      if (h.end <= start) lo = mid + 1;
      else if (h.start > start) hi = mid - 1;
      else return end <= h.end;
    }
    return false;
  };

  const readJob = async (job: Job, slot: number): Promise<Done> => {
    const start = job.first * blockSize;
    const length = Math.min(job.count * blockSize, size - start);
    if (inHole(start, start + length)) return { ...job, slot, length, hashes: Buffer.alloc(job.count * HASH_LENGTH) };
    if (localPath !== undefined && pool) {
      const hashes = await pool.hash(slot * slotBytes, length, blockSize, { path: localPath, position: start });
      return { ...job, slot, length, hashes };
    }
    const buf = Buffer.from(sab, slot * slotBytes, length);
    let done = 0;
    while (done < length) {
      const n = await reader.read(buf.subarray(done), start + done);
      if (n <= 0) {
        throw new TandemError('ERR_VOLUME_UNREADABLE', `volume ${volume} ended at byte ${start + done}, before its size ${size}; it shrank during the snapshot, retry`, { details: { volume, offset: start + done } });
      }
      done += n;
    }
    if (!pool) {
      const hashes = Buffer.alloc(job.count * HASH_LENGTH);
      for (let i = 0; i < job.count; i++) {
        hashBlock(buf.subarray(i * blockSize, Math.min(length, (i + 1) * blockSize))).copy(hashes, i * HASH_LENGTH);
      }
      return { ...job, slot, length, hashes };
    }
    const hashes = await pool.hash(slot * slotBytes, length, blockSize);
    return { ...job, slot, length, hashes };
  };

  const inflight: Promise<Done>[] = [];
  const free = Array.from({ length: SLOTS }, (_, i) => SLOTS - 1 - i);
  const fill = () => {
    while (free.length > 0) {
      const next = jobs.next();
      if (next.done) return;
      const p = readJob(next.value, free.pop()!);
      p.catch(() => undefined); // observed in order below
      inflight.push(p);
    }
  };

  async function* changes(): AsyncGenerator<BlockChange> {
    fill();
    while (inflight.length > 0) {
      opts.signal?.throwIfAborted();
      const d = await inflight.shift()!;
      const items: BlockChange[] = [];
      for (let i = 0; i < d.count; i++) items.push({ index: d.first + i, hash: Buffer.from(d.hashes.subarray(i * HASH_LENGTH, (i + 1) * HASH_LENGTH)) });
      const nonZero = items.filter((c) => !isZeroHash(c.hash));
      // One index lookup and one pack write for the chunk's blocks the store lacks.
      const frames = nonZero.map((c) => ({ hash: c.hash, data: Buffer.from(sab, d.slot * slotBytes + (c.index - d.first) * blockSize, Math.min(blockSize, size - c.index * blockSize)) }));
      const stored = await store.putVerifiedMany(frames);
      const fresh: Hash[] = [];
      stored.forEach((isNew, i) => {
        if (!isNew) return;
        progress.blocksStored++;
        unflushed += frames[i]!.data.length;
        fresh.push(frames[i]!.hash);
      });
      if (fresh.length > 0) opts.onNewBlocks?.(fresh);
      progress.blocksDone += d.count;
      progress.bytesRead += d.length;
      free.push(d.slot);
      if (unflushed >= FLUSH_BYTES) {
        await store.flush();
        unflushed = 0;
      }
      fill();
      report(false);
      // A full scan rebuilds from scratch, so only non-zero blocks matter; a changed-blocks
      // scan builds on the parent, so a block that became zero must be listed too.
      yield* changed ? items.map((c) => (isZeroHash(c.hash) ? { index: c.index, hash: ZERO_HASH } : c)) : nonZero;
    }
  }

  try {
    return await store.gcLock.shared(async () => {
      const snap = await store.buildUnderGcLock(
        { volume, size, blockSize, parent, changes: changes(), origin: opts.origin ?? (changed ? 'changed-blocks' : 'scan'), labels: opts.labels, created },
        changed ? parent : null,
      );
      report(true);
      return snap;
    });
  } finally {
    await Promise.allSettled(inflight);
    if (pool) await store.hashPools.giveBack(pool);
  }
}
