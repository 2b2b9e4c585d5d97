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
import { mkdir, open, readdir, stat, truncate, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { TandemError, fromSystemError } from '../common/errors.js';
import { ioBuffer } from '../common/io-buffers.js';
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
  private writer: { id: number; fh: FileHandle; size: number } | undefined;
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
    for (const name of await readdir(dir)) {
      const id = parsePackFileName(name);
      if (id === undefined) {
        if (name.endsWith('.pack.tmp')) await unlink(join(dir, name)).catch(() => undefined);
        continue;
      }
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
  async appendMany(records: ReadonlyArray<{ hash: Hash; codec: number; payload: Buffer; parts?: RecordParts }>): Promise<BlockLocation[]> {
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
      try {
        let written = 0;
        // A positioned writev may be short (a signal, a nearly full disk): write the rest, or fail.
        while (written < want) {
          const { bytesWritten } = await w.fh.writev(written === 0 ? iov : remainder(iov, written), w.size + written);
          if (bytesWritten <= 0) throw new Error(`short write (${written} of ${want} bytes)`);
          written += bytesWritten;
        }
      } catch (e) {
        throw fromSystemError(e, `cannot write pack ${this.path(w.id)}`);
      }
      w.size = size;
      const d = this.dirty.get(w.id);
      if (d) d.size = w.size;
      else this.dirty.set(w.id, { fh: w.fh, size: w.size, created: false });
      this.sinceWriteback += want;
      if (this.sinceWriteback >= WRITEBACK_BYTES) this.startWriteback(w.fh);
      out.push(...locs);
    }
    return out;
  }

  /**
   * Start writing a pack's dirty pages to disk without waiting for it (one at a time). This is
   * not durability, which only {@link sync} gives; it keeps a long run of appends (a first
   * snapshot, a full sync received) streaming to the disk instead of piling gigabytes into the
   * page cache for the next sync to write while everything waits. A failure here is ignored:
   * the sync that follows meets it again and reports it.
   */
  private startWriteback(fh: FileHandle): void {
    if (this.writeback) return;
    this.sinceWriteback = 0;
    this.writeback = fh.datasync().catch(() => undefined).finally(() => void (this.writeback = null));
  }

  /**
   * fsync every pack written since the last call; returns their new durable lengths, which the
   * caller must record in the index (then call {@link markDurable}).
   */
  async sync(): Promise<Map<number, number>> {
    const out = new Map<number, number>();
    let created = false;
    for (const [id, d] of this.dirty) {
      try {
        await d.fh.sync();
      } catch (e) {
        throw fromSystemError(e, `cannot fsync pack ${this.path(id)}`);
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
  async readPooled(id: number, offset: number, length: number): Promise<PooledRead> {
    let free = this.freeReads.get(length);
    if (!free && (length < POOLED_READ_MIN || this.freeReads.size >= POOLED_READ_LENGTHS)) return { buf: await this.read(id, offset, length) };
    if (!free) this.freeReads.set(length, (free = []));
    const whole = free.pop() ?? ioBuffer(length);
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      if (free.length < POOLED_READS_KEPT) free.push(whole);
    };
    try {
      return { buf: await this.readInto(id, offset, length, whole), release };
    } catch (e) {
      release();
      throw e;
    }
  }

  private async readInto(id: number, offset: number, length: number, buf: Buffer): Promise<Buffer> {
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
    if (this.writer?.id === id) {
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
    if (this.writer && !this.dirty.has(this.writer.id)) await this.writer.fh.close();
    this.writer = undefined;
  }

  ids(): number[] {
    return [...this.durable.keys()].sort((a, b) => a - b);
  }

  async close(): Promise<void> {
    for (const fh of this.readers.values()) await fh.close().catch(() => undefined);
    this.readers.clear();
    for (const d of this.dirty.values()) await d.fh.close().catch(() => undefined);
    if (this.writer && !this.dirty.has(this.writer.id)) await this.writer.fh.close().catch(() => undefined);
    this.dirty.clear();
    this.writer = undefined;
  }
}

/** Appended bytes between background writebacks ({@link PackFiles.startWriteback}). */
const WRITEBACK_BYTES = 32 * 1024 * 1024;

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
