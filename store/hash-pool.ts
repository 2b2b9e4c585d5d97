/**
 * A pool of worker threads that hash blocks held in a SharedArrayBuffer, so reading (main
 * thread, libuv), hashing (workers) and writing packs (main thread) overlap and every core works.
 *
 * Work items name a region of the shared buffer; the answer is 32 bytes per block: the block's
 * BLAKE3 hash, or ZERO_HASH for an all-zero block (detected by memcmp against a zero buffer,
 * which costs far less than hashing). The workers are started from inline code so the pool works
 * the same from TypeScript sources and from the compiled dist/.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { TandemError, fromSystemError } from '../common/errors.js';
import { IO_SKEW } from '../common/io-buffers.js';
import { BLAKE3_MODULE_PATH, HASH_LENGTH, ZERO_HASH } from './hash.js';
import { CODEC_RAW, CRC32_MODULE_PATH, recordHeader } from './pack.js';

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');
const native = require(workerData.modulePath);
const { crc32 } = require(workerData.crcModulePath);
const sab = workerData.sab;
// A raw record's header (store/pack.ts): its length (offset 8) and hash (offset 12) are filled in per block.
const header = Buffer.from(workerData.recordHeader);
function recordCrc(v, h) {
  header.writeUInt32BE(v.length, 8);
  h.copy(header, 12);
  return crc32(v, crc32(header)) >>> 0;
}
const zeros = Buffer.alloc(1048576);
function isZero(v) {
  for (let off = 0; off < v.length; off += zeros.length) {
    const end = Math.min(v.length, off + zeros.length);
    if (!v.subarray(off, end).equals(zeros.subarray(0, end - off))) return false;
  }
  return true;
}
let fd;
let fdPath;
let fdDirect = false;
function release() {
  const was = fd;
  fd = undefined;
  fdPath = undefined;
  try {
    if (was !== undefined) fs.closeSync(was);
  } catch {
    // gone either way
  }
}
// Volumes read with O_DIRECT (block devices: what they hold is not in the page cache, and a
// scan must not evict what is), into two page-aligned buffers (WebAssembly memory: V8 maps it
// on a page boundary; see hashDirect). A volume that refuses direct reads (EINVAL) is read
// through the cache. SharedArrayBuffers are not page-aligned (a direct read into the scan's
// slots gets EINVAL), so a block read directly is copied into its slot from there when the slot
// must hold it.
const aligned = [];
const noDirect = new Set();
// Aligned buffer k (0 or 1: a direct job reads the next block into one while it hashes the other).
function alignedStage(len, k = 0) {
  if (aligned[k] === undefined || aligned[k].length < len) aligned[k] = Buffer.from(new WebAssembly.Memory({ initial: Math.ceil(len / 65536) }).buffer);
  return aligned[k].subarray(0, len);
}
function openVolume(path, direct) {
  if (fdPath === path && fdDirect === direct) return;
  release();
  fd = fs.openSync(path, direct ? fs.constants.O_RDONLY | fs.constants.O_DIRECT : 'r');
  fdPath = path;
  fdDirect = direct;
}
function readLoop(v, position) {
  let done = 0;
  while (done < v.length) {
    const n = fs.readSync(fd, v, done, v.length - done, position + done);
    if (n === 0) throw ended(position + done);
    done += n;
  }
}
function ended(at) {
  return Object.assign(new Error('the volume ended at byte ' + at), { short: at });
}
function readAsync(v, position) {
  return new Promise((resolve, reject) => {
    const step = (done) => {
      if (done === v.length) return resolve();
      fs.read(fd, v, done, v.length - done, position + done, (e, n) => {
        if (e) return reject(e);
        if (n === 0) return reject(ended(position + done));
        step(done + n);
      });
    };
    step(0);
  });
}
// With the hashes a range is expected to have (its parent snapshot's), each block is read into
// this one buffer, warm in the core's cache (and ${IO_SKEW} bytes past a page boundary, see
// common/io-buffers.ts), and copied into the shared buffer only if its hash differs: a re-scan
// then writes almost nothing to cold memory. 2 threads over a warm 4 GiB image: 1.23-1.29 s this
// way, 1.44-1.57 s reading into the rotating shared slots (b3sum --num-threads 2: 1.1-1.2 s).
let stage;
function staging(len) {
  if (stage === undefined || stage.length < len) stage = Buffer.from(new ArrayBuffer(len + ${IO_SKEW}), ${IO_SKEW}, len);
  return stage.subarray(0, len);
}
// Block i of job m, whose bytes are in s (read there: v, its place in the shared buffer, or a
// stage); its hash goes to out, the CRC of its pack record to crcs.
function hashBlock(m, i, s, v, out, crcs) {
  const h = out.subarray(i * ${HASH_LENGTH}, (i + 1) * ${HASH_LENGTH});
  const zero = isZero(s);
  if (!zero) native.blake3(s).copy(h);
  if (m.expect !== undefined && h.equals(m.expect.subarray(i * ${HASH_LENGTH}, (i + 1) * ${HASH_LENGTH}))) return;
  if (crcs && !zero) crcs.writeUInt32BE(recordCrc(s, h), i * 4);
  if (s !== v) s.copy(v);
}
function blockView(m, i) {
  const off = m.offset + i * m.blockSize;
  return Buffer.from(sab, off, Math.min(m.blockSize, m.offset + m.length - off));
}
function positionOf(m, i) {
  return m.positions === undefined ? m.position + i * m.blockSize : m.positions[i];
}
// Each block is hashed right after it is read, while it is still in the core's cache: one read
// per 8 MiB chunk and then hashing took 0.89-0.98 s for a warm 2 GiB image on two threads,
// a read per block 0.64-0.74 s (b3sum: 0.69 s). Scattered blocks (a change list) are read each
// from its own position.
function hashBuffered(m, n, out, crcs) {
  for (let i = 0; i < n; i++) {
    const v = blockView(m, i);
    // Read into the stage when most blocks are expected unchanged (see staging), else in place.
    const s = m.path !== undefined && m.expect !== undefined ? staging(v.length) : v;
    if (m.path !== undefined) {
      openVolume(m.path, false);
      readLoop(s, positionOf(m, i));
    }
    hashBlock(m, i, s, v, out, crcs);
  }
}
// A volume read past the page cache (O_DIRECT) waits on the disk for every block: the next
// block's read is in flight while this one is hashed, so the disk always has a read to do. A
// cold 4 GiB re-scan of a loop device: 2.59-3.13 s, median 2.84, against 2.67-3.31 s, median
// 3.17, reading each block when it is hashed (8 alternated pairs; dd iflag=direct 2.2 s, fio
// 1.65-1.84 GB/s at any queue depth). Reading the next job's first block as well made no
// difference (4 pairs).
function readsDirect(m) {
  return m.path !== undefined && m.direct && !noDirect.has(m.path);
}
async function hashDirect(m, n, out, crcs) {
  openVolume(m.path, true);
  const read = (i) => {
    const buf = alignedStage(blockView(m, i).length, i & 1);
    const p = readAsync(buf, positionOf(m, i)).then(() => buf);
    p.catch(() => undefined); // awaited in turn: not unhandled meanwhile
    return p;
  };
  let next = read(0);
  for (let i = 0; i < n; i++) {
    const s = await next;
    if (i + 1 < n) next = read(i + 1);
    hashBlock(m, i, s, blockView(m, i), out, crcs);
  }
}
async function handle(m) {
  if (m.release) return m.path === undefined || m.path === fdPath ? release() : undefined;
  const n = Math.ceil(m.length / m.blockSize);
  const out = Buffer.alloc(n * ${HASH_LENGTH});
  // The pack record's CRC of each block that may be stored (not zero, not as in the parent),
  // computed here while the block is in the core's cache: the store would read it from memory
  // again for that (a fifth of a first scan's main thread).
  const crcs = m.crcs ? Buffer.alloc(n * 4) : undefined;
  let direct = false;
  try {
    if (readsDirect(m)) {
      try {
        await hashDirect(m, n, out, crcs);
        direct = true;
      } catch (e) {
        if (e.code !== 'EINVAL') throw e;
        noDirect.add(m.path); // the volume takes no direct reads: this job and the next read through the cache
      }
    }
    if (!direct) hashBuffered(m, n, out, crcs);
    parentPort.postMessage({ id: m.id, hashes: out, crcs, direct });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String(e && e.message || e), code: e && e.code, short: e && e.short });
  }
}
// One job at a time, in order (a direct one awaits its reads). handle answers every job, its
// failures included; the catch only keeps one that threw anyway from stopping the jobs after it.
let queue = Promise.resolve();
parentPort.on('message', (m) => {
  queue = queue.then(() => handle(m)).catch(() => undefined);
});
process.on('exit', release);
`;

/** What a worker answers for a range: 32 bytes per block, and the pack record's CRC-32 (u32 BE) of each block it hashed that may be stored. */
export interface Hashed {
  readonly hashes: Buffer;
  /** With `crcs` asked, 4 bytes per block: set for every block not all zeros and, with `expect`, not equal to it; else 0. */
  readonly crcs?: Buffer;
  /** The worker read the range with O_DIRECT (`read.direct` asked, and the volume took it). */
  readonly direct?: boolean;
}

