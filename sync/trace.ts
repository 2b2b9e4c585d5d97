/**
 * Phase timings for profiling: with TANDEM_TRACE=1 in the environment, `trace('phase')` prints
 * `trace +12.3ms (t=45.6ms) phase` on stderr (time since the previous mark and since process
 * start). Without it, a no-op. stdout is never touched (it belongs to --json).
 */
const enabled = process.env.TANDEM_TRACE === '1' || process.env.TANDEM_TRACE === 'true';
let last = performance.now();

export function trace(phase: string): void {
  if (!enabled) return;
  const t = performance.now();
  process.stderr.write(`trace +${(t - last).toFixed(1)}ms (t=${t.toFixed(1)}ms) ${phase}\n`);
  last = t;
}

export const tracing = enabled;
