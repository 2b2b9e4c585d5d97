/**
 * What starting Node costs on this machine, apart from anything Tandem does.
 *
 * NODE_EXTRA_CA_CERTS, when set, makes Node 20 read and parse that certificate file at every
 * start, before any of our code runs (here it names the system bundle: 60-100 ms per process).
 * It is part of the environment, not of Tandem: an appliance run as a service has it only if
 * its unit sets it (the AWS SDK needs it only behind a TLS-intercepting proxy). The benches time
 * the CLI as this environment runs it and, when the variable is set, also without it, and say
 * which is which.
 */
import { spawnSync } from 'node:child_process';

export const EXTRA_CA_VAR = 'NODE_EXTRA_CA_CERTS';

/** Runs of `node -e 0` each way; the median is given. */
const RUNS = 7;

/** True when the variable is set here, so a figure without it means something. */
export const extraCaSet = process.env[EXTRA_CA_VAR] !== undefined;

/** This process's environment with CI=true, optionally without the variable. */
export function childEnv(withoutExtraCa = false): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, CI: 'true' };
  if (withoutExtraCa) delete env[EXTRA_CA_VAR];
  return env;
}

function medianMs(env: NodeJS.ProcessEnv, runs: number): number {
  const ms: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = process.hrtime.bigint();
    const r = spawnSync(process.execPath, ['-e', '0'], { env, stdio: 'ignore' });
    if (r.status !== 0) throw new Error(`node -e 0 exited ${r.status}`);
    ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  return ms.sort((a, b) => a - b)[Math.floor(runs / 2)]!;
}

/** Median wall time of `node -e 0` as this environment runs it and, if the variable is set, without it. */
export function nodeStart(): { ms: number; withoutExtraCaMs: number | null } {
  return { ms: medianMs(childEnv(), RUNS), withoutExtraCaMs: extraCaSet ? medianMs(childEnv(true), RUNS) : null };
}

/** One line for a bench's table: the start cost and where it comes from. */
export function describeNodeStart(s: { ms: number; withoutExtraCaMs: number | null }): string {
  if (s.withoutExtraCaMs === null) return `node -e 0: ${s.ms.toFixed(0)} ms (median of ${RUNS})`;
  return `node -e 0 (median of ${RUNS}): ${s.ms.toFixed(0)} ms here, ${s.withoutExtraCaMs.toFixed(0)} ms without ${EXTRA_CA_VAR} (set in this environment: Node reads that file at every start)`;
}
