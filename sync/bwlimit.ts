/**
 * `--bwlimit`: a token bucket over a byte stream. Wrap an upload body (push) or a download body
 * (pull) with {@link throttle}; TCP back-pressure then slows the other side down to the same rate.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { takeRelease } from './framing.js';

/** Pieces larger than this are cut so the rate stays smooth (no 512 KiB bursts on a slow link). */
const SLICE_BYTES = 64 * 1024;
/**
 * ...or larger than this many seconds of traffic at a high rate: a 512 KiB payload goes whole
 * (and its buffer back to the pool) from 32 MiB/s. Always below the bucket's burst.
 */
const SLICE_SECONDS = 1 / 64;
/** The bucket holds at most this many seconds of tokens: a short burst is fine, a long idle is not credit. */
const BURST_SECONDS = 0.25;

/** A cap in bytes a second (0: none), or a function giving the cap now (a schedule: appliance/config/bwlimit.ts). */
export type Rate = number | (() => number);
/** A rate given as a function is asked again this often: a running stream follows it within a second. */
const RATE_RECHECK_MS = 1000;

/**
 * A token bucket that several streams may share, so that parallel block streams to one peer
 * stay under one cap together. Its rate may change as it runs (a schedule); while it is 0 the
 * bucket lets everything through.
 */
export class TokenBucket {
  private readonly source: Rate;
  private rate: number;
  private checkedAt = -Infinity;
  /** Tokens held; a new bucket starts full (NaN until its first take knows the rate). */
  private tokens = Number.NaN;
  private last = performance.now();

  constructor(rate: Rate) {
    this.source = rate;
    this.rate = typeof rate === 'number' ? rate : 0;
  }

  /** The cap now, in bytes a second (0: none). */
  get bytesPerSecond(): number {
    return this.current(performance.now());
  }

  private current(now: number): number {
    if (typeof this.source === 'number') return this.source;
    if (now - this.checkedAt >= RATE_RECHECK_MS) {
      const r = this.source();
      this.rate = Number.isFinite(r) && r > 0 ? r : 0;
      this.checkedAt = now;
    }
    return this.rate;
  }

  /** Wait until `n` bytes (at most one slice) may pass, and take them; a wait `signal` stops rejects (AbortError). */
  async take(n: number, signal?: AbortSignal): Promise<void> {
    for (;;) {
      const now = performance.now();
      const rate = this.current(now);
      const burst = Math.max(SLICE_BYTES, rate * BURST_SECONDS);
      if (rate === 0) {
        // No cap now: nothing to wait for; a cap that starts later starts with a full burst.
        this.tokens = burst;
        this.last = now;
        return;
      }
      this.tokens = Number.isNaN(this.tokens) ? burst : Math.min(burst, this.tokens + ((now - this.last) / 1000) * rate);
      this.last = now;
      if (this.tokens >= n) break;
      // Waking at least every RATE_RECHECK_MS lets a rate that changed meanwhile take effect.
      await sleep(Math.min(RATE_RECHECK_MS, Math.ceil(((n - this.tokens) / rate) * 1000)), undefined, signal ? { signal } : undefined);
    }
    this.tokens -= n;
  }
}

/**
 * Yield the chunks of `source` at no more than `limit` bytes per second on average (a rate, or a
 * shared bucket). A chunk no larger than a slice (any chunk while the bucket's rate is 0: a
 * schedule's window without a cap) goes whole, and its pooled payload buffer is given back once
 * the consumer asks for the next chunk, as api/client.ts `releasing` does without a cap. A 1 GiB
 * transfer (cold CLI, 4 runs each) under `schedule: [{ bwlimit: 0 }]` took 6.74-7.52 s sliced
 * and unreleased, 3.83-4.93 s this way, 3.61-4.83 s with no schedule; under `bwlimit: 200MiB`
 * (5.12 s at least) 6.21-7.38 s in 64 KiB slices, 5.87-6.36 s whole. A larger chunk is cut into
 * slices, and its buffer is collected rather than given back: a slice smaller than the socket's
 * high-water mark may still be queued when the next is asked.
 *
 * `signal` ends a wait for tokens (the generator throws AbortError): an upload body whose request
 * is over (its answer came early, or its connection failed) is no longer read, and a wait of its
 * would keep the process alive, and the shared bucket's tokens taken, for nothing.
 */
export async function* throttle(source: AsyncIterable<Buffer>, limit: Rate | TokenBucket, signal?: AbortSignal): AsyncGenerator<Buffer> {
  if (typeof limit === 'number' && !(limit > 0)) {
    yield* source;
    return;
  }
  const bucket = limit instanceof TokenBucket ? limit : new TokenBucket(limit);
  let release: (() => void) | undefined;
  for await (const chunk of source) {
    release?.();
    release = undefined;
    const rate = bucket.bytesPerSecond;
    const slice = rate === 0 ? Infinity : Math.max(SLICE_BYTES, Math.floor(rate * SLICE_SECONDS));
    if (chunk.length <= slice) {
      await bucket.take(chunk.length, signal); // with no cap now: keeps the bucket full for a cap that starts later
      release = takeRelease(chunk);
      yield chunk;
      continue;
    }
    for (let off = 0; off < chunk.length; off += slice) {
      const piece = chunk.subarray(off, Math.min(chunk.length, off + slice));
      await bucket.take(piece.length, signal);
      yield piece;
    }
  }
  release?.();
}