interface Pending {
  resolve(b: Hashed): void;
  reject(e: Error): void;
}

interface Slot {
  readonly worker: Worker;
  outstanding: number;
}

export class HashPool {
  private readonly slots: Slot[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failure: Error | undefined;

  /**
   * @param sab the shared buffer blocks are read into
   * @param opts.threads number of workers; default one per core the process may use
   */
  constructor(readonly sab: SharedArrayBuffer, opts: { threads?: number } = {}) {
    const threads = opts.threads ?? availableParallelism();
    for (let i = 0; i < Math.max(1, threads); i++) {
      // execArgv [] : the worker is plain JavaScript, so loaders the parent runs under (tsx in
      // tests) need not start again in every worker, which cost ~0.3 s per scan.
      const worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [], workerData: { sab, modulePath: BLAKE3_MODULE_PATH, crcModulePath: CRC32_MODULE_PATH, recordHeader: recordHeader(ZERO_HASH, CODEC_RAW, 0) } });
      const slot: Slot = { worker, outstanding: 0 };
      worker.on('message', (m: { id: number; hashes?: Uint8Array; crcs?: Uint8Array; direct?: boolean; error?: string; code?: string; short?: number }) => {
        slot.outstanding--;
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.short !== undefined) {
          p.reject(new TandemError('ERR_VOLUME_UNREADABLE', `the volume ended at byte ${m.short}, before its size; it shrank during the snapshot, retry`, { details: { offset: m.short } }));
        } else if (m.code !== undefined) {
          p.reject(fromSystemError(Object.assign(new Error(m.error), { code: m.code }), 'reading the volume'));
        } else if (m.error !== undefined || !m.hashes) p.reject(new TandemError('ERR_INTERNAL', `a hash worker failed: ${m.error}`));
        else {
          const hashes = Buffer.from(m.hashes.buffer, m.hashes.byteOffset, m.hashes.byteLength);
          p.resolve({ hashes, ...(m.crcs ? { crcs: Buffer.from(m.crcs.buffer, m.crcs.byteOffset, m.crcs.byteLength) } : {}), ...(m.direct ? { direct: true } : {}) });
        }
      });
      worker.on('error', (e) => this.fail(e));
      worker.on('exit', (code) => {
        if (code !== 0 && !this.closing) this.fail(new Error(`hash worker exited with code ${code}`));
      });
      this.slots.push(slot);
    }
  }

  private closing = false;

  private fail(e: Error): void {
    this.failure ??= new TandemError('ERR_INTERNAL', `a hash worker failed: ${e.message}`, { cause: e });
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  /**
   * Hashes of the blocks in sab[offset, offset+length), 32 bytes each (ZERO_HASH for zeros), and
   * with `crcs` (a scan, which stores new blocks) the CRC-32 of each one's pack record (see
   * {@link Hashed}). With `read`, the worker first reads those bytes from `read.path` at `read.position`, or,
   * with `read.positions`, block i of the range from `read.positions[i]`. With `read.expect` (32
   * bytes per block: the hashes the blocks had in the parent snapshot), only blocks whose hash
   * differs are left in the shared buffer; the others' bytes there are undefined. With
   * `read.direct` the worker reads with O_DIRECT (page-aligned offsets and lengths: blocks of a
   * device), through the page cache if the volume refuses it; the answer says which (`direct`).
   */
  hash(offset: number, length: number, blockSize: number, read?: { path: string; position: number; positions?: readonly number[]; expect?: Uint8Array; direct?: boolean }, crcs = false): Promise<Hashed> {
    if (this.failure) return Promise.reject(this.failure);
    const slot = this.slots.reduce((a, b) => (b.outstanding < a.outstanding ? b : a));
    const id = this.nextId++;
    slot.outstanding++;
    return new Promise<Hashed>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      slot.worker.postMessage({ id, offset, length, blockSize, path: read?.path, position: read?.position, positions: read?.positions, expect: read?.expect, direct: read?.direct === true, crcs });
    });
  }

  /** Worker threads hashing for this pool. */
  get threads(): number {
    return this.slots.length;
  }

  /**
   * Each worker closes its descriptor of the volume at `path` once the jobs it was given before
   * are done (a scan sharing the pool ended: its volume is not kept open while another scan goes
   * on). A later job of that volume opens it again.
   */
  closeVolume(path: string): void {
    for (const s of this.slots) s.worker.postMessage({ release: true, path });
  }

  /** Workers keep the process alive only while the pool is in use. */
  setActive(active: boolean): void {
    for (const s of this.slots) {
      if (active) s.worker.ref();
      else {
        s.worker.postMessage({ release: true }); // close the volume's descriptor
        s.worker.unref();
      }
    }
  }

  get failed(): boolean {
    return this.failure !== undefined;
  }

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}

