/**
 * `--bwlimit`: a token bucket over a byte stream. Wrap an upload body (push) or a download body
 * (pull) with {@link throttle}; TCP back-pressure then slows the other side down to the same rate.
 */
import { setTimeout as sleep } from 'node:timers/promises';

/** Pieces larger than this are cut so the rate stays smooth (no 512 KiB bursts on a slow link). */
const SLICE_BYTES = 64 * 1024;
/** The bucket holds at most this many seconds of tokens: a short burst is fine, a long idle is not credit. */
const BURST_SECONDS = 0.25;

/**
 * A token bucket that several streams may share, so that parallel block streams to one peer
 * stay under one cap together.
 */
export class TokenBucket {
  readonly bytesPerSecond: number;
  private readonly burst: number;
  private tokens: number;
  private last = performance.now();

  constructor(bytesPerSecond: number) {
    this.bytesPerSecond = bytesPerSecond;
    this.burst = Math.max(SLICE_BYTES, bytesPerSecond * BURST_SECONDS);
    this.tokens = this.burst;
  }

  /** Wait until `n` bytes (at most one slice) may pass, and take them. */
  async take(n: number): Promise<void> {
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
      this.last = now;
      if (this.tokens >= n) break;
      await sleep(Math.ceil(((n - this.tokens) / this.bytesPerSecond) * 1000));
    }
    this.tokens -= n;
  }
}

/** Yield the chunks of `source` at no more than `limit` bytes per second on average (a rate, or a shared bucket). */
export async function* throttle(source: AsyncIterable<Buffer>, limit: number | TokenBucket): AsyncGenerator<Buffer> {
  if (typeof limit === 'number' && !(limit > 0)) {
    yield* source;
    return;
  }
  const bucket = typeof limit === 'number' ? new TokenBucket(limit) : limit;
  for await (const chunk of source) {
    for (let off = 0; off < chunk.length; off += SLICE_BYTES) {
      const piece = chunk.subarray(off, Math.min(chunk.length, off + SLICE_BYTES));
      await bucket.take(piece.length);
      yield piece;
    }
  }
}
