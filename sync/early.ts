/**
 * Early sending: stream blocks to the target while the snapshot that contains them is still
 * being scanned, so that the scan and the transfer overlap instead of running one after the
 * other (sync/README.md, "Early blocks").
 *
 * The scan tells {@link EarlySender.add} the hashes of blocks new to the local store; a few
 * long-lived block streams ask the target which of each batch it lacks and send those. This is
 * only an optimization: nothing depends on it for correctness. The engine runs afterwards as
 * always and finds these blocks present (one hasBlocks answer), so nothing is sent twice. A
 * block the target stores early is unreferenced until the snapshot commits; a target gc in
 * between may drop it, and the engine then sends it again.
 *
 * When the scan has read everything ({@link EarlySender.scanned}), a batch not yet full goes at
 * once. When the snapshot is taken and the peer's lease held ({@link EarlySender.finish}), a
 * tail of at most {@link TAIL_BLOCKS} blocks still to send is sent before the engine starts (an
 * incremental sync's last blocks: the engine would otherwise ask and send them again, a few
 * round trips more); a longer one is cut after the frame in flight and left to the engine, which
 * sends it under the peer's lease and shows it as transfer progress. (Blocks need no lease: they are
 * content-addressed and change nothing until a snapshot that references them commits.)
 *
 * Failures never fail the sync by themselves: the first error stops early sending (it is kept
 * for the trace, and told to `onFailure`: a sync stops when the peer refused it outright) and
 * the engine sends whatever is left. Memory is bounded: past {@link MAX_QUEUED} queued
 * hashes, early sending stops and leaves the rest to the engine.
 */
import { TandemError } from '../common/errors.js';
import type { BlockFrame, Hash, HeldBlocks, ReplicaStore } from '../store/types.js';
import { DeltaSizes, frameBlockLength } from './protocol.js';
import { alignedBuffers } from '../common/io-buffers.js';
import { trace } from './trace.js';

/** Hashes per target question and per read batch at most: 64 blocks of 512 KiB are 32 MiB of data. */
const BATCH = 64;
/**
 * A batch goes as soon as this many hashes wait (a scan chunk: 16 blocks of 512 KiB, 8 MiB of
 * data, against one question's round trip), so the transfer starts with the scan's first chunk
 * rather than its fourth; behind a transfer that lags the scan, batches are full anyway.
 */
const MIN_BATCH = 16;
/** A smaller batch goes anyway once its first hash has waited this long. */
const LINGER_MS = 100;
/** Parallel block streams (as the engine's: both sides' cores stay busy). */
const STREAMS = 2;
/** Hashes waiting at most (~1.5 MiB with the objects around them); beyond, the engine sends the rest. */
const MAX_QUEUED = 16384;
/** At the end of the scan, this many blocks still to send are sent early rather than by the engine (32 MiB of 512 KiB blocks). */
const TAIL_BLOCKS = 64;
/**
 * Copies of new blocks' bytes kept for sending (see {@link Held}), at most: 64 blocks of 512 KiB,
 * two scan chunks in the queue and the blocks of both streams in flight.
 */
const LEND_BYTES = 32 * 1024 * 1024;
/**
 * How long the scan waits for a copy buffer to come back before early sending stops copying
 * (and reads the rest back from the packs, as without copies): a block stream that keeps up
 * frees a chunk's worth (8 MiB) in tens of milliseconds on a LAN. A link slower than ~30 MB/s
 * lets the scan run ahead at once, rather than pacing it (and the snapshot of a live volume)
 * to the link.
 */
const LEND_WAIT_MS = 250;
/**
 * Copies are made only while the peer answers questions quickly: the fastest of its first
 * {@link ASK_SAMPLES} hasBlocks answers is under this. Over a long round trip the copies a batch
 * holds while its question travels keep the bounded pool (and with it the scan) waiting, and the
 * pool rather than the link bounds the transfer: a 1 GiB first sync through 50 ms each way at
 * 400 MB/s took 4.62-4.79 s with copies (answers in 55-190 ms, 88 questions of 23 blocks on
 * average) against 4.30-4.42 s without (3 runs each); through 1 Gbit/s, 9.26 s against 9.50 s.
 * On loopback a receiver busy storing a first sync answers in 7-48 ms (the fastest of the first
 * four: 13-17 ms).
 */
