/**
 * bench/server-start: how long `appliance serve` and `appliance daemon` take from their start
 * to listening (the line they print then), the CPU they used to get there (user + system, from
 * /proc), and how many modules they load. A peer, the tests and an operator restarting one wait for this.
 *
 *   npm run build && node --import tsx bench/server-start.ts [--runs 8] [--compare OTHER_DIST] [--dir DIR]
 *
 * `--compare` names another build's dist directory (e.g. a worktree of an earlier commit, built
 * with `npx tsc -p tsconfig.build.json`): the two are started in turns (alternated, so the
 * machine's load falls on both alike) and printed side by side. Each build starts on a home of
 * its own made by `appliance init` (no volume: the start itself is measured). Printed: medians.
 * Node's flags are those bin/appliance gives a server.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { childEnv } from './node-start.js';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : def;
}
const RUNS = Number(arg('runs', '8'));
const dists = [resolve(__dirname, '..', 'dist'), ...(process.argv.includes('--compare') ? [resolve(arg('compare', ''))] : [])];
const dir = mkdtempSync(join(arg('dir', tmpdir()), 'tandem-server-start-'));
/** Flags bin/appliance gives `serve` and `daemon`. */
const SERVER_FLAGS = ['--max-semi-space-size=4', '--initial-old-space-size=64'];
/** Loaded with -r into the measured process: counts the modules in require's cache when it ends. */
const COUNTER = join(dir, 'count.cjs');
writeFileSync(COUNTER, "process.on('exit', () => { require('fs').writeSync(2, `\\nmodules ${Object.keys(require.cache).length}\\n`); });\n");

interface Sample { readyMs: number; cpuMs: number; modules: number }

function main(dist: string): string {
  return join(dist, 'appliance', 'cli', 'bin.cjs');
}

async function init(dist: string, name: string): Promise<string> {
  const home = join(dir, name);
  const child = spawn(process.execPath, [main(dist), '--home', home, 'init', '--name', name], { env: childEnv(true), stdio: 'ignore' });
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  if (code !== 0) throw new Error(`init with ${dist} exited ${code}`);
  return home;
}

/** CPU (user + system) of a process from /proc/PID/stat, in ms. */
function cpuMs(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

async function once(dist: string, home: string, command: 'serve' | 'daemon'): Promise<Sample> {
  const t0 = process.hrtime.bigint();
  const child = spawn(process.execPath, [...SERVER_FLAGS, '-r', COUNTER, main(dist), '--home', home, '--json', command, '--listen', '127.0.0.1:0'], { env: childEnv(true), stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => void (stderr += d.toString()));
  await new Promise<void>((res, rej) => {
    child.stdout!.once('data', () => res());
    child.once('exit', (code) => rej(new Error(`${command} exited ${code} before listening: ${stderr}`)));
  });
  const readyMs = Number(process.hrtime.bigint() - t0) / 1e6;
  const cpu = cpuMs(child.pid!);
  child.kill('SIGTERM');
  await new Promise((r) => child.once('exit', r));
  const modules = Number(/modules (\d+)/.exec(stderr)?.[1] ?? NaN);
  return { readyMs, cpuMs: cpu, modules };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

async function run(): Promise<void> {
  const homes = await Promise.all(dists.map((d, i) => init(d, `h${i}`)));
  console.log(`server start: ${RUNS} alternated runs each, medians`);
  for (const command of ['serve', 'daemon'] as const) {
    const samples = dists.map(() => [] as Sample[]);
    for (let r = 0; r < RUNS; r++) for (let i = 0; i < dists.length; i++) samples[i]!.push(await once(dists[i]!, homes[i]!, command));
    dists.forEach((d, i) => {
      const s = samples[i]!;
      console.log(`${command.padEnd(6)} ${d.padEnd(40)} ready ${median(s.map((x) => x.readyMs)).toFixed(0).padStart(5)} ms  CPU ${median(s.map((x) => x.cpuMs)).toFixed(0).padStart(5)} ms  modules ${median(s.map((x) => x.modules))}`);
    });
  }
}

run().finally(() => rmSync(dir, { recursive: true, force: true })).catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
