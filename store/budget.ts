/**
 * A byte budget shared by a store's block streams: the memory of the blocks they build from
 * delta frames (Store.putBlocks). A delta frame is a few bytes on the wire but names a block of up
 * to 16 MiB; without a bound across streams, 12 uploads of 2.3 KB each (24 deltas of a 16 MiB
 * block) took a server from 119 MiB to 1,510-1,639 MiB of peak RSS (3 runs; 230-232 MiB with this
 * budget: test/sync/hostile-upload.test.ts).
 *
 * Takers wait in arrival order (a large take is not passed over by small ones for ever). A holder
 * that is idle (waiting for its sender) while someone waits is told so ({@link onContended}) and
 * writes out what it holds: a stream never keeps budget while it waits for the network, so the
 * budget cannot be held by a sender that stops between frames, and two streams each holding part
 * of it cannot wait on each other.
 */
export class ByteBudget {
  private used = 0;
  private readonly waiting: Array<{ readonly n: number; readonly grant: () => void }> = [];
  private readonly watchers = new Set<() => void>();

  constructor(readonly limit: number) {}

  /** Bytes taken and not yet given back (tests, stats). */
  get inUse(): number {
    return this.used;
  }

  /** `n` bytes (at most the whole budget), taken at once when they fit and nobody waits; else false. */
  tryTake(n: number): boolean {
    const want = Math.min(n, this.limit);
    if (this.waiting.length > 0 || this.used + want > this.limit) return false;
    this.used += want;
    return true;
  }

  /** `n` bytes (at most the whole budget), once they fit; takers are served in arrival order. */
  take(n: number): Promise<void> {
    if (this.tryTake(n)) return Promise.resolve();
    const want = Math.min(n, this.limit);
    return new Promise<void>((grant) => {
      this.waiting.push({ n: want, grant });
      for (const w of [...this.watchers]) w();
    });
  }

  /** Give back `n` bytes taken (the same `n` as taken). */
  give(n: number): void {
    this.used -= Math.min(n, this.limit);
    for (let w = this.waiting[0]; w && this.used + w.n <= this.limit; w = this.waiting[0]) {
      this.waiting.shift();
      this.used += w.n;
      w.grant();
    }
  }

  /** Call `cb` once someone waits for bytes (at once if someone does now); returns the function that cancels it. */
  onContended(cb: () => void): () => void {
    if (this.waiting.length > 0) {
      cb();
      return () => undefined;
    }
    const once = () => {
      this.watchers.delete(once);
      cb();
    };
    this.watchers.add(once);
    return () => void this.watchers.delete(once);
  }
}
