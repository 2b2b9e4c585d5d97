/**
 * Durations as operators write them in the config: "30s", "15m", "1h", "2h30m", "1d", "1w".
 * Pure functions; no I/O.
 */
import { TandemError } from '../../common/errors.js';

const UNIT_MS: Record<string, number> = {
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 7 * 86_400_000,
};

const DURATION_RE = /^(?:\d+[smhdw])+$/;

/**
 * Parse a duration into milliseconds. Throws ERR_CONFIG_INVALID for anything else than one or
 * more `<digits><unit>` parts (units s, m, h, d, w), or for a zero duration.
 */
export function parseDuration(s: string): number {
  const text = String(s).trim();
  if (!DURATION_RE.test(text)) {
    throw new TandemError('ERR_CONFIG_INVALID', `"${s}" is not a duration; write e.g. 30s, 15m, 1h, 2h30m, 1d or 1w`);
  }
  let ms = 0;
  for (const m of text.matchAll(/(\d+)([smhdw])/g)) ms += Number(m[1]) * UNIT_MS[m[2]!]!;
  if (ms <= 0) throw new TandemError('ERR_CONFIG_INVALID', `duration "${s}" is zero; give a positive duration`);
  return ms;
}

/** The shortest readable form of a duration in ms, e.g. 5400000 → "1h30m" (inverse of parseDuration for whole seconds). */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return String(ms);
  const neg = ms < 0;
  let rest = Math.round(Math.abs(ms) / 1000);
  if (rest === 0) return '0s';
  let out = '';
  for (const [u, size] of [['d', 86_400], ['h', 3600], ['m', 60], ['s', 1]] as const) {
    const n = Math.floor(rest / size);
    if (n > 0) { out += `${n}${u}`; rest -= n * size; }
  }
  return (neg ? '-' : '') + out;
}