const COPY_MAX_ASK_MS = 40;
const ASK_SAMPLES = 4;
/**
 * Blocks smaller than this are not copied: a copy's buffer is reused once its frame is released,
 * and a peer's block upload releases a payload when the socket has taken it only for payloads
 * above the socket's high-water mark (api/client.ts `releasing`; 16 KiB, 64 KiB from Node 22).
 * A smaller one may still wait in the socket's queue: its buffer, copied over by the next block,
 * went out damaged (the peer refused it). As for pooled reads (store/pack-files.ts).
 */
const COPY_MIN_BYTES = 256 * 1024;
/** Hashes kept in {@link EarlySender.atTarget}: 64 Ki (~8 MiB), the new blocks of a 32 GiB change. */
const AT_TARGET_MAX = 65536;
/**
 * Bytes of patches kept (see {@link Held}), at most: ~1,800 blocks changed by a 4 KiB write each.
 * Past that a block's delta is read back or made again, as without them.
 */
const PATCH_BYTES = 8 * 1024 * 1024;

/**
 * The new blocks' bytes early sending holds, for Store.getBlocks to hand out instead of reading
 * them back from the packs (sync/README.md, "Early blocks"). Two kinds:
 * - *views* of the scan's own buffer, which the scan leaves alone until {@link EarlySender.done}
 *   (a change list that fits its buffers): read as often as asked;
 * - *copies*, into buffers of a bounded pool, of blocks whose place in the scan's buffer is read
 *   into again once {@link EarlySender.add} returns (a full scan). A copy is handed out once, and
 *   its buffer goes back to the pool when the consumer releases the frame (the socket has taken
 *   the bytes, or a delta of them was made); one never released is simply collected. While the
 *   pool is empty the scan waits (up to {@link LEND_WAIT_MS}): the scan then runs at the pace of
 *   the transfer, and every block it stores travels from memory, once read.
 */
class Held implements HeldBlocks {
  private readonly views = new Map<string, Buffer>();
  private readonly copies = new Map<string, { data: Buffer; lent: Lent }>();
  /** The scan's patches of a block against the one it replaced (onNewBlocks' `patches`), {@link PATCH_BYTES} at most. */
  private readonly patches = new Map<string, { base: Hash; patches: Buffer; length: number }>();
  private patchBytes = 0;
  /** The bytes of copy buffers handed out or holding a copy (they come from and go back to the process's alignedBuffers). */
  private out = 0;
  private waiters: Array<() => void> = [];

  has(key: string): boolean {
    return this.views.has(key) || this.copies.has(key);
  }

  take(key: string): { data: Buffer; release?: () => void } | undefined {
    const view = this.views.get(key);
    if (view) return { data: view };
    const c = this.copies.get(key);
    if (!c) return undefined;
    this.copies.delete(key);
    let released = false;
    return {
      data: c.data,
      release: () => {
        if (released) return;
        released = true;
        this.giveBack(c.lent);
      },
    };
  }

  view(key: string, data: Buffer): void {
    this.views.set(key, data);
  }

  /** Keep the patches that make block `key` (`length` bytes) of block `base`, while there is room. */
  keepPatches(key: string, base: Hash, patches: Buffer, length: number): void {
    if (this.patchBytes + patches.length > PATCH_BYTES || this.patches.has(key)) return;
    this.patches.set(key, { base, patches, length });
    this.patchBytes += patches.length;
  }

  hasPatches(key: string, base: Hash): boolean {
    return this.patches.get(key)?.base.equals(base) === true;
  }

  takePatches(key: string, base: Hash): { patches: Buffer; length: number } | undefined {
    const p = this.patches.get(key);
    if (!p || !p.base.equals(base)) return undefined;
    this.dropPatches(key);
    return p;
  }