/**
 * A pool started by {@link prestartHashPool} before the store that will use it was open: the
 * first {@link HashPools.borrow} of its size takes it.
 */
let early: HashPool | null = null;

/**
 * Start the hash workers of a scan this process is about to run, before its store is open: their
 * threads start Node and load the native hashes (40-47 ms here) while the calling thread loads
 * the store's modules and opens its index, instead of after. For a one-shot command
 * (`appliance snapshot`, a sync that rescans); a process that lives on keeps a pool warm
 * (HashPools.keepWarm). Unused, the pool keeps nothing alive and ends with the process.
 */
export function prestartHashPool(bytes: number): void {
  if (early !== null) return;
  early = new HashPool(new SharedArrayBuffer(bytes));
  early.setActive(false);
}

/**
 * Idle pools kept for the next scan: starting workers costs 50-300 ms, which would dominate a
 * small or incremental snapshot. An idle pool is terminated after {@link POOL_IDLE_MS}, so a
 * long-running daemon does not hold the buffers and threads between scheduled snapshots.
 */
const POOL_IDLE_MS = 30_000;

/** At most this many idle pools are kept (scans share one, {@link HashPools.share}; a restore borrows its own). */
const MAX_IDLE_POOLS = 2;

/**
 * The slots of a buffer a scan reads its chunks into: slot i is its own from {@link take} until
 * {@link give}.
 */
