/**
 * The pack files of a store: STORE_DIR/packs/NNNNNNNN.pack, append-only.
 *
 * Durability protocol: bytes are appended without fsync; {@link PackFiles.sync} fsyncs every pack
 * written since the last sync (and the directory when a file was created) and returns their new
 * lengths, which the store then records in the index ('p' keys) in the same batch as the block
 * entries pointing into them. So the index never points at bytes that are not durable.
 *
 * Recovery on open (see store/README.md): a pack without a 'p' entry is unreferenced (a crashed
 * first write, or a gc leftover) and deleted; a pack longer than its durable length has a torn
 * or unindexed tail, which is truncated away (nothing refers to it); a pack shorter than its
 * durable length lost acknowledged data: it is kept, and reads of the missing records fail with
 * ERR_STORE_CORRUPT so `verify` can name the blocks.
 */
import { constants } from 'node:fs';
import { mkdir, open, readdir, stat, truncate, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { TandemError, fromSystemError } from '../common/errors.js';
import { DIRECT_ALIGN, alignedBuffers, alignedSlots, ioBuffer } from '../common/io-buffers.js';
import type { Hash } from './types.js';
import type { BlockLocation } from './keys.js';
import { encodeRecordParts, packFileName, type RecordParts, parsePackFileName, PACK_TARGET_SIZE, recordLength } from './pack.js';

export const PACKS_DIR = 'packs';

export interface RecoveryReport {
  readonly removed: number[];
  readonly truncated: Array<{ pack: number; from: number; to: number }>;
  readonly short: Array<{ pack: number; size: number; durable: number }>;
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Reads at least this long (blocks: 512 KiB by default) can take their buffer from a free list
 * of that length ({@link PackFiles.readPooled}). A sync reads a volume's worth of blocks; with a
 * fresh buffer each, V8 ran a full garbage collection every ~20 MiB (50 per GiB sent), which
 * with the page faults of new memory cost the sender ~0.8 CPU s per GiB (3.5 -> 2.7 s for a
 * 1 GiB transfer including its rescan).
 */
const POOLED_READ_MIN = 256 * 1024;
/** Free buffers kept per length (32 x 512 KiB: 16 MiB), for at most this many lengths. */
const POOLED_READS_KEPT = 32;
const POOLED_READ_LENGTHS = 4;

/** A pooled read: give `buf` back with `release` once nothing refers to it any more (optional). */
export interface PooledRead {
  readonly buf: Buffer;
  readonly release?: () => void;
}

export class PackFiles {
  readonly dir: string;
  /** Durable length of every live pack (mirror of the index 'p' entries). */
  readonly durable: Map<number, number>;
  private readonly readers = new Map<number, FileHandle>();
  /** Released read buffers, by length. */
  private readonly freeReads = new Map<number, Buffer[]>();
  /** Handles for direct reads ({@link readPooled} `direct`); null once the filesystem refused one. */
  private directReaders: Map<number, FileHandle> | null = new Map();
  private writer: { id: number; fh: FileHandle; size: number; direct?: FileHandle } | undefined;
  /**
   * Free page-aligned staging slots of direct appends ({@link appendMany} `direct`), made on
   * first use; null once direct I/O turned out not to work on this filesystem.
   */
  private slots: Buffer[] | null | undefined;
  /** Whether a direct write has worked yet (the first one is waited for). */
  private directProbed = false;
  /** Direct writes on their way to the disk. */
  private readonly directWrites = new Set<DirectWrite>();
  /**
   * The first failed direct write, or a write that met a full disk: every later append and sync
   * throws it, until {@link discardUnsynced}.
   */
  private directFailure: unknown = null;
  /** Packs appended to (or created) since the last sync, with their current size. */
  private readonly dirty = new Map<number, { fh: FileHandle; size: number; created: boolean }>();
  private nextId: number;
  /** Bytes appended since the last background writeback started. */
  private sinceWriteback = 0;
  /** The background writeback running, if any. */
  private writeback: Promise<void> | null = null;

  private constructor(dir: string, durable: Map<number, number>, nextId: number) {
    this.dir = dir;
    this.durable = durable;
    this.nextId = nextId;
  }

  /** Open the packs directory and recover it against the durable lengths from the index. */
  static async open(storeDir: string, durable: Map<number, number>): Promise<{ packs: PackFiles; recovery: RecoveryReport }> {
    const dir = join(storeDir, PACKS_DIR);
    await mkdir(dir, { recursive: true });
    const recovery: RecoveryReport = { removed: [], truncated: [], short: [] };
    let maxId = 0;
    const seen = new Set<number>();
    for (const name of await readdir(dir)) {
      const id = parsePackFileName(name);
      if (id === undefined) {
        if (name.endsWith('.pack.tmp')) await unlink(join(dir, name)).catch(() => undefined);
        continue;
      }
      seen.add(id);
      maxId = Math.max(maxId, id);
      const path = join(dir, name);
      const want = durable.get(id);
      if (want === undefined) {
        await unlink(path);
        recovery.removed.push(id);
        continue;
      }
      const size = (await stat(path)).size;
      if (size > want) {
        await truncate(path, want);
        recovery.truncated.push({ pack: id, from: size, to: want });
      } else if (size < want) {
        recovery.short.push({ pack: id, size, durable: want });
      }
    }
    // A durable pack with no file lost everything it held: the store opens (reads of its records
    // fail with ERR_STORE_CORRUPT, verify names the snapshots), as for a pack cut short.
    for (const [id, want] of durable) if (!seen.has(id)) recovery.short.push({ pack: id, size: 0, durable: want });
    for (const id of durable.keys()) maxId = Math.max(maxId, id);
    if (recovery.removed.length > 0 || recovery.truncated.length > 0) await fsyncDir(dir);
    const packs = new PackFiles(dir, durable, maxId + 1);
    // Keep appending to the newest pack when it is intact and not full (fewer small files).
    const last = Math.max(0, ...durable.keys());
    if (last > 0 && !recovery.short.some((s) => s.pack === last) && durable.get(last)! < PACK_TARGET_SIZE) {
      const fh = await open(join(dir, packFileName(last)), 'r+');
      packs.writer = { id: last, fh, size: durable.get(last)! };
    }
    return { packs, recovery };
  }

  path(id: number): string {
    return join(this.dir, packFileName(id));
  }

  /** A fresh pack id that no file uses (gc writes its new packs under such ids). */
  allocateId(): number {
    return this.nextId++;
  }

  /** Append one record to the current pack (callers serialize). Not durable until {@link sync}. */
  async append(hash: Hash, codec: number, payload: Buffer): Promise<BlockLocation> {
    return (await this.appendMany([{ hash, codec, payload }]))[0]!;
  }

  /**
   * Append records in order (callers serialize), with one positioned writev per pack touched
   * rather than one per record: a batch of 512 KiB blocks costs one thread-pool round trip.
   * Not durable until {@link sync}. On a failed write, nothing of the batch is counted: the
   * pack's logical size stays where it was, so the next append overwrites the torn bytes.
   */
  async appendMany(records: ReadonlyArray<{ hash: Hash; codec: number; payload: Buffer; parts?: RecordParts }>, opts: { direct?: boolean } = {}): Promise<BlockLocation[]> {
    this.throwDirectFailure();
    const out: BlockLocation[] = [];
    let i = 0;
    while (i < records.length) {
      const first = recordLength(records[i]!.payload.length);
      if (this.writer && this.writer.size > 0 && this.writer.size + first > PACK_TARGET_SIZE) await this.rollover();
      if (!this.writer) {
        const id = this.allocateId();
        const fh = await open(this.path(id), 'wx', 0o640).catch((e) => {
          throw fromSystemError(e, `cannot create pack ${this.path(id)}`);
        });
        this.writer = { id, fh, size: 0 };
        this.dirty.set(id, { fh, size: 0, created: true });
      }
      const w = this.writer;
      // Records for this pack: as many as fit under the target size (at least one), and few
      // enough buffers for one writev (IOV_MAX is 1024).
      const iov: Buffer[] = [];
      const locs: BlockLocation[] = [];
      let size = w.size;
      while (i < records.length && iov.length + 3 <= WRITEV_MAX_BUFFERS) {
        const r = records[i]!;
        const total = recordLength(r.payload.length);
        if (locs.length > 0 && size + total > PACK_TARGET_SIZE) break;
        const { header, trailer } = r.parts ?? encodeRecordParts(r.hash, r.codec, r.payload);
        iov.push(header, r.payload, trailer);
        locs.push({ pack: w.id, offset: size, length: r.payload.length, codec: r.codec });
        size += total;
        i++;
      }
      const want = size - w.size;
      let buffered = want;
      try {
        const direct = opts.direct ? await this.directAppend(w, iov, want) : 0;
        buffered -= direct;
        if (direct === 0) await writeAll(w.fh, iov, w.size);
      } catch (e) {
        const err = fromSystemError(e, `cannot write pack ${this.path(w.id)}`);
        // A full disk: everything appended since the last sync is given back (the store discards
        // it, as after a failed direct write), so the operation that met it leaves the disk as it
        // found it, and the index can still open there (LevelDB needs a few KiB to open).
        if (err.code === 'ERR_DISK_FULL') {
          this.directFailure ??= err;
          // The torn bytes are past the durable length even when nothing was appended before.
          if (!this.dirty.has(w.id)) this.dirty.set(w.id, { fh: w.fh, size: w.size, created: false });
        }
        throw err;
      }
      w.size = size;
      const d = this.dirty.get(w.id);
      if (d) d.size = w.size;
      else this.dirty.set(w.id, { fh: w.fh, size: w.size, created: false });
      this.sinceWriteback += buffered;
      if (this.sinceWriteback >= WRITEBACK_BYTES) this.startWriteback(w.fh);
      out.push(...locs);
    }
    return out;
  }

  /**
   * Write the records `iov` (`want` bytes, for position `w.size`) with their whole pages going
   * straight to the disk (O_DIRECT) and only the partial first and last pages through the page
   * cache; returns the bytes that go directly (0: nothing was written, the caller writes it all
   * through the page cache: direct I/O unavailable, or too little or too much for a slot).
   *
   * Why: on the virtual machines we run on, the kernel's copy into the page cache costs more than
   * a received block's TLS decryption (~1.2 CPU s per GiB in the thread pool while a sync is
   * received, 0.2 s this way; restores measured the same, appliance/volumes/direct.ts). The
   * records are copied once into a page-aligned staging slot (WebAssembly memory, which V8 maps
   * on a page boundary) at the same offset within a page as their position in the file; the
   * aligned middle goes to the disk from there in the background (a direct write waits for the
   * disk, which must not hold up the next batch), the two edges into the page cache at once.
   * The pages of one batch never overlap another's direct part (each batch starts where the last
   * ended, inside the page that batch wrote through the cache), so the cache never holds stale
   * bytes of a directly written page. {@link sync} waits for the direct writes before its fsync,
   * which covers both paths: durability is unchanged. Reads of a range being written wait for it
   * ({@link readInto}); a direct write drops cached copies of its range, so reads see the bytes.
   * A failed direct write fails every later append and sync (its records are counted in the
   * pack's size already) until the store calls {@link discardUnsynced}.
   */
  private async directAppend(w: { id: number; fh: FileHandle; size: number; direct?: FileHandle }, iov: readonly Buffer[], want: number): Promise<number> {
    const start = w.size;
    const end = start + want;
    const first = Math.ceil(start / DIRECT_ALIGN) * DIRECT_ALIGN;
    const last = Math.floor(end / DIRECT_ALIGN) * DIRECT_ALIGN;
    const lead = start % DIRECT_ALIGN;
    if (last - first < DIRECT_MIN_BYTES || lead + want > SLOT_BYTES || this.slots === null) return 0;
    if (!w.direct) {
      try {
        w.direct = await open(this.path(w.id), constants.O_WRONLY | constants.O_DIRECT);
      } catch {
        this.slots = null; // EINVAL: a filesystem without direct I/O (tmpfs); anything else shows on the buffered path
        return 0;
      }
    }
    this.slots ??= alignedSlots(SLOTS, SLOT_BYTES);
    while (this.slots.length === 0) await Promise.race([...this.directWrites].map((d) => d.done));
    this.throwDirectFailure();
    const slot = this.slots.pop()!;
    let off = lead;
    for (const b of iov) off += b.copy(slot, off);
    const middle = slot.subarray(first - start + lead, last - start + lead);
    const fh = w.direct;
    if (!this.directProbed) {
      // The first direct write tells whether this filesystem takes them: waited for, and on
      // EINVAL nothing has been written yet and everything goes through the page cache.
      try {
        await writeAll(fh, [middle], first);
        this.directProbed = true;
      } catch (e) {
        this.slots.push(slot);
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        this.slots = null;
        await fh.close().catch(() => undefined);
        delete w.direct;
        return 0;
      }
      this.slots.push(slot);
    } else {
      const d: DirectWrite = { pack: w.id, start: first, end: last, done: Promise.resolve() };
      d.done = writeAll(fh, [middle], first).then(
        () => undefined,
        (e: unknown) => void (this.directFailure ??= fromSystemError(e, `cannot write pack ${this.path(w.id)}`)),
      ).finally(() => {
        this.directWrites.delete(d);
        (this.slots as Buffer[] | null)?.push(slot);
      });
      this.directWrites.add(d);
    }
    try {
      if (first > start) await writeAll(w.fh, [slot.subarray(lead, lead + (first - start))], start);
      if (end > last) await writeAll(w.fh, [slot.subarray(last - start + lead, lead + want)], last);
    } catch (e) {
      // The direct part may be on its way: the same range must not be written again.
      this.directFailure ??= fromSystemError(e, `cannot write pack ${this.path(w.id)}`);
      throw e;
    }
    return last - first;
  }

  /** Wait for the direct writes in flight (all, or those of `pack` overlapping [start, end)); throws a failure. */
  private async settleDirect(pack?: number, start = 0, end = Infinity): Promise<void> {
    const hit = [...this.directWrites].filter((d) => pack === undefined || (d.pack === pack && d.start < end && start < d.end));
    if (hit.length > 0) await Promise.all(hit.map((d) => d.done));
    this.throwDirectFailure();
  }

  private throwDirectFailure(): void {
    if (this.directFailure !== null) throw this.directFailure;
  }

  /** A direct write, a background writeback or an fsync failed: appends and syncs throw until {@link discardUnsynced}. */
  get failed(): boolean {
    return this.directFailure !== null;
  }

  /**
   * After a failed direct write, whose records were counted already: forget everything appended
   * since the last sync. Each pack appended to is cut back to its durable length (one never made
   * durable is deleted) and appends go on in a new pack; the caller forgets the blocks it placed
   * there (Store). So a store that met a full disk goes on once there is space again, instead of
   * failing until it is reopened. Returns the failure.
   */
  async discardUnsynced(): Promise<unknown> {
    const failure = this.directFailure;
    await Promise.all([...this.directWrites].map((d) => d.done));
    if (this.writer) {
      await this.writer.direct?.close().catch(() => undefined);
      if (!this.dirty.has(this.writer.id)) await this.writer.fh.close().catch(() => undefined);
      this.writer = undefined;
    }
    for (const [id, d] of this.dirty) {
      await d.fh.close().catch(() => undefined);
      const durable = this.durable.get(id);
      try {
        if (durable !== undefined) await truncate(this.path(id), durable);
        else {
          await this.readers.get(id)?.close().catch(() => undefined);
          this.readers.delete(id);
          await this.directReaders?.get(id)?.close().catch(() => undefined);
          this.directReaders?.delete(id);
          await unlink(this.path(id));
        }
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw fromSystemError(e, `cannot cut pack ${this.path(id)} back to its durable length`);
      }
    }
    this.dirty.clear();
    this.directFailure = null;
    return failure;
  }

  /**
   * Start writing a pack's dirty pages to disk without waiting for it (one at a time). This is
   * not durability, which only {@link sync} gives; it keeps a long run of appends (a first
   * snapshot, a full sync received) streaming to the disk instead of piling gigabytes into the
   * page cache for the next sync to write while everything waits. A failure fails the store's
   * appends and its next flush, as a failed direct write does ({@link failed}): Linux reports a
   * writeback error once per open file, so the fsync that follows on the same handle returned 0
   * and a snapshot whose pages never reached the disk was committed (EIO injected into this
   * fdatasync, 3 of 3 runs).
   */
  private startWriteback(fh: FileHandle): void {
    if (this.writeback) return;
    this.sinceWriteback = 0;
    const id = this.writer?.id;
    this.writeback = fh
      .datasync()
      .catch((e: unknown) => void (this.directFailure ??= fromSystemError(e, `cannot write pack ${id === undefined ? this.dir : this.path(id)} to the disk`)))
      .finally(() => void (this.writeback = null));
  }

  /**
   * fsync every pack written since the last call; returns their new durable lengths, which the
   * caller must record in the index (then call {@link markDurable}).
   */
  async sync(): Promise<Map<number, number>> {
    await this.settleDirect();
    const out = new Map<number, number>();
    let created = false;
    for (const [id, d] of this.dirty) {
      try {
        await d.fh.sync();
      } catch (e) {
        // What was appended since the last sync may not be on the disk, and a second fsync of
        // this handle would not say so (Linux reports a writeback error once): it is discarded as
        // after a failed direct write ({@link discardUnsynced}), never recorded as durable.
        const err = fromSystemError(e, `cannot fsync pack ${this.path(id)}`);
        this.directFailure ??= err;
        throw err;
      }
      created ||= d.created;
      out.set(id, d.size);
      if (this.writer?.id !== id) await d.fh.close();
    }
    if (created) await fsyncDir(this.dir);
    this.dirty.clear();
    return out;
  }

  markDurable(lengths: Map<number, number>): void {
    for (const [id, n] of lengths) this.durable.set(id, n);
  }

  /** Read `length` bytes at `offset` of a pack; short at a truncated pack. */
  async read(id: number, offset: number, length: number): Promise<Buffer> {
    return this.readInto(id, offset, length, ioBuffer(length));
  }

  /**
   * {@link read} into a buffer from a free list, with the function that gives it back. Whoever
   * calls `release` must be sure nothing refers to the bytes any more: the buffer is then read
   * into again. Not calling it is safe (the buffer is collected as usual).
   */
  async readPooled(id: number, offset: number, length: number, opts: { direct?: boolean } = {}): Promise<PooledRead> {
    if (opts.direct && length >= POOLED_READ_MIN && this.directReaders) {
      const r = await this.readDirect(id, offset, length);
      if (r) return r;
    }
    let free = this.freeReads.get(length);
    if (!free && (length < POOLED_READ_MIN || this.freeReads.size >= POOLED_READ_LENGTHS)) return { buf: await this.read(id, offset, length) };
    if (!free) this.freeReads.set(length, (free = []));
    const whole = free.pop() ?? ioBuffer(length);
    const release = giveBack(free, whole);
    try {
      return { buf: await this.readInto(id, offset, length, whole), release };
    } catch (e) {
      release();
      throw e;
    }
  }

  /**
   * {@link readPooled} with O_DIRECT: the whole pages around the record are read from the disk
   * into a page-aligned buffer, past the page cache. For a reader of much data that is usually
   * not cached and will not be read again soon (a restore). Buffered, the kernel's reads filled
   * the cache with pages that were then copied once more and thrown away: a 4 GiB restore from
   * packs not in the cache took 8.3-9.0 s (5.1 CPU s in the kernel). The kernel writes dirty
   * cached pages of the range out first, so the bytes read are those last written either way.
   * The buffer comes from the process's pool (common/io-buffers.ts alignedBuffers), which early
   * sending's copies share. Null when direct I/O does not work here (then every later call goes
   * buffered).
   */
  private async readDirect(id: number, offset: number, length: number): Promise<PooledRead | null> {
    const { buf: whole, release } = alignedBuffers.take(directSpan(offset, length).want);
    try {
      const buf = await this.readDirectInto(id, offset, length, whole);
      if (buf) return { buf, release };
    } catch (e) {
      release();
      throw e;
    }
    release();
    return null;
  }

  /**
   * Read `length` bytes at `offset` of a pack into `slot`, a page-aligned buffer of at least
   * `length` + 2 pages (common/io-buffers.ts alignedSlots) that the caller reuses: with O_DIRECT
   * when this filesystem takes it, else through the page cache. Returns the bytes, a view of
   * `slot`; short at a truncated pack. For a reader of many spans of varied lengths (gc), which
   * the pools of {@link readPooled} would not keep.
   */
  async readSpan(id: number, offset: number, length: number, slot: Buffer): Promise<Buffer> {
    return (await this.readDirectInto(id, offset, length, slot)) ?? this.readInto(id, offset, length, slot.subarray(0, length));
  }

  /**
   * The whole pages around [offset, offset + length) of a pack read with O_DIRECT into `whole`
   * (page-aligned, large enough: {@link directSpan}); returns the bytes asked for, a view of it,
   * short at the end of the file. Null when direct I/O does not work here (then every later
   * call goes buffered) or the pack cannot be opened this way (the buffered path reports why).
   */
  private async readDirectInto(id: number, offset: number, length: number, whole: Buffer): Promise<Buffer | null> {
    if (!this.directReaders) return null;
    if (this.directWrites.size > 0) await this.settleDirect(id, offset, offset + length);
    const { start, lead, want } = directSpan(offset, length);
    let fh = this.directReaders.get(id);
    if (!fh) {
      try {
        fh = await open(this.path(id), constants.O_RDONLY | constants.O_DIRECT);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EINVAL') this.directReaders = null; // no direct I/O here (tmpfs)
        return null; // anything else (a missing pack) is reported by the buffered path
      }
      const raced = this.directReaders?.get(id);
      if (raced || !this.directReaders) {
        await fh.close();
        if (!raced) return null;
        fh = raced;
      } else {
        this.directReaders.set(id, fh);
      }
    }
    let done = 0;
    try {
      while (done < want) {
        const { bytesRead } = await fh.read(whole, done, want - done, start + done);
        if (bytesRead === 0) break;
        done += bytesRead;
        if (done % DIRECT_ALIGN !== 0) break; // the end of the file
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw fromSystemError(e, `cannot read pack ${this.path(id)}`);
      this.directReaders = null;
      return null;
    }
    const got = Math.max(0, Math.min(length, done - lead));
    return whole.subarray(lead, lead + got);
  }

  private async readInto(id: number, offset: number, length: number, buf: Buffer): Promise<Buffer> {
    if (this.directWrites.size > 0) await this.settleDirect(id, offset, offset + length);
    let fh = this.readers.get(id);
    if (!fh) {
      try {
        fh = await open(this.path(id), 'r');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
          throw new TandemError('ERR_STORE_CORRUPT', `pack ${this.path(id)} is missing; run \`appliance verify\` to list the damaged snapshots`, { details: { pack: id } });
        }
        throw fromSystemError(e, `cannot open pack ${this.path(id)}`);
      }
      const raced = this.readers.get(id);
      if (raced) {
        await fh.close();
        fh = raced;
      } else {
        this.readers.set(id, fh);
      }
    }
    let done = 0;
    while (done < length) {
      const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done === length ? buf : buf.subarray(0, done);
  }

  /** Forget a pack (gc): close its handles and delete the file. */
  async remove(id: number): Promise<void> {
    const fh = this.readers.get(id);
    this.readers.delete(id);
    await this.directReaders?.get(id)?.close().catch(() => undefined);
    this.directReaders?.delete(id);
    if (this.writer?.id === id) {
      await this.settleDirect(id).catch(() => undefined);
      await this.writer.direct?.close().catch(() => undefined);
      await this.writer.fh.close();
      this.writer = undefined;
    }
    this.durable.delete(id);
    await fh?.close().catch(() => undefined);
    await unlink(this.path(id)).catch((e) => {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw fromSystemError(e, `cannot delete pack ${this.path(id)}`);
    });
  }

  /** Stop appending to the current pack (gc starts fresh packs). */
  async rollover(): Promise<void> {
    await this.settleDirect(this.writer?.id);
    await this.writer?.direct?.close().catch(() => undefined);
    if (this.writer && !this.dirty.has(this.writer.id)) await this.writer.fh.close();
    this.writer = undefined;
  }

  ids(): number[] {
    return [...this.durable.keys()].sort((a, b) => a - b);
  }

  async close(): Promise<void> {
    for (const fh of this.readers.values()) await fh.close().catch(() => undefined);
    this.readers.clear();
    for (const fh of this.directReaders?.values() ?? []) await fh.close().catch(() => undefined);
    this.directReaders?.clear();
    await this.settleDirect().catch(() => undefined); // a failure was thrown by the sync before, or leaves the tail to recovery
    for (const d of this.dirty.values()) await d.fh.close().catch(() => undefined);
    await this.writer?.direct?.close().catch(() => undefined);
    if (this.writer && !this.dirty.has(this.writer.id)) await this.writer.fh.close().catch(() => undefined);
    this.dirty.clear();
    this.writer = undefined;
  }
}

/** Appended bytes between background writebacks ({@link PackFiles.startWriteback}). */
const WRITEBACK_BYTES = 32 * 1024 * 1024;

/** Fewer whole pages than this in a batch go through the page cache with the rest (not worth a second write). */
const DIRECT_MIN_BYTES = 64 * 1024;
/**
 * A staging slot of direct appends: a scan's chunk (8 MiB) or a putBlocks batch (8 blocks of
 * 512 KiB) with its records' headers and a page of lead. A larger batch is written buffered.
 */
const SLOT_BYTES = 9 * 1024 * 1024;
/** Slots (27 MiB, allocated at the first direct append): one being filled while the batches before it go to the disk. */
const SLOTS = 3;

/** The `release` of a pooled read: `whole` goes back to `pool` once (if the pool is not full). */
function giveBack(pool: Buffer[], whole: Buffer): () => void {
  let released = false;
  return () => {
    if (released) return;
    released = true;
    if (pool.length < POOLED_READS_KEPT) pool.push(whole);
  };
}

/** The whole pages around [offset, offset + length): where they start, the bytes before `offset` in them, and how many bytes they are. */
function directSpan(offset: number, length: number): { start: number; lead: number; want: number } {
  const start = Math.floor(offset / DIRECT_ALIGN) * DIRECT_ALIGN;
  const lead = offset - start;
  return { start, lead, want: Math.ceil((lead + length) / DIRECT_ALIGN) * DIRECT_ALIGN };
}

/** A direct write of [start, end) of a pack on its way to the disk. */
interface DirectWrite {
  readonly pack: number;
  readonly start: number;
  readonly end: number;
  done: Promise<void>;
}

/** Write all of `iov` at `position`; a positioned write may be short (a signal, a nearly full disk): write the rest, or fail. */
async function writeAll(fh: FileHandle, iov: readonly Buffer[], position: number): Promise<void> {
  const want = iov.reduce((n, b) => n + b.length, 0);
  let written = 0;
  while (written < want) {
    const { bytesWritten } = await fh.writev(written === 0 ? (iov as Buffer[]) : remainder(iov, written), position + written);
    if (bytesWritten <= 0) throw new Error(`short write (${written} of ${want} bytes)`);
    written += bytesWritten;
  }
}

/** Buffers per writev call: under Linux's IOV_MAX of 1024, a multiple of a record's three parts. */
const WRITEV_MAX_BUFFERS = 768;

/** The buffers of `iov` after its first `skip` bytes (views, no copy). */
function remainder(iov: readonly Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of iov) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}