  private dropPatches(key: string): void {
    const p = this.patches.get(key);
    if (!p) return;
    this.patches.delete(key);
    this.patchBytes -= p.patches.length;
  }

  /**
   * Copy `data` for `key`, waiting up to `waitMs` for a buffer while the pool is empty. False
   * when none came back in that time (nothing is copied).
   */
  async copy(key: string, data: Buffer, waitMs: number): Promise<boolean> {
    const deadline = performance.now() + waitMs;
    for (;;) {
      const lent = this.buffer(data.length + 8);
      if (lent) {
        // At the source's offset modulo 8: V8 copies out of a SharedArrayBuffer (the scan's) word
        // by word only between equally aligned addresses, else byte by byte (4x the CPU here).
        const at = data.byteOffset % 8;
        const copy = lent.buf.subarray(at, at + data.length);
        data.copy(copy);
        this.copies.set(key, { data: copy, lent });
        return true;
      }
      const left = deadline - performance.now();
      if (left <= 0) return false;
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
    }
  }

  /** Drop the copy held for `key`, if it was not handed out: its buffer goes back to the pool. */
  drop(key: string): void {
    this.dropPatches(key);
    const c = this.copies.get(key);
    if (!c) return;
    this.copies.delete(key);
    this.giveBack(c.lent);
  }

  /** Drop everything not handed out (early sending is over or stopped): their buffers go back to the process's pool, for the engine's reads. */
  clear(): void {
    for (const key of [...this.copies.keys()]) this.drop(key);
    this.views.clear();
    this.patches.clear();
    this.patchBytes = 0;
  }

  /**
   * A buffer of `n` bytes while at most LEND_BYTES are out: from the process's pool of aligned
   * buffers (common/io-buffers.ts), which the store's direct reads share, so those the copies
   * leave when early sending ends serve the engine's reads.
   */
  private buffer(n: number): Lent | undefined {
    if (this.out + n > LEND_BYTES) return undefined;
    this.out += n;
    return { ...alignedBuffers.take(n), n };
  }

  private giveBack(lent: Lent): void {
    this.out -= lent.n;
    lent.release();
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}

/** A copy buffer lent by the process's pool: `n` bytes counted against LEND_BYTES. */
interface Lent {
  readonly buf: Buffer;
  readonly release: () => void;
  readonly n: number;
}

/** Hashes asked about and sent together, read from the packs one way (`direct`: O_DIRECT). */
interface Batch {
  readonly hashes: Hash[];
  /** For each hash, the block it replaced (the parent snapshot's at its position), when known: a peer that holds it gets a delta. */
  readonly bases: Array<Hash | null>;
  readonly direct: boolean;
}

/**
 * The early sender whose scan may copy new blocks ({@link Held}): one per process at a time, so
 * that a daemon running two jobs at once holds one pool of copies ({@link LEND_BYTES}), not one
 * per push. The other reads its blocks back from the packs, as a group's next volume does
 * ({@link EarlySender.stopCopying}). Two 512 MiB volumes replicated at once by a daemon peaked at
 * 395 MB of RSS with a pool each (stop 44, with the hash pools' slots, store/hash-pool.ts).
 */
let copyPoolHolder: EarlySender | null = null;

export class EarlySender {
  /** Blocks and uncompressed bytes sent so far. */
  blocks = 0;
  bytes = 0;
  /** The first failure, if early sending stopped because of one. */
  failure: unknown = null;
  private readonly queue: Hash[] = [];
  /** The base of each queued hash (null: none known). */
  private readonly queueBases: Array<Hash | null> = [];
  /** When the oldest queued hash was queued (or the last batch was taken). */
  private since = performance.now();
  private waiters: Array<() => void> = [];
  private stopped = false;
  /** The scan has read everything: no batch waits to fill. */
  private inputDone = false;
  /** Hashes taken in batches and not yet sent or found present at the target. */
  private taken = 0;
  /** Hashes added in all, and the count added before the first written directly (O_DIRECT), if any. */
  private added = 0;
  private directFrom = Infinity;
  private readonly streams: Promise<void>[] = [];
  /** New blocks' bytes from the scan, by the hash's latin1 string: sent from there, not read back from the packs. */
  private readonly held = new Held();
  /** Copies are made (until a wait for a copy buffer times out). */
  private copying = true;
  /**
   * Blocks the target is known to hold, by the hash's latin1 string: those it said it had, and
   * those it stored (its blocks/put answered, needWhole aside). The engine does not ask about
   * them again (sync/engine.ts CopyOptions.atTarget). At most {@link AT_TARGET_MAX} are kept: it
   * asks about the others, as it would about any.
   */
  readonly atTarget = new Set<string>();
  private ended!: () => void;
  /** Settles once early sending is over ({@link finish}) and reads none of the bytes the scan lent it any more. */
  readonly done = new Promise<void>((resolve) => (this.ended = resolve));

