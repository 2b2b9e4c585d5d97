/**
 * The replication rate cap over the week (config `replication.bwlimit` and
 * `replication.schedule`), so that replication leaves the WAN to the business during its hours
 * and takes all of it at night. Pure; no I/O.
 *
 * ```yaml
 * replication:
 *   peer: cloud
 *   bwlimit: 200MiB                  # outside every window (absent: no cap)
 *   schedule:                        # the first window that holds the time wins
 *     - { days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00", bwlimit: 20MiB }
 *     - { days: [sat, sun], bwlimit: 0 }          # 0: no cap
 *     - { from: "22:00", to: "06:00", bwlimit: 0 } # past midnight: to the next morning
 * ```
 * Times are the appliance's local time (its TZ). `days` absent: every day; `from`/`to` absent:
 * the whole day (00:00-24:00). A window whose `to` is not after its `from` runs past midnight,
 * into the day after each of its days. A running sync follows the schedule: its cap changes
 * when a window starts or ends (sync/bwlimit.ts re-reads it every second).
 */
import { parseSize } from './size.js';

export const DAY_NAMES = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'] as const;
export type DayName = (typeof DAY_NAMES)[number];
const TIME = /^([01]\d|2[0-3]):([0-5]\d)$|^24:00$/;

export interface RawWindow {
  readonly days?: readonly string[];
  readonly from?: string;
  readonly to?: string;
  readonly bwlimit: string | number;
}

export interface RawReplication {
  readonly bwlimit?: string;
  readonly schedule?: readonly RawWindow[];
}

/** Minutes since midnight of "HH:MM" (24:00 is 1440); null when it is not such a time. */
export function parseClock(s: string): number | null {
  if (!TIME.test(s)) return null;
  const [h, m] = s.split(':').map(Number);
  return h! * 60 + m!;
}

/** What is wrong with a window, as [key, message] pairs (key relative to the window); empty when it is valid. */
export function windowProblems(w: RawWindow): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const d of w.days ?? []) {
    if (!(DAY_NAMES as readonly string[]).includes(String(d).toLowerCase())) out.push(['days', `"${d}" is not a day (write mon, tue, wed, thu, fri, sat or sun)`]);
  }
  for (const k of ['from', 'to'] as const) {
    const v = w[k];
    if (v !== undefined && parseClock(v) === null) out.push([k, `"${v}" is not a time of day (write HH:MM, 00:00 to 24:00, quoted)`]);
  }
  if (w.from !== undefined && w.to !== undefined && w.from === w.to) out.push(['to', 'a window from a time to the same time is empty; leave both out for the whole day']);
  try {
    parseSize(String(w.bwlimit));
  } catch {
    out.push(['bwlimit', `"${w.bwlimit}" is not a rate (write e.g. 20MiB, a number of bytes a second, or 0 for no cap)`]);
  }
  return out;
}

/** True when local time `now` lies in window `w`. */
function inWindow(w: RawWindow, now: Date): boolean {
  const from = w.from === undefined ? 0 : parseClock(w.from)!;
  const to = w.to === undefined ? 1440 : parseClock(w.to)!;
  const minute = now.getHours() * 60 + now.getMinutes();
  const days = w.days?.map((d) => DAY_NAMES.indexOf(d.toLowerCase() as DayName));
  const on = (day: number) => days === undefined || days.includes(day);
  const today = now.getDay();
  if (from < to) return on(today) && minute >= from && minute < to;
  // Past midnight: the evening of one of its days, or the morning after one.
  return (on(today) && minute >= from) || (on((today + 6) % 7) && minute < to);
}

/** Bytes a second replication may use at `now` (0: no cap). The config must have passed {@link windowProblems}. */
export function replicationRate(r: RawReplication | null | undefined, now: Date): number {
  for (const w of r?.schedule ?? []) if (inWindow(w, now)) return parseSize(String(w.bwlimit));
  return r?.bwlimit === undefined ? 0 : parseSize(r.bwlimit);
}

/** Whether the cap can change over time (a schedule is set): then a sync follows it as it runs. */
export function hasSchedule(r: RawReplication | null | undefined): boolean {
  return (r?.schedule?.length ?? 0) > 0;
}
