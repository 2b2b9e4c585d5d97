/**
 * One retry loop for every EBS direct API call. The SDK's own retries are off (maxAttempts 1,
 * see client.ts) so that throttling feeds the adaptive limiter and so that attempts and time
 * are bounded in one place.
 *
 * - throttle: the limiter halves, then exponential backoff with full jitter;
 * - transient (5xx, network): backoff, retry;
 * - not found: retried only for `notFoundGraceMs` (EBS is eventually consistent just after
 *   StartSnapshot / CompleteSnapshot), then reported;
 * - ValidationException, AccessDenied, credentials: reported at once, never retried.
 */
import { TandemError } from '../../common/errors.js';
import { AdaptiveLimiter } from './limiter.js';
import { classify, ebsError } from './errors.js';

/** Ten attempts: with 20 % of requests throttled, one call fails for good with p = 0.2^10 ≈ 1e-7. */
export const DEFAULT_MAX_ATTEMPTS = 10;
/** First backoff ceiling; doubles per attempt (full jitter: the sleep is uniform in [0, ceiling]). */
export const BASE_DELAY_MS = 50;
/** Backoff ceiling cap: long enough for a throttled account to recover, short enough to keep going. */
export const MAX_DELAY_MS = 5_000;
/** No single call spends longer than this retrying, whatever the attempt count. */
export const MAX_RETRY_TIME_MS = 120_000;
/** How long "does not exist" is believed to be eventual consistency after we created something. */
export const NOT_FOUND_GRACE_MS = 30_000;

export interface RetryOptions {
  readonly limiter: AdaptiveLimiter;
  readonly signal?: AbortSignal;
  readonly maxAttempts?: number;
  /** Retry ResourceNotFoundException for this long (0: report at once). */
  readonly notFoundGraceMs?: number;
  /** Counts every attempt sent (for results and benchmarks). */
  readonly onAttempt?: () => void;
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(aborted(signal));
    const t = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, ms);
    const onAbort = () => { clearTimeout(t); reject(aborted(signal!)); };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function aborted(signal: AbortSignal): Error {
  return signal.reason instanceof Error ? signal.reason : new TandemError('ERR_AWS_FAILED', 'the EBS transfer was cancelled; rerun to continue');
}

/** Full-jitter backoff for attempt n (0-based). */
export function backoffMs(attempt: number, random: () => number = Math.random): number {
  const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** attempt);
  return Math.floor(random() * ceiling);
}

/**
 * Run `call` inside a limiter slot with retries. `what` names the call for error messages.
 * Throws a TandemError (ERR_AWS_*) when giving up; `raw` keeps the SDK error as `cause`.
 * With `passThrough`, a failure for which it returns true is rethrown unchanged at once (the
 * caller handles it, e.g. an expired block token is answered by listing again).
 */
export async function withRetry<T>(what: string, call: () => Promise<T>, opts: RetryOptions, passThrough?: (e: unknown) => boolean): Promise<T> {
  const maxAttempts = opts.maxAttempts ?? DEFAULT_MAX_ATTEMPTS;
  const started = Date.now();
  for (let attempt = 0; ; attempt++) {
    if (opts.signal?.aborted) throw aborted(opts.signal);
    const ticket = await opts.limiter.acquire();
    let outcome: 'ok' | 'throttled' | 'error' = 'ok';
    let failure: unknown;
    let result: T | undefined;
    try {
      opts.onAttempt?.();
      result = await call();
    } catch (e) {
      failure = e;
      outcome = classify(e) === 'throttle' ? 'throttled' : 'error';
    } finally {
      opts.limiter.release(outcome, ticket);
    }
    if (outcome === 'ok') return result as T;
    if (passThrough?.(failure)) throw failure;
    const kind = classify(failure);
    const elapsed = Date.now() - started;
    const retryable = kind === 'throttle' || kind === 'transient' || (kind === 'not-found' && elapsed < (opts.notFoundGraceMs ?? 0));
    if (!retryable || attempt + 1 >= maxAttempts || elapsed >= MAX_RETRY_TIME_MS) throw ebsError(failure, what);
    await sleep(backoffMs(attempt), opts.signal);
  }
}
