/**
 * Deadline scheduling: start a volume's job early enough that it ends before the RPO is
 * breached. next start = last good point + RPO − expected duration, never before now; a
 * volume that was never protected, or is already late, starts now.
 *
 * Expected duration comes from measured rates (store meta 'rates', per volume): a snapshot
 * reads the whole volume at the scan rate, a replication sends the changed bytes at the sync
 * rate. Pure functions; no I/O.
 */

export interface Rates {
  /** Bytes per second read and hashed by a snapshot (volume size / snapshot time). */
  readonly scanBytesPerSec: number;
  /** Bytes per second sent to the peer by a replication. */
  readonly syncBytesPerSec: number;
  /** Bytes per second uploaded by EBS exports (cloud side; absent until measured). */
  readonly exportBytesPerSec?: number;
  /** Bytes the last replication sent (the change since the previous one). */
  readonly lastChangedBytes: number;
  /** Number of measurements folded in (0 = defaults). */
  readonly samples: number;
  readonly updated: string | null;
}

/**
 * Until a volume has been measured: a local disk hashed on 2 cores (~100 MiB/s) and a
 * modest WAN link (~20 MiB/s), conservative so that the first deadlines are met.
 */
export const DEFAULT_RATES: Rates = {
  scanBytesPerSec: 100 * 1024 * 1024,
  syncBytesPerSec: 20 * 1024 * 1024,
  lastChangedBytes: 0,
  samples: 0,
  updated: null,
};

/** Fixed cost of a job beyond reading and sending (hooks, tree walk round trips, commits). */
export const JOB_OVERHEAD_MS = 5_000;
/** Rates fluctuate (load, link): plan for jobs 50 % slower than measured. */
export const SAFETY_FACTOR = 1.5;
/** Weight of a new measurement in the running average: reacts within a few jobs, ignores one outlier. */
export const RATE_SMOOTHING = 0.3;

/** Expected duration of a snapshot + replication of a volume of `sizeBytes`. */
export function expectedDurationMs(rates: Rates, sizeBytes: number, replicate: boolean): number {
  const scanMs = (sizeBytes / Math.max(1, rates.scanBytesPerSec)) * 1000;
  // Until a replication was measured, assume the whole volume changed (first full copy).
  const changed = rates.samples === 0 ? sizeBytes : rates.lastChangedBytes;
  const syncMs = replicate ? (changed / Math.max(1, rates.syncBytesPerSec)) * 1000 : 0;
  return Math.ceil((scanMs + syncMs + JOB_OVERHEAD_MS) * SAFETY_FACTOR);
}

/**
 * A recovery point dated later than now by more than this was not made at the time it says:
 * the clock was set back since (an NTP step, a VM resumed from a snapshot), or the appliance that
 * dated it runs ahead. Its age is unknown: the scheduler runs the next job at once and `status`
 * counts it as breached, rather than waiting for the clock to catch up with it.
 */
export const CLOCK_STEP_MS = 60_000;

/** `at` (ms), unless it lies past `now` by more than {@link CLOCK_STEP_MS}: then null (its age is unknown). */
export function believable(at: number | null, now: number): number | null {
  return at !== null && at - now > CLOCK_STEP_MS ? null : at;
}

/**
 * When to start the next job. `lastGood` is the time of the last good recovery point (null:
 * never protected). Guarantees: the result is >= now; if expected <= rpo and the result is
 * > now then result + expected <= lastGood + rpo (the job ends by the deadline); if
 * lastGood + rpo − expected <= now the result is now (overdue: start at once).
 */
export function nextStart(lastGood: number | null, rpoMs: number, expectedMs: number, now: number): number {
  if (lastGood === null) return now;
  return Math.max(now, lastGood + rpoMs - expectedMs);
}

/** Fold one measurement into the running rates (exponential smoothing; the first one replaces the defaults). */
export function updateRates(prev: Rates, m: { scanBytesPerSec?: number; syncBytesPerSec?: number; exportBytesPerSec?: number; changedBytes?: number }, at: Date): Rates {
  const mix = (old: number, x: number | undefined) =>
    x === undefined || !Number.isFinite(x) || x <= 0 ? old : prev.samples === 0 ? x : old * (1 - RATE_SMOOTHING) + x * RATE_SMOOTHING;
  const exportRate = prev.exportBytesPerSec === undefined ? m.exportBytesPerSec : mix(prev.exportBytesPerSec, m.exportBytesPerSec);
  return {
    scanBytesPerSec: mix(prev.scanBytesPerSec, m.scanBytesPerSec),
    syncBytesPerSec: mix(prev.syncBytesPerSec, m.syncBytesPerSec),
    ...(exportRate !== undefined && Number.isFinite(exportRate) && exportRate > 0 ? { exportBytesPerSec: exportRate } : {}),
    lastChangedBytes: m.changedBytes ?? prev.lastChangedBytes,
    samples: prev.samples + 1,
    updated: at.toISOString(),
  };
}
