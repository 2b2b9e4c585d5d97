/**
 * Retention: which snapshots of a volume to keep (grandfather-father-son buckets).
 *
 * For each period (hour, day, ISO week, month; UTC) the snapshots are grouped into buckets; the
 * newest snapshot of each of the newest N buckets that hold one is kept (N = the policy's count
 * for that period). `last: N` keeps the newest N snapshots. The union is kept, plus, always:
 * the newest snapshot, every pinned snapshot (one an operator holds; a sync base or the last EBS
 * export: deleting them would force a full transfer), and any snapshot dated after `now` (clock skew between peers:
 * it cannot be bucketed fairly yet).
 */
import type { RawRetention } from '../config/schema.js';

export interface Dated {
  readonly id: string;
  /** ISO-8601 time. */
  readonly created: string;
}

type Period = 'hourly' | 'daily' | 'weekly' | 'monthly';

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
/** 1970-01-01 was a Thursday: shift by 3 days so that buckets start on Mondays (ISO weeks). */
const MONDAY_OFFSET_MS = 3 * DAY_MS;

function bucketOf(period: Period, t: number): string {
  switch (period) {
    case 'hourly': return `h${Math.floor(t / HOUR_MS)}`;
    case 'daily': return `d${Math.floor(t / DAY_MS)}`;
    case 'weekly': return `w${Math.floor((t + MONDAY_OFFSET_MS) / (7 * DAY_MS))}`;
    case 'monthly': { const d = new Date(t); return `m${d.getUTCFullYear()}-${d.getUTCMonth()}`; }
  }
}

/**
 * The ids to keep. `retention` null keeps everything. Pure: same input, same output; the
 * order of `snapshots` does not matter.
 */
export function selectRetained(snapshots: readonly Dated[], retention: RawRetention | null, now: number, pinned: ReadonlySet<string> = new Set()): Set<string> {
  if (retention === null) return new Set(snapshots.map((s) => s.id));
  // Newest first; ties broken by id (ids are time-sortable) so the choice is deterministic.
  const sorted = [...snapshots]
    .map((s) => ({ id: s.id, t: Date.parse(s.created) }))
    .sort((a, b) => b.t - a.t || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
  const keep = new Set<string>();
  if (sorted.length > 0) keep.add(sorted[0]!.id);
  for (const s of sorted) if (pinned.has(s.id) || s.t > now || Number.isNaN(s.t)) keep.add(s.id);
  sorted.slice(0, retention.last ?? 0).forEach((s) => keep.add(s.id));
  for (const period of ['hourly', 'daily', 'weekly', 'monthly'] as const) {
    const n = retention[period] ?? 0;
    const seen = new Set<string>();
    for (const s of sorted) {
      if (seen.size >= n) break;
      const b = bucketOf(period, s.t);
      if (seen.has(b)) continue;
      seen.add(b);
      keep.add(s.id);
    }
  }
  return keep;
}
