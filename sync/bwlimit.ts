/**
 * `--bwlimit`: a token bucket over a byte stream. Wrap an upload body (push) or a download body
 * (pull) with {@link throttle}; TCP back-pressure then slows the other side down to the same rate.
 */
import { setTimeout as sleep } from 'node:timers/promises';

/** Pieces larger than this are cut so the rate stays smooth (no 512 KiB bursts on a slow link). */
const SLICE_BYTES = 64 * 1024;
/** The bucket holds at most this many seconds of tokens: a short burst is fine, a long idle is not credit. */
const BURST_SECONDS = 0.25;

/** Yield the chunks of `source` at no more than `bytesPerSecond` on average. */
export async function* throttle(source: AsyncIterable<Buffer>, bytesPerSecond: number): AsyncGenerator<Buffer> {
  if (!(bytesPerSecond > 0)) {
    yield* source;
    return;
  }
  const burst = Math.max(SLICE_BYTES, bytesPerSecond * BURST_SECONDS);
  let tokens = burst;
  let last = performance.now();
  for await (const chunk of source) {
    for (let off = 0; off < chunk.length; off += SLICE_BYTES) {
      const piece = chunk.subarray(off, Math.min(chunk.length, off + SLICE_BYTES));
      for (;;) {
        const now = performance.now();
        tokens = Math.min(burst, tokens + ((now - last) / 1000) * bytesPerSecond);
        last = now;
        if (tokens >= piece.length) break;
        await sleep(Math.ceil(((piece.length - tokens) / bytesPerSecond) * 1000));
      }
      tokens -= piece.length;
      yield piece;
    }
  }
}
