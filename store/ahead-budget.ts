/**
 * A process-wide bound on the items that block streams hold ahead of their consumer: blocks
 * read ahead from the packs (Store.getBlocks) and chunks encoded ahead of the socket (a peer
 * upload's send-ahead, api/client.ts). Each such item of a block pins a pooled read buffer
 * (576 KiB for a 512 KiB block read with O_DIRECT), so a fixed depth per stream made memory grow
 * with the number of streams: a daemon running two jobs (three block streams each, early sending's
 * two besides) held 100-106 read buffers at its peak (2 runs of bench/daemon-rss).
 *
 * Each stream gets a fair share of the limit, `floor(limit / streams)`, between 1 and
 * `maxDepth`: with the limit sized for one sync's streams at full depth, a lone sync keeps its
 * depth and two at once get half each. A stream never waits for room: {@link AheadShare.tryTake}
 * answers at once, and a stream that holds nothing always gets one item (the one its consumer
 * waits for), so no stream waits on another's buffers (no deadlock, no stall behind a slow
 * peer's stream); it only reads less far ahead. Items in use therefore stay within the limit, plus
 * at most one per stream while more streams run than the limit has room for, or while streams
 * that joined find the others still holding their earlier, deeper share (it shrinks as they
 * consume).
 */
export class AheadBudget {
  private used = 0;
  private members = 0;
  private highest = 0;

  /**
   * @param limit items held ahead by all streams together (see the class comment for the excess allowed)
   * @param maxDepth items one stream holds at most, however few streams run
   */
  constructor(
    readonly limit: number,
    readonly maxDepth: number,
  ) {
    if (!(Number.isInteger(limit) && limit >= 1 && Number.isInteger(maxDepth) && maxDepth >= 1)) throw new RangeError('limit and maxDepth must be integers >= 1');
  }

  /** Items held now by all streams (tests, stats). */
  get inUse(): number {
    return this.used;
  }

  /** Streams holding a share now. */
  get streams(): number {
    return this.members;
  }

  /** The most items held at once since the last {@link resetPeak} (tests). */
  get peak(): number {
    return this.highest;
  }

  resetPeak(): void {
    this.highest = this.used;
  }

  /** How deep each stream may read ahead now: the fair share of the limit, between 1 and maxDepth. */
  depth(): number {
    return Math.min(this.maxDepth, Math.max(1, Math.floor(this.limit / Math.max(1, this.members))));
  }

  /** A share for one stream; {@link AheadShare.leave} it when the stream ends (it gives back what it holds). */
  join(): AheadShare {
    this.members++;
    return new AheadShare(this);
  }

  /** @internal */
  take(first: boolean): boolean {
    if (!first && this.used >= this.limit) return false;
    this.used++;
    if (this.used > this.highest) this.highest = this.used;
    return true;
  }

  /** @internal */
  give(n: number): void {
    this.used -= n;
  }

  /** @internal */
  left(): void {
    this.members--;
  }
}

/** One stream's share of an {@link AheadBudget}. Not for use by two streams at once. */
export class AheadShare {
  private count = 0;
  private gone = false;

  constructor(private readonly budget: AheadBudget) {}

  /** Items this stream holds. */
  get held(): number {
    return this.count;
  }

  /**
   * Room for one more item ahead, taken at once, or false (never waits): always when this stream
   * holds none, else while it holds fewer than its share ({@link AheadBudget.depth}) and the
   * budget has room. Each true is given back with {@link give}.
   */
  tryTake(): boolean {
    if (this.gone) throw new Error('AheadShare used after leave()');
    if (this.count > 0 && this.count >= this.budget.depth()) return false;
    if (!this.budget.take(this.count === 0)) return false;
    this.count++;
    return true;
  }

  /** Give back one item taken (its consumer has it now, or it was dropped). */
  give(): void {
    if (this.count === 0 || this.gone) return;
    this.count--;
    this.budget.give(1);
  }

  /** The stream is over: whatever it holds is given back and it no longer counts. Idempotent. */
  leave(): void {
    if (this.gone) return;
    this.gone = true;
    this.budget.give(this.count);
    this.count = 0;
    this.budget.left();
  }
}
