/**
 * Time as the scheduler sees it. The real clock is wall time; the fake clock lets tests run a
 * day of schedule in milliseconds and observe each sleep as an event (no sleeps in tests).
 */

export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  /** Resolve after `ms` (or at once when ms <= 0); resolve early, without error, when `signal` aborts. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) => new Promise<void>((resolve) => {
    if (ms <= 0 || signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  }),
};

interface Sleeper {
  readonly until: number;
  readonly resolve: () => void;
}

/**
 * A clock that only moves when told. `nextSleep()` resolves when someone sleeps (with the time
 * it will wake at), so a test can wait for the scheduler to go idle, then `advanceTo` that time.
 */
export class FakeClock implements Clock {
  private t: number;
  private sleepers: Sleeper[] = [];
  private sleepWaiters: Array<(until: number) => void> = [];

  constructor(start: number) {
    this.t = start;
  }

  now(): number {
    return this.t;
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (ms <= 0 || signal?.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const s: Sleeper = {
        until: this.t + ms,
        resolve: () => {
          this.sleepers = this.sleepers.filter((x) => x !== s);
          signal?.removeEventListener('abort', s.resolve);
          resolve();
        },
      };
      this.sleepers.push(s);
      signal?.addEventListener('abort', s.resolve, { once: true });
      const waiters = this.sleepWaiters;
      this.sleepWaiters = [];
      for (const w of waiters) w(s.until);
    });
  }

  /** Resolves with the wake time of the next sleep that starts (or of a pending one). */
  nextSleep(): Promise<number> {
    return new Promise((resolve) => this.sleepWaiters.push(resolve));
  }

  /** Move time forward to `t` (never backwards) and wake every sleeper due by then. */
  advanceTo(t: number): void {
    this.t = Math.max(this.t, t);
    for (const s of [...this.sleepers]) if (s.until <= this.t) s.resolve();
  }
}
