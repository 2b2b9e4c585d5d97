/**
 * Fault injection and request statistics, switched at runtime through /_emulator/faults and
 * /_emulator/stats. Faults apply to AWS requests only (never to the control routes), after the
 * request is authenticated and its body read, before the operation runs: a throttled or failed
 * request changes nothing, as with AWS.
 */

export interface FaultSettings {
  /** Percent (0-100) of requests answered with the service's throttling error. */
  throttlePercent: number;
  /** Milliseconds added before every request is handled. */
  latencyMs: number;
  /** Percent (0-100) of requests answered with an internal server error (5xx). */
  errorPercent: number;
  /**
   * Percent (0-100) of requests refused as not authorized (EBS AccessDeniedException, EC2
   * UnauthorizedOperation, 403): an IAM policy without the action, or a role taken away.
   */
  denyPercent: number;
  /** Seed of the pseudo-random choice, so a fault run can be replayed. */
  seed: number;
  /** Operations (e.g. `DeleteSnapshot`) the faults apply to; empty: all of them. */
  actions: string[];
  /**
   * Let this many requests (of `actions`) through after the settings are made, then hold every
   * further one unanswered until the settings are replaced; a held request is then answered
   * with a server error, having changed nothing. null: no hold. For stopping a client at a
   * known point (kill -9 tests) without racing it.
   */
  holdAfter: number | null;
}

export const NO_FAULTS: FaultSettings = { throttlePercent: 0, latencyMs: 0, errorPercent: 0, denyPercent: 0, seed: 1, actions: [], holdAfter: null };

/** What the injector decided for one request. `hold`: wait for `released`, then answer a server error. */
export type FaultDecision = { kind: 'none' } | { kind: 'throttle'; n: number } | { kind: 'error'; n: number } | { kind: 'deny' } | { kind: 'hold'; released: Promise<void> };

/** mulberry32: a tiny seeded PRNG; quality is ample for picking which requests fail. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class Faults {
  #settings: FaultSettings = { ...NO_FAULTS };
  #rand = mulberry32(NO_FAULTS.seed);
  /** Counts injected faults so the kinds of throttling error rotate. */
  #injected = 0;
  /** Requests let through under `holdAfter` since the settings were made. */
  #passed = 0;
  /** Resolved (releasing the held requests) when the settings are replaced. */
  #release: { promise: Promise<void>; resolve: () => void } = released();

  get settings(): FaultSettings {
    return { ...this.#settings, actions: [...this.#settings.actions] };
  }

  /** Replace the settings (missing fields keep their defaults: no fault). Validates first: bad input changes nothing. */
  configure(input: Partial<Record<keyof FaultSettings, unknown>>): FaultSettings {
    const next: FaultSettings = { ...NO_FAULTS };
    for (const key of ['throttlePercent', 'errorPercent', 'denyPercent'] as const) {
      const v = input[key];
      if (v === undefined) continue;
      if (typeof v !== 'number' || !(v >= 0 && v <= 100)) throw new RangeError(`${key} must be a number from 0 to 100`);
      next[key] = v;
    }
    if (input.latencyMs !== undefined) {
      const v = input.latencyMs;
      if (typeof v !== 'number' || !(v >= 0 && v <= 60_000)) throw new RangeError('latencyMs must be a number from 0 to 60000');
      next.latencyMs = v;
    }
    if (input.actions !== undefined) {
      const v = input.actions;
      if (!Array.isArray(v) || !v.every((a) => typeof a === 'string' && /^[A-Za-z]+$/.test(a))) throw new RangeError('actions must be a list of operation names');
      next.actions = [...v] as string[];
    }
    if (input.seed !== undefined) {
      if (typeof input.seed !== 'number' || !Number.isInteger(input.seed)) throw new RangeError('seed must be an integer');
      next.seed = input.seed;
    }
    if (input.holdAfter !== undefined && input.holdAfter !== null) {
      const v = input.holdAfter;
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw new RangeError('holdAfter must be a whole number of requests (0 or more), or null');
      next.holdAfter = v;
    }
    this.#settings = next;
    this.#rand = mulberry32(next.seed);
    this.#injected = 0;
    this.#passed = 0;
    this.#release.resolve();
    this.#release = released();
    return this.settings;
  }

  /** For a request of operation `action`. */
  decide(action?: string): FaultDecision {
    const { throttlePercent, errorPercent, denyPercent, actions, holdAfter } = this.#settings;
    if (throttlePercent === 0 && errorPercent === 0 && denyPercent === 0 && holdAfter === null) return { kind: 'none' };
    if (actions.length > 0 && (action === undefined || !actions.includes(action))) return { kind: 'none' };
    if (holdAfter !== null) {
      if (this.#passed >= holdAfter) return { kind: 'hold', released: this.#release.promise };
      this.#passed++;
    }
    const r = this.#rand() * 100;
    if (r < throttlePercent) return { kind: 'throttle', n: this.#injected++ };
    if (r < throttlePercent + errorPercent) return { kind: 'error', n: this.#injected++ };
    if (r < throttlePercent + errorPercent + denyPercent) return { kind: 'deny' };
    return { kind: 'none' };
  }
}

function released(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => { resolve = r; });
  return { promise, resolve };
}

/**
 * Per-operation counts of answered requests. `operations` counts successful answers (2xx),
 * `errors` the others (including injected faults); block bytes are the payloads of
 * PutSnapshotBlock (in) and GetSnapshotBlock (out).
 */
export class Stats {
  operations: Record<string, number> = {};
  errors: Record<string, number> = {};
  throttled = 0;
  injectedErrors = 0;
  /** Requests refused by `denyPercent`. */
  denied = 0;
  /** Requests a `holdAfter` fault has held (counted when held, not when released). */
  held = 0;
  blockBytesIn = 0;
  blockBytesOut = 0;

  record(op: string, status: number): void {
    const table = status < 300 ? this.operations : this.errors;
    table[op] = (table[op] ?? 0) + 1;
  }

  reset(): void {
    this.operations = {};
    this.errors = {};
    this.throttled = 0;
    this.injectedErrors = 0;
    this.denied = 0;
    this.held = 0;
    this.blockBytesIn = 0;
    this.blockBytesOut = 0;
  }

  toJSON(): Record<string, unknown> {
    return {
      ...this.operations,
      operations: { ...this.operations },
      errors: { ...this.errors },
      throttled: this.throttled,
      injectedErrors: this.injectedErrors,
      denied: this.denied,
      held: this.held,
      blockBytesIn: this.blockBytesIn,
      blockBytesOut: this.blockBytesOut,
    };
  }
}