export interface Slots {
  /** A free slot's index, or undefined when none may be taken now ({@link onFree} tells when one may). */
  take(): number | undefined;
  /** `n` slots at once, or null (none taken) when that many may not be taken now. */
  takeAll(n: number): number[] | null;
  give(slot: number): void;
  /** Called when a slot may be taken after {@link take} returned undefined: another scan gave one back or ended. */
  onFree: (() => void) | null;
}

/**
 * A scan's part of the pool that the scans running in the process share ({@link HashPools.share}):
 * the pool's workers hash its chunks, read into the slots it takes. While n scans share the pool
 * each may hold floor(slots / n) slots (at least one): a scan alone takes them all, as it did with
 * a pool of its own, and one that joins gets its share as the others give slots back, each once
 * the chunk in it is stored (they take no more than their new share). Not for use after {@link end}.
 */
export interface PoolShare extends Slots {
  readonly pool: HashPool;
  /**
   * Leave the pool: every slot still held is given back, and the workers close the scan's
   * volume (`path`). For when nothing reads or writes the scan's slots any more (a scan that
   * failed or was aborted first waits for its chunks in flight: workers write into their slots).
   * The last scan to leave gives the pool back for the next ({@link HashPools.giveBack}).
   * Idempotent.
   */
  end(path?: string): Promise<void>;
}

