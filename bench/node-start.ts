/**
 * The `appliance` command the benches run, what starting Node costs on this machine apart
 * from anything Tandem does, and a process's peak RSS as the benches read it.
 *
 * The benches run bin/appliance, the launcher package.json's "bin" names, as an operator does.
 * NODE_EXTRA_CA_CERTS, when set, makes Node 20 read and parse that certificate file at every
 * start, before any JavaScript runs (here it names the system bundle: 80-95 ms per process). The
 * launcher keeps it from Node's start, and the appliance loads it only where it checks servers
 * against CAs (common/ca.ts). The Node-start line shows `node -e 0` with and without it.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const EXTRA_CA_VAR = 'NODE_EXTRA_CA_CERTS';
const ROOT = resolve(__dirname, '..');
/** The `appliance` command (package.json "bin"). */
export const APPLIANCE = join(ROOT, 'bin', 'appliance');
/** What the launcher starts: it must be built (`npm run build`). */
export const DIST_MAIN = join(ROOT, 'dist', 'appliance', 'cli', 'bin.cjs');

/** Runs of `node -e 0` each way; the median is given. */
const RUNS = 7;

/** True when the variable is set here, so a figure without it means something. */
const extraCaSet = process.env[EXTRA_CA_VAR] !== undefined;

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
  return `node -e 0 (median of ${RUNS}): ${s.ms.toFixed(0)} ms here, ${s.withoutExtraCaMs.toFixed(0)} ms without ${EXTRA_CA_VAR} (set in this environment: Node reads that file at every start; bin/appliance keeps it from Node's start)`;
}

/** Peak RSS (VmHWM) of a live process, in bytes (0 once it is gone). */
export function peakRss(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}
