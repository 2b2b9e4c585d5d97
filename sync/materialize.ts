/**
 * Materialize: write a snapshot onto a volume (restore, failback `sync --reverse --apply`).
 *
 * Contract:
 * - Only blocks whose content differs from the snapshot are written. Unless `assumeZero` (the
 *   target was just created and reads as zeros) or `targetIs` (a snapshot of the target taken
 *   just before, under its lock), the target is read and hashed first: its current content is
 *   the truth, whatever any tree says (a volume may have changed outside the appliance after a
 *   disaster).
 * - Every block written comes from the store verified against its hash (the store's
 *   getBlocks/getBlock throw ERR_BLOCK_CORRUPT / ERR_BLOCK_MISSING); a corrupt block is
 *   never written. On such a failure the blocks before it in volume order have been written,
 *   the blocks from it on are left as they were.
 * - Zero blocks are never fetched: on a new target they are simply not written (holes); on an
 *   existing one `writer.zero()` makes them read as zeros, in volume order with the data blocks
 *   (so a failure leaves the zero blocks after it as they were, too).
 * - Memory is bounded by the scan's chunk (store/scan.ts scanLayout: 8 MiB, or one block of a larger
 *   size), {@link WRITE_BATCH_BYTES} (hashes only) and
 *   {@link WRITES_IN_FLIGHT} blocks, whatever the volume size. Written data is flushed in the
 *   background as it goes and `writer.sync()` is awaited at the end: when materialize resolves,
 *   the target is durable. The caller closes the writer.
 * - Not idempotent in effect, but safe to rerun: a rerun after a crash writes only what still
 *   differs.
 */
import { TandemError, fromSystemError, isTandemError } from '../common/errors.js';
import { IO_SKEW } from '../common/io-buffers.js';
import { availableParallelism } from 'node:os';
import { ZERO_HASH } from '../store/index.js';
import { HashPool, type HashPools } from '../store/hash-pool.js';
import { holeTest, localSource, scanLayout } from '../store/scan.js';
import type { BlockFrame, GetBlocksOptions, Hash, SnapshotRecord, VolumeWriter } from '../store/types.js';

/** What materialize needs of a store: the snapshot's block hashes and verified blocks. */
export interface MaterializeSource {
  blockHashes(snap: SnapshotRecord): AsyncIterable<{ index: number; hash: Hash }>;
  diffSnapshots(base: SnapshotRecord | null, target: SnapshotRecord): AsyncIterable<{ index: number; hash: Hash }>;
  getBlocks(hashes: readonly Hash[], opts?: GetBlocksOptions): AsyncIterable<BlockFrame>;
  /** The store's idle hash pools (a running appliance keeps one warm): borrowed rather than started, when given. */
  readonly hashPools?: Pick<HashPools, 'borrow' | 'giveBack'>;
}

export interface MaterializeProgress {
  /** Blocks of the snapshot handled so far (compared, or skipped as zero on a new target). */
  readonly blocksDone: number;
  readonly blocksTotal: number;
  readonly blocksWritten: number;
  readonly bytesWritten: number;
}

export interface MaterializeOptions {
  /** The target reads as zeros everywhere (freshly created sparse file): skip reading it. */
  readonly assumeZero?: boolean;
  /**
   * A snapshot of the target taken just before, under the volume's lock (failback's pre-apply
   * snapshot): the blocks to write are those where the two trees differ, found without reading
   * the target again. Ignored unless it has the snapshot's size and block size.
   */
  readonly targetIs?: SnapshotRecord;
  readonly onProgress?: (p: MaterializeProgress) => void;
  readonly signal?: AbortSignal;
}

export interface MaterializeResult {
  /** Target blocks compared with the snapshot's (0 with assumeZero). */
  readonly blocksCompared: number;
  /** Bytes of the target read to compare them: those in the target's holes are not read. */
  readonly bytesRead: number;
  /** Blocks written with snapshot data. */
  readonly blocksWritten: number;
  /** Blocks made to read as zeros on an existing target. */
  readonly blocksZeroed: number;
  /** Bytes written, data and zeros. */
  readonly bytesWritten: number;
}

/**
 * Written data is flushed in the background every this many bytes (the page cache would hold it
 * all): `writer.writeback()`, which for a file written directly (appliance/volumes/direct.ts) has
 * nothing to flush. A 4 GiB restore written directly took 13.7-19.6 s with an fsync every
 * 256 MiB, 8.8-11.9 s without (cp + sync: 8.2-9.6 s).
 */