  constructor(
    private readonly source: ReplicaStore,
    private readonly target: ReplicaStore,
    /** Called after each block frame handed to the target (progress of the tail, say). */
    private readonly onSent?: () => void,
    /** Told the failure that stopped early sending (the sync may stop on it: appliance/replicate.ts). */
    private readonly onFailure?: (e: unknown) => void,
  ) {}

  /** Blocks queued or taken and not yet sent (nor found at the target). */
  get pending(): number {
    return this.queue.length + this.taken;
  }

  /**
   * Queue new blocks' hashes; starts the streams on the first call. `direct`: the store wrote
   * them past the page cache, so they are read that way (a scan writes all its new blocks
   * directly, store/scan.ts; a batch is read one way, and once direct, always direct).
   * `views`: their bytes in the scan's buffer, there until {@link done} settles when `kept`, else
   * only until the promise returned settles (copied meanwhile, see {@link Held}).
   */
  add(hashes: readonly Hash[], direct = false, bases?: ReadonlyArray<Hash | null>, views?: readonly Buffer[], kept = false, patches?: ReadonlyArray<Buffer | undefined>): void | Promise<void> {
    if (this.stopped) return;
    if (views && kept) hashes.forEach((h, i) => this.held.view(h.toString('latin1'), views[i]!));
    // A block the scan diffed against the one it replaced goes as those patches to a peer that
    // holds that one: nothing is read back from the packs for it.
    if (views && patches && bases) {
      hashes.forEach((h, i) => {
        const p = patches[i];
        const b = bases[i];
        if (p && b) this.held.keepPatches(h.toString('latin1'), b, p, views[i]!.length);
      });
    }
    if (!views || kept || !this.copying || this.target.releasesFrames === false || views[0]!.length < COPY_MIN_BYTES) return this.enqueue(hashes, direct, bases);
    return this.copyAndEnqueue(hashes, direct, bases, views);
  }

  /** Each block copied (waiting for a buffer while the streams send: the scan's pace), then queued. */
  private async copyAndEnqueue(hashes: readonly Hash[], direct: boolean, bases: ReadonlyArray<Hash | null> | undefined, views: readonly Buffer[]): Promise<void> {
    if (this.copying && !this.holdsCopyPool()) {
      this.copying = false;
      trace('early: another sync holds the pool of copies; the blocks are read back from the packs');
    }
    for (let i = 0; i < hashes.length; i++) {
      if (this.stopped) return;
      const key = hashes[i]!.toString('latin1');
      if (this.copying && views[i]!.length >= COPY_MIN_BYTES && !(await this.held.copy(key, views[i]!, LEND_WAIT_MS))) {
        this.copying = false;
        trace(`early: no copy buffer came back in ${LEND_WAIT_MS} ms; the rest is read back from the packs`);
      }
      if (this.stopped) return this.held.drop(key);
      this.enqueue(hashes.slice(i, i + 1), direct, bases?.slice(i, i + 1));
    }
  }