/** One pool shared by the scans running now (a {@link PoolShare} each), with its free slots. */
class SharedPool {
  private readonly free: number[];
  private readonly members: Member[] = [];

  constructor(
    readonly pool: HashPool,
    private readonly slots: number,
    private readonly left: (s: SharedPool) => Promise<void>,
  ) {
    // Lowest slot first: a scan alone uses the slots in the order a pool of its own did.
    this.free = Array.from({ length: slots }, (_, i) => slots - 1 - i);
  }

  get scans(): number {
    return this.members.length;
  }

  /** What each scan may hold now. */
  private get quota(): number {
    return Math.max(1, Math.floor(this.slots / Math.max(1, this.members.length)));
  }

  join(): PoolShare {
    const m = new Member(this);
    this.members.push(m);
    return m;
  }

  take(m: Member, n: number): number[] | null {
    if (this.free.length < n || m.held + n > this.quota) return null;
    return this.free.splice(this.free.length - n, n).reverse();
  }

  give(m: Member, slot: number): void {
    this.free.push(slot);
    this.wake(m);
  }

  /** Members below their share are told of free slots, in the order they joined; not `from`, which gave one back and takes what it may itself next. */
  private wake(from: Member | null): void {
    for (const m of this.members) {
      if (this.free.length === 0) return;
      if (m !== from && m.held < this.quota) m.onFree?.();
    }
  }

  async leave(m: Member, slots: number[], path: string | undefined): Promise<void> {
    const i = this.members.indexOf(m);
    if (i < 0) return;
    this.members.splice(i, 1);
    this.free.push(...slots);
    if (this.members.length === 0) return this.left(this);
    if (path !== undefined) this.pool.closeVolume(path);
    this.wake(null);
  }
}

class Member implements PoolShare {
  onFree: (() => void) | null = null;
  /** Slots taken and not given back. */
  private readonly mine = new Set<number>();
  private ended = false;

  constructor(private readonly shared: SharedPool) {}

  get held(): number {
    return this.mine.size;
  }

  get pool(): HashPool {
    return this.shared.pool;
  }

  take(): number | undefined {
    return this.takeAll(1)?.[0];
  }

  takeAll(n: number): number[] | null {
    if (this.ended) return null;
    const got = this.shared.take(this, n);
    for (const s of got ?? []) this.mine.add(s);
    return got;
  }

  give(slot: number): void {
    if (this.ended || !this.mine.delete(slot)) return;
    this.shared.give(this, slot);
  }

  async end(path?: string): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    this.onFree = null;
    const slots = [...this.mine];
    this.mine.clear();
    await this.shared.leave(this, slots, path);
  }
}

export class HashPools {
  private readonly idle: Array<{ pool: HashPool; timer: NodeJS.Timeout | null }> = [];
  private closed = false;
  /** Keep one idle pool without a time limit ({@link keepWarm}). */
  private warm = false;
  /** Pools lent by {@link borrow} so far (started or idle). */
  lent = 0;
  /** Pools lent and not given back yet: one shared by the scans running now, restores' own. */
  inUse = 0;
  /** The pool scans share now, by the size of its buffer. */
  private readonly shared = new Map<number, SharedPool>();

  /** @param idleMs how long an idle pool is kept ({@link POOL_IDLE_MS}) */
  constructor(private readonly idleMs = POOL_IDLE_MS) {}