const WRITEBACK_BYTES = 256 * 1024 * 1024;
/** Block writes queued at once (8 x 512 KiB = 4 MiB held): writing overlaps verifying. */
const WRITES_IN_FLIGHT = 8;
/**
 * Of those, writes running at once. Buffered writes to one file take its inode lock: a second
 * one queued behind the running one leaves no gap between them, more only spin on the lock (with
 * 8 at once, 15-17 % of a 4 GiB restore's CPU samples; 4 GiB of 512 KiB writes here: 8 at once
 * 7.7-10.9 s and 4.5-9.9 s of kernel CPU, 2 at once 6.8-7.9 s and 3.6-5.8 s, 1 at a time
 * 6.9-8.4 s and 3.1-3.6 s).
 */
const WRITES_AT_ONCE = 2;
const HASH_BYTES = 32;
/** Differing blocks are fetched and written in batches of at most this many bytes (bounds memory). */
const WRITE_BATCH_BYTES = 32 * 1024 * 1024;

interface Pending {
  readonly index: number;
  readonly hash: Hash;
}

export async function materialize(
  store: MaterializeSource,
  snap: SnapshotRecord,
  writer: VolumeWriter,
  opts: MaterializeOptions = {},
): Promise<MaterializeResult> {
  if (writer.size !== snap.size) {
    throw new TandemError('ERR_VOLUME_SIZE_MISMATCH', `the target holds ${writer.size} bytes but snapshot ${snap.volume}@${snap.id} has ${snap.size}; resize the target first`, {
      details: { size: writer.size, expected: snap.size },
    });
  }
  const bs = snap.blockSize;
  const blocksTotal = Math.ceil(snap.size / bs);
  const batchBlocks = Math.max(1, Math.floor(WRITE_BATCH_BYTES / bs));
  let blocksDone = 0;
  let blocksCompared = 0;
  let blocksWritten = 0;
  let blocksZeroed = 0;
  let bytesRead = 0;
  let bytesWritten = 0;
  let pending: Pending[] = [];

  // Block writes queued, across batches, on WRITES_AT_ONCE lanes where each starts when the one
  // before it on its lane has ended; and one background flush of what they wrote.
  const writes: Array<Promise<void>> = [];
  const lanes: Array<Promise<void>> = Array.from({ length: WRITES_AT_ONCE }, () => Promise.resolve());
  let queued = 0;
  /** Queue a write on the next lane; a failed one fails every write queued after it on its lane. */
  const queue = (write: () => Promise<void>): Promise<void> => {
    const lane = queued++ % WRITES_AT_ONCE;
    const w = lanes[lane]!.then(write);
    w.catch(() => undefined); // observed by whoever awaits it, in order
    lanes[lane] = w;
    return w;
  };
  let writeback: Promise<void> = Promise.resolve();
  let writebackRunning = false;
  let writebackFailure: unknown = undefined;
  let sinceWriteback = 0;
  /** Start flushing written data while the restore goes on, so the final sync finds little to do. */
  const startWriteback = (len: number) => {
    sinceWriteback += len;
    if (sinceWriteback < WRITEBACK_BYTES || writebackRunning) return;
    sinceWriteback = 0;
    writebackRunning = true;
    // A failure is kept for the end (the first one): Linux reports a writeback error once per
    // open file, so the writer's final sync may not meet it again.
    writeback = (writer.writeback ? writer.writeback() : writer.sync())
      .catch((e: unknown) => void (writebackFailure ??= e))
      .finally(() => void (writebackRunning = false));
  };
  const blockLength = (index: number) => Math.min(bs, snap.size - index * bs);
  const report = () => opts.onProgress?.({ blocksDone, blocksTotal, blocksWritten, bytesWritten });

  /** Write the pending differing blocks, in index order; zero blocks as zeros, others from the store. */
  const flushPending = async () => {
    if (pending.length === 0) return;
    const batch = pending;
    pending = [];
    const data = batch.filter((p) => !p.hash.equals(ZERO_HASH));
    const zeros = batch.filter((p) => p.hash.equals(ZERO_HASH));
    let z = 0;
    /** Zero the batch's zero blocks before `index`: in volume order with the data blocks, so that a block that cannot be had leaves every block from it on as it was. */
    const zeroBefore = async (index: number): Promise<void> => {
      while (z < zeros.length && zeros[z]!.index < index) {
        const p = zeros[z++]!;
        const len = blockLength(p.index);
        await queue(() => writer.zero(p.index * bs, len));
        blocksZeroed++;
        bytesWritten += len;
      }
    };
    if (data.length > 0) {
      let i = 0;
      try {
        // Past the page cache: a restore reads far more than the cache holds, mostly not cached.
        for await (const frame of store.getBlocks(data.map((p) => p.hash), { direct: true })) {
          const p = data[i++]!;
          if (!frame.hash.equals(p.hash)) {
            throw new TandemError('ERR_BLOCK_CORRUPT', `the store returned block ${frame.hash.toString('hex')} where ${p.hash.toString('hex')} was asked (block ${p.index}); run \`appliance verify\``, {
              details: { index: p.index, hash: p.hash.toString('hex') },
            });
          }
          await zeroBefore(p.index);
          const len = blockLength(p.index);
          if (frame.data.length !== len) {
            throw new TandemError('ERR_BLOCK_CORRUPT', `block ${p.index} of ${snap.volume}@${snap.id} has ${frame.data.length} bytes where ${len} are expected; run \`appliance verify\``, {
              details: { index: p.index, hash: p.hash.toString('hex') },
            });
          }
          // Writes run on the I/O threads while the next blocks are read and verified here; a
          // written block's buffer goes back to the store's pool for the next read.
          const w = queue(() => writer.write(frame.data, p.index * bs));
          if (frame.release) void w.then(frame.release, () => undefined); // after a failed write it is collected
          writes.push(w);
          if (writes.length >= WRITES_IN_FLIGHT) await writes.shift();
          blocksWritten++;
          bytesWritten += len;
          startWriteback(len);
        }
      } catch (e) {
        // On a failure, let the writes already issued land before the caller closes the target.
        await Promise.allSettled([...writes, writeback]);
        // Name the block of the volume that could not be had: the operator's next step
        // (verify, sync from the peer) starts from it.
        const p = data[i];
        if (isTandemError(e) && (e.code === 'ERR_BLOCK_CORRUPT' || e.code === 'ERR_BLOCK_MISSING') && p && e.details.index === undefined) {
          throw new TandemError(e.code, `block ${p.index} of ${snap.volume}@${snap.id}: ${e.message}`, { cause: e, details: { ...e.details, index: p.index } });
        }
        throw e;
      }
      if (i !== data.length) {
        throw new TandemError('ERR_BLOCK_MISSING', `the store returned ${i} of ${data.length} blocks asked for ${snap.volume}@${snap.id}; run \`appliance verify\``);
      }
    }
    await zeroBefore(Infinity);
    report();
  };

  const enqueue = async (index: number, hash: Hash) => {
    pending.push({ index, hash });
    if (pending.length >= batchBlocks) await flushPending();
  };

  const targetIs = opts.targetIs && opts.targetIs.size === snap.size && opts.targetIs.blockSize === bs ? opts.targetIs : null;
  if (targetIs) {
    // Where the trees differ, in order; equal subtrees are skipped without reading them.
    for await (const { index, hash } of store.diffSnapshots(targetIs, snap)) {
      opts.signal?.throwIfAborted();
      blocksDone = index + 1;
      await enqueue(index, hash);
    }
    await flushPending();
    blocksDone = blocksTotal;
    blocksCompared = blocksTotal; // read and hashed by the snapshot of the target
  } else if (opts.assumeZero) {
    // Only non-zero blocks matter: the diff against "nothing" skips all-zero subtrees, so a
    // huge sparse snapshot costs time in proportion to its data only.
    for await (const { index, hash } of store.diffSnapshots(null, snap)) {
      opts.signal?.throwIfAborted();
      if (hash.equals(ZERO_HASH)) continue;
      blocksDone = index + 1;
      await enqueue(index, hash);
    }
    await flushPending();
    blocksDone = blocksTotal;
  } else {
    // Read the target in chunks of a scan's size, one in flight per slot of a pool of a scan's
    // shape (the store's idle one when there is one: a running appliance keeps one warm; a chunk
    // of one 16 MiB block keeps one worker busy, so several must be), hash them on the workers
    // and compare with the snapshot's hashes in order. A local file or device is read by the
    // workers themselves, as a scan reads it (store/scan.ts localSource), told the snapshot's
    // hashes so that only blocks that differ reach the shared buffer; other targets are read
    // here with writer.read. The chunks read are ahead of every write (a block is written once
    // its chunk is compared), so no read meets a write in flight.
    const layout = scanLayout(bs);
    const { chunkBlocks } = layout;
    const chunkBytes = chunkBlocks * bs;
    const pools = store.hashPools;
    const pool = pools ? pools.borrow(layout.poolBytes) : new HashPool(new SharedArrayBuffer(IO_SKEW + layout.slots * chunkBytes));
    const sab = pool.sab;
    // The pool has one worker per core this process may use; split each chunk as many ways.
    const threads = Math.max(1, availableParallelism());
    const local = localSource(writer);
    const inTargetHole = holeTest(writer.holes);
    const wanted = store.blockHashes(snap)[Symbol.asyncIterator]();
    type Chunk = { first: number; hashes: Buffer; expect: Buffer };
    /** Loads in flight, in chunk order: all settled before the pool goes back (their workers would still write into the slots). */
    const inFlight: Array<Promise<Chunk | null>> = [];
    try {
      /** The snapshot's hashes of chunk k: the walk's next ones (see `inOrder`). */
      const expected = async (k: number): Promise<Buffer> => {
        const first = k * chunkBlocks;
        const n = Math.min(chunkBlocks, blocksTotal - first);
        const out = Buffer.alloc(n * HASH_BYTES);
        for (let i = 0; i < n; i++) {
          const r = await wanted.next();
          if (r.done || r.value.index !== first + i) {
            throw new TandemError('ERR_STORE_CORRUPT', `snapshot ${snap.volume}@${snap.id} lists ${r.done ? 'no' : `block ${r.value.index} as its`} block ${first + i}; run \`appliance verify\``);
          }
          r.value.hash.copy(out, i * HASH_BYTES);
        }
        return out;
      };
      /** The walk is asked for one chunk at a time, in chunk order, however many loads run. */
      let inOrder: Promise<unknown> = Promise.resolve();
      /** Read chunk k into slot k % slots and hash it; the slot is free again once this resolves. */
      const load = async (k: number): Promise<Chunk | null> => {
        const pos = k * chunkBytes;
        if (pos >= snap.size) return null;
        const asked = inOrder.then(() => expected(k));
        inOrder = asked;
        const expect = await asked;
        const length = Math.min(chunkBytes, snap.size - pos);
        // A chunk in a hole of the target (as it was opened: chunks are compared before any
        // write into them) reads as zeros: not read, its blocks' hashes are ZERO_HASH. A restore
        // onto an existing 1 TiB image with 4 MiB of data read it all through the kernel (231 s).
        if (inTargetHole(pos, pos + length)) return { first: k * chunkBlocks, hashes: Buffer.alloc(Math.ceil(length / bs) * HASH_BYTES), expect };
        const base = IO_SKEW + (k % layout.slots) * chunkBytes;
        bytesRead += length;
        if (!local) {
          const n = await writer.read(Buffer.from(sab, base, length), pos);
          if (n !== length) {
            throw new TandemError('ERR_IO', `the target returned ${n} bytes at ${pos} where ${length} were expected; check the device`);
          }
        }
        // Split the chunk between the workers on block boundaries.
        const blocks = Math.ceil(length / bs);
        const per = Math.ceil(blocks / threads);
        const parts: Array<Promise<Buffer>> = [];
        for (let b = 0; b < blocks; b += per) {
          const read = local ? { ...local, position: pos + b * bs, expect: expect.subarray(b * HASH_BYTES, (b + per) * HASH_BYTES) } : undefined;
          parts.push(pool.hash(base + b * bs, Math.min(per * bs, length - b * bs), bs, read).then((h) => h.hashes));
        }
        // Every part settles before the load does: a worker still writing into the slot must not
        // outlive it (the pool may go to another scan next).
        const done = await Promise.allSettled(parts);
        const failed = done.find((r): r is PromiseRejectedResult => r.status === 'rejected');
        if (failed) throw failed.reason;
        return { first: k * chunkBlocks, hashes: Buffer.concat(done.map((r) => (r as PromiseFulfilledResult<Buffer>).value)), expect };
      };
      let issued = 0;
      /** Start loads until every slot has one. A load that fails is reported when awaited, in order. */
      const fill = () => {
        while (inFlight.length < layout.slots) {
          const p = load(issued++);
          p.catch(() => undefined);
          inFlight.push(p);
        }
      };
      fill();
      for (;;) {
        const chunk = await inFlight[0]!;
        if (!chunk) break;
        // Its slot is free at once: the comparison needs only the hashes (the blocks to write come
        // from the store).
        inFlight.shift();
        fill();
        const n = chunk.expect.length / HASH_BYTES;
        for (let i = 0; i < n; i++) {
          opts.signal?.throwIfAborted();
          const at = i * HASH_BYTES;
          blocksCompared++;
          blocksDone = chunk.first + i + 1;
          if (!chunk.hashes.subarray(at, at + HASH_BYTES).equals(chunk.expect.subarray(at, at + HASH_BYTES))) {
            await enqueue(chunk.first + i, Buffer.from(chunk.expect.subarray(at, at + HASH_BYTES)));
          }
        }
        report();
        opts.signal?.throwIfAborted(); // told during the report: nothing more is written
      }
      if (!(await wanted.next()).done) {
        throw new TandemError('ERR_STORE_CORRUPT', `snapshot ${snap.volume}@${snap.id} lists blocks past its size; run \`appliance verify\``);
      }
      await flushPending();
    } finally {
      await Promise.allSettled(inFlight);
      await wanted.return?.(undefined);
      if (pools) await pools.giveBack(pool);
      else await pool.close();
    }
  }
  while (writes.length > 0) await writes.shift();
  await writeback;
  if (writebackFailure !== undefined) throw isTandemError(writebackFailure) ? writebackFailure : fromSystemError(writebackFailure, `cannot write snapshot ${snap.volume}@${snap.id} to the disk`);
  await writer.sync();
  report();
  return { blocksCompared, bytesRead, blocksWritten, blocksZeroed, bytesWritten };
}