  private enqueue(hashes: readonly Hash[], direct: boolean, bases: ReadonlyArray<Hash | null> | undefined): void {
    if (this.stopped) return;
    if (this.queue.length + hashes.length > MAX_QUEUED) {
      trace(`early: over ${MAX_QUEUED} hashes queued; the engine sends the rest`);
      this.stop();
      return;
    }
    if (this.queue.length === 0) this.since = performance.now();
    if (direct && this.directFrom === Infinity) this.directFrom = this.added;
    this.added += hashes.length; // so added - queue.length hashes have been taken in batches
    this.queue.push(...hashes);
    for (let i = 0; i < hashes.length; i++) this.queueBases.push(bases?.[i] ?? null);
    if (this.streams.length === 0) for (let i = 0; i < STREAMS; i++) this.streams.push(this.run());
    this.wake();
  }

  /**
   * Copy no more new blocks' bytes (those copied stay until sent): the blocks queued from now on
   * are read back from the packs. For a sender that goes on while another scan runs (a group's
   * next volume, scheduler/steps.ts), so that only one holds a pool of copies.
   */
  stopCopying(): void {
    if (!this.copying) return;
    this.copying = false;
    trace('early: no more copies (another scan goes on)');
  }

  /** Take the process's pool of copies ({@link copyPoolHolder}) if it is free (or its holder has ended); whether this sender holds it. */
  private holdsCopyPool(): boolean {
    if (copyPoolHolder === null || copyPoolHolder.stopped || copyPoolHolder.finishing !== null) copyPoolHolder = this;
    return copyPoolHolder === this;
  }

  /** The scan has read every block: what is queued goes without waiting for a full batch. */
  scanned(): void {
    this.inputDone = true;
    this.wake();
  }

  /**
   * The snapshot is taken (`ok`) or failed. A tail of at most {@link TAIL_BLOCKS} blocks still to
   * send is sent; a longer one, or any after a failure, is left to the engine: the streams end
   * after the frame they are sending. Resolves when they have ended (never rejects). Called
   * again, it only waits for the first call's end.
   */
  finish(ok = true): Promise<void> {
    this.finishing ??= this.finishOnce(ok);
    return this.finishing;
  }

  /** The first {@link finish}: a later call only waits for it. */
  private finishing: Promise<void> | null = null;

  private async finishOnce(ok: boolean): Promise<void> {
    if (ok && this.pending <= TAIL_BLOCKS) this.scanned();
    else this.stop(ok ? undefined : 'the snapshot failed');
    await Promise.all(this.streams);
    this.held.clear();
    if (copyPoolHolder === this) copyPoolHolder = null;
    this.ended();
    trace(`early: ${this.blocks} blocks sent during the scan${this.failure ? ` (stopped: ${String((this.failure as Error)?.message ?? this.failure)})` : ''}`);
  }

  private noteAtTarget(key: string): void {
    if (this.atTarget.size < AT_TARGET_MAX) this.atTarget.add(key);
  }

  /** The fastest hasBlocks answer so far, and how many there were. */
  private fastestAsk = Infinity;
  private asks = 0;

  /** Slow answers stop the copying (see {@link COPY_MAX_ASK_MS}): the scan then runs ahead. */
  private noteAsk(ms: number): void {
    this.fastestAsk = Math.min(this.fastestAsk, ms);
    if (++this.asks === ASK_SAMPLES && this.copying && this.fastestAsk > COPY_MAX_ASK_MS) {
      this.copying = false;
      trace(`early: the peer answers in ${this.fastestAsk.toFixed(0)} ms at best; no more copies (the scan runs ahead)`);
    }
  }

  /**
   * Aborted at the first failure (or a failed scan): the other streams' requests are dropped at
   * once instead of ending after the frame they send, which under a low bandwidth cap took them
   * tens of seconds.
   */
  private readonly halt = new AbortController();

  private fail(e: unknown): void {
    this.failure ??= e;
    this.stop('another of its streams failed');
  }