  /**
   * Keep one idle pool for as long as the store is open, for a process that lives on (`serve`,
   * `daemon`): its scheduled snapshots come minutes apart, and each found the pool gone. A warm
   * re-snapshot of 4 GiB in a running appliance, 31 s after the one before (6 each, two builds
   * alternated): 1.43-1.74 s, median 1.51, with the pool kept; 1.52-1.76 s, median 1.61, without.
   * The pool holds its shared buffer (48 MiB for a scan) and two threads, which every scan needs
   * at its peak anyway.
   */
  keepWarm(): void {
    this.warm = true;
  }

  /** Whether {@link keepWarm} was called. */
  get keptWarm(): boolean {
    return this.warm;
  }

  /** Whether {@link borrow} of `bytes` would get a started pool rather than start one. */
  hasIdle(bytes: number): boolean {
    return this.idle.some((e) => e.pool.sab.byteLength === bytes) || early?.sab.byteLength === bytes;
  }

  /** Whether {@link share} of `bytes` would get started workers: scans share such a pool now, or one is idle. */
  hasStarted(bytes: number): boolean {
    return this.hasIdle(bytes) || this.shared.has(bytes);
  }

  /** Scans sharing a pool now. */
  get scans(): number {
    let n = 0;
    for (const s of this.shared.values()) n += s.scans;
    return n;
  }

  /**
   * A share of the pool whose buffer has `bytes` bytes in `slots` slots, which every scan
   * running in the process with that layout shares ({@link PoolShare}): one set of workers (one
   * per core) and one buffer, however many scans run at once. The first scan borrows it
   * ({@link borrow}: an idle one, or a new one), the last gives it back. Two 512 MiB volumes
   * replicated at once by a daemon held a pool each (the second had 2 slots, 16 MiB, and one
   * worker of its own): bench/daemon-rss.ts.
   */
  share(bytes: number, slots: number): PoolShare {
    let s = this.shared.get(bytes);
    // A pool whose worker failed fails the scans on it; the next scan gets a new one (the failed
    // one is ended once its scans have left it).
    if (s === undefined || s.pool.failed) {
      s = new SharedPool(this.borrow(bytes), slots, async (done) => {
        if (this.shared.get(bytes) === done) this.shared.delete(bytes);
        await this.giveBack(done.pool);
      });
      this.shared.set(bytes, s);
    }
    return s.join();
  }

  /** A pool whose shared buffer has exactly `bytes` bytes, for the caller's exclusive use (a restore; scans {@link share} one). */
  borrow(bytes: number): HashPool {
    const i = this.idle.findIndex((e) => e.pool.sab.byteLength === bytes);
    let pool: HashPool;
    if (early?.failed) {
      void early.close();
      early = null;
    }
    if (early !== null && early.sab.byteLength === bytes) {
      pool = early;
      early = null;
    } else if (i >= 0) {
      const [e] = this.idle.splice(i, 1);
      if (e!.timer) clearTimeout(e!.timer);
      pool = e!.pool;
    } else {
      pool = new HashPool(new SharedArrayBuffer(bytes));
    }
    pool.setActive(true);
    this.lent++;
    this.inUse++;
    return pool;
  }

  /** Give a pool back (a failed one is terminated). */
  async giveBack(pool: HashPool): Promise<void> {
    this.inUse--;
    if (this.closed || pool.failed || this.idle.length >= MAX_IDLE_POOLS) return pool.close();
    pool.setActive(false);
    if (this.warm && !this.idle.some((e) => e.timer === null)) {
      this.idle.push({ pool, timer: null });
      return;
    }
    const timer = setTimeout(() => {
      const i = this.idle.findIndex((e) => e.pool === pool);
      if (i >= 0) this.idle.splice(i, 1);
      void pool.close();
    }, this.idleMs);
    timer.unref();
    this.idle.push({ pool, timer });
  }

  async close(): Promise<void> {
    this.closed = true;
    const all = this.idle.splice(0);
    for (const e of all) if (e.timer) clearTimeout(e.timer);
    await Promise.all(all.map((e) => e.pool.close()));
  }
}
