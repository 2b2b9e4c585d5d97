/**
 * An adaptive concurrency limit for EBS direct API calls (AIMD: additive increase,
 * multiplicative decrease), the same idea TCP uses for its congestion window.
 *
 * EBS throttles per account and per snapshot, and the quota is not published as a fixed
 * number of requests in flight. Starting near the documented comfortable level and halving on
 * every throttle finds the real limit within a few round trips; growing by one per
 * {@link LimiterOptions.increaseEvery} successes probes upwards slowly so a transfer does not
 * oscillate into throttling again.
 *
 * Contract: `acquire()` resolves when a slot is free (FIFO); each acquire must be matched by
 * exactly one `release(outcome)`. Safe to share between concurrent tasks of one process.
 */

/** coldsnap and the EBS direct API guide both use 64 requests in flight as a sane start. */
export const DEFAULT_INITIAL_LIMIT = 64;
/** Above this many 512 KiB requests in flight, memory (128 MiB of blocks) matters more than speed. */
export const DEFAULT_MAX_LIMIT = 256;
/** Never below one request: progress must continue, backoff does the rest. */
export const DEFAULT_MIN_LIMIT = 1;
/** Successes needed for one more slot: slow growth after a halving avoids re-triggering throttles. */
export const DEFAULT_INCREASE_EVERY = 8;

export type Outcome = 'ok' | 'throttled' | 'error';

export interface LimiterOptions {
  readonly initial?: number;
  readonly min?: number;
  readonly max?: number;
  readonly increaseEvery?: number;
}

export interface LimiterStats {
  readonly limit: number;
  readonly inFlight: number;
  readonly throttles: number;
  readonly peakInFlight: number;
}

export class AdaptiveLimiter {
  private readonly min: number;
  private readonly max: number;
  private readonly increaseEvery: number;
  private current: number;
  private active = 0;
  private successes = 0;
  private throttles = 0;
  private peak = 0;
  /** Bumped at every decrease; a throttle of a request admitted before it is the same congestion event. */
  private epoch = 0;
  private readonly waiters: Array<() => void> = [];

  constructor(opts: LimiterOptions = {}) {
    this.min = opts.min ?? DEFAULT_MIN_LIMIT;
    this.max = opts.max ?? DEFAULT_MAX_LIMIT;
    this.increaseEvery = opts.increaseEvery ?? DEFAULT_INCREASE_EVERY;
    const initial = opts.initial ?? DEFAULT_INITIAL_LIMIT;
    if (!(Number.isInteger(this.min) && this.min >= 1 && Number.isInteger(this.max) && this.max >= this.min)) {
      throw new RangeError(`limiter bounds must be integers with 1 <= min <= max (min ${this.min}, max ${this.max})`);
    }
    if (!(Number.isInteger(this.increaseEvery) && this.increaseEvery >= 1)) throw new RangeError('increaseEvery must be a positive integer');
    this.current = Math.min(this.max, Math.max(this.min, Math.floor(initial)));
  }

  /** The current limit (requests allowed in flight). */
  get limit(): number {
    return this.current;
  }

  get inFlight(): number {
    return this.active;
  }

  stats(): LimiterStats {
    return { limit: this.current, inFlight: this.active, throttles: this.throttles, peakInFlight: this.peak };
  }

  /**
   * Wait for a free slot. Resolves to a ticket (the decrease epoch at admission); passing it
   * back to {@link release} makes the limit halve at most once per congestion event, as TCP
   * decreases once per round trip: the requests already in flight when the limit was halved
   * were sent at the old rate, so their throttles say nothing new.
   */
  acquire(): Promise<number> {
    if (this.active < this.current && this.waiters.length === 0) {
      this.take();
      return Promise.resolve(this.epoch);
    }
    return new Promise((resolve) => this.waiters.push(() => { this.take(); resolve(this.epoch); }));
  }

  /** Give the slot back and adapt: halve on a throttle, grow by one every `increaseEvery` successes. */
  release(outcome: Outcome, ticket?: number): void {
    if (this.active <= 0) throw new Error('AdaptiveLimiter.release() without acquire()');
    this.active--;
    if (outcome === 'throttled') {
      this.throttles++;
      this.successes = 0;
      if (ticket === undefined || ticket === this.epoch) {
        this.current = Math.max(this.min, Math.floor(this.current / 2));
        this.epoch++;
      }
    } else if (outcome === 'ok') {
      if (++this.successes >= this.increaseEvery) {
        this.successes = 0;
        this.current = Math.min(this.max, this.current + 1);
      }
    }
    this.wake();
  }

  /** Run `fn` inside a slot; `classify` tells how the attempt went (default: ok or error). */
  async run<T>(fn: () => Promise<T>, classify: (e: unknown) => Outcome = () => 'error'): Promise<T> {
    const ticket = await this.acquire();
    let outcome: Outcome = 'ok';
    try {
      return await fn();
    } catch (e) {
      outcome = classify(e);
      throw e;
    } finally {
      this.release(outcome, ticket);
    }
  }

  private take(): void {
    this.active++;
    if (this.active > this.peak) this.peak = this.active;
  }

  private wake(): void {
    while (this.active < this.current && this.waiters.length > 0) this.waiters.shift()!();
  }
}
