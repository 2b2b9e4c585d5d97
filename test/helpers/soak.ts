/**
 * Trials of a kill -9 loop. CI runs each loop a few times; a soak run before a release, or while
 * hunting a rare failure, multiplies them with TANDEM_SOAK (a whole number, 1 to 100):
 *
 *   TANDEM_SOAK=10 node scripts/test.mjs kill faults gc-crash
 *
 * Anything else in it is refused, so a typo cannot quietly run the usual few trials.
 */
export function trials(n: number): number {
  const raw = process.env.TANDEM_SOAK;
  if (raw === undefined || raw === '') return n;
  const k = Number(raw);
  if (!Number.isInteger(k) || k < 1 || k > 100) throw new Error(`TANDEM_SOAK=${raw}: give a whole number from 1 to 100 (how many times the usual trials to run)`);
  return n * k;
}