  /** No more batches; with a reason (a failure), the requests under way are dropped too. */
  private stop(failed?: string): void {
    if (failed !== undefined && !this.halt.signal.aborted) this.halt.abort(new TandemError('ERR_INTERRUPTED', `early sending stopped: ${failed}`));
    this.stopped = true;
    this.queue.length = 0;
    this.queueBases.length = 0;
    this.held.clear(); // what was handed out is released by its consumer
    this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /**
   * The next batch of hashes, or null once stopped (the scan is over, or a failure). A batch has
   * {@link MIN_BATCH} hashes or more, or has lingered {@link LINGER_MS}: a few new blocks spread
   * over a long scan go in a handful of questions, not one each.
   */
  private async next(): Promise<Batch | null> {
    for (;;) {
      if (this.stopped) return null;
      const waited = performance.now() - this.since;
      if (this.queue.length >= MIN_BATCH || (this.queue.length > 0 && (waited >= LINGER_MS || this.inputDone))) {
        // A batch is read one way: it ends where the directly written blocks begin.
        const takenBefore = this.added - this.queue.length;
        const direct = takenBefore >= this.directFrom;
        const n = direct ? BATCH : Math.min(BATCH, this.directFrom - takenBefore);
        const batch = this.queue.splice(0, n);
        const bases = this.queueBases.splice(0, n);
        this.taken += batch.length;
        this.since = performance.now();
        return { hashes: batch, bases, direct };
      }
      if (this.inputDone) return null;
      await new Promise<void>((r) => {
        this.waiters.push(r);
        if (this.queue.length > 0) setTimeout(r, LINGER_MS - waited);
      });
    }
  }

  private async run(): Promise<void> {
    const self = this;
    const deltaSizes = new DeltaSizes();
    /** Hashes of the frames handed to this stream's request (while the set has room): stored once it is answered. */
    const sent: Hash[] = [];
    async function* frames(first: Batch): AsyncGenerator<BlockFrame> {
      for (let batch: Batch | null = first; batch; batch = await self.next()) {
        const asked = performance.now();
        const present = await self.target.hasBlocks(batch.hashes);
        self.noteAsk(performance.now() - asked);
        const lacking: Hash[] = [];
        batch.hashes.forEach((h, i) => {
          if (!present[i]) {
            lacking.push(h);
            return;
          }
          const key = h.toString('latin1');
          self.held.drop(key); // its copy is not needed
          self.noteAtTarget(key);
        });
        self.taken -= batch.hashes.length - lacking.length;
        if (lacking.length === 0) continue;
        // A peer that takes deltas gets each block as the bytes that differ from the one it
        // replaced, where it holds that one (else it names the block in needWhole and the engine
        // sends it whole).
        const bases = self.target.deltas === true ? batch.bases.filter((_, i) => !present[i]) : [];
        const opts = { consumerVerifies: true, direct: batch.direct, held: self.held, signal: self.halt.signal, ...(bases.some((b) => b) ? { bases, storedDeltas: true } : {}) };
        for await (const f of self.source.getBlocks(lacking, opts)) { // the target verifies each
          if (self.stopped) return;
          self.taken--;
          self.blocks++;
          const length = frameBlockLength(f);
          self.bytes += length;
          deltaSizes.note(f, length);
          if (self.atTarget.size + sent.length < AT_TARGET_MAX) sent.push(f.hash); // bounded, as the set
          yield f;
          self.onSent?.();
        }
      }
    }
    try {
      // Wait for the first batch before opening the request: a sync with nothing new sends nothing.
      const first = await this.next();
      if (!first) return;
      const r = await this.target.putBlocks(frames(first), { signal: this.halt.signal });
      // Blocks the receiver could not build (it lacks their bases) are not stored: the engine finds
      // them lacking and sends them. They count as sent once, there.
      const whole = new Set<string>();
      for (const h of r.needWhole ?? []) {
        this.blocks--;
        this.bytes -= deltaSizes.sizeOf(h);
        whole.add(h.toString('latin1'));
      }
      for (const h of sent) {
        const key = h.toString('latin1');
        if (!whole.has(key)) this.noteAtTarget(key);
      }
    } catch (e) {
      const first = !this.halt.signal.aborted;
      this.fail(e);
      if (first) this.onFailure?.(e);
    }
  }
}
