/**
 * bench/daemon-rss: the peak RSS of a daemon replicating several volumes at once.
 *
 *   npm run build && node --import tsx bench/daemon-rss.ts [--size 512MiB] [--volumes 2] [--runs 3] [--dir DIR]
 *
 * Each run, from nothing: appliance A (`onprem`) and B (`cloud`, `appliance serve`) are made by
 * `appliance init` in a temp directory under --dir and paired; A gets --volumes volumes of --size
 * random bytes (every block distinct: a first replication sends them all), one policy for all and
 * replication to B in config.yaml, so every job is due at once when `appliance daemon` starts on
 * A (the scheduler runs two at a time: appliance/scheduler/runner.ts). The run ends when each
 * volume's job is done. The images are written once and kept warm in the page cache for every run;
 * the homes are new each run (the first replication of each volume is what is measured).
 *
 * Printed per run: VmHWM of A's daemon (from /proc/PID/status, read before it is stopped: the
 * figure the target is about, <= 256 MB), of B's server, the time from the daemon's start to the
 * last job's end, and for how long two jobs ran at once (from their log lines).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { once } from 'node:events';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseSize } from '../appliance/cli/output.js';
import { APPLIANCE, childEnv, peakRss } from './node-start.js';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : def;
}
const SIZE = parseSize(arg('size', '512MiB'));
const VOLUMES = Number(arg('volumes', '2'));
const RUNS = Number(arg('runs', '3'));
const dir = mkdtempSync(join(arg('dir', tmpdir()), 'tandem-daemon-rss-'));
/** A run that takes longer than this is a failure (the jobs hang), not a figure. */
const RUN_TIMEOUT_MS = 10 * 60_000;
/** The target of the issue: a daemon replicating two 512 MiB volumes at once. */
const TARGET_MB = 256;
/** Images are written in pieces of this size. */
const FILL_CHUNK = 64 * 1024 * 1024;
const MB = 1e6;

/** RssAnon and RssFile of a live process now, in bytes (null once it is gone). */
function rssParts(pid: number): { anon: number; file: number } | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kB = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(status)?.[1] ?? 0) * 1024;
    return { anon: kB('RssAnon'), file: kB('RssFile') + kB('RssShmem') };
  } catch {
    return null;
  }
}

/** `appliance --home HOME --json ...args` to completion: its parsed stdout. */
async function appliance(home: string, ...args: string[]): Promise<any> {
  const child = spawn(APPLIANCE, ['--home', home, '--json', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  const [code] = (await once(child, 'close')) as [number];
  if (code !== 0) throw new Error(`appliance ${args.join(' ')} failed (${code}): ${err}`);
  return JSON.parse(out);
}

interface Running {
  readonly child: ChildProcess;
  readonly url: string;
  /** Its stderr's JSON lines (pino) so far, each with the time it was read. */
  readonly lines: Array<{ at: number; o: Record<string, unknown> }>;
  stderr(): string;
}

/** `appliance --home HOME --json CMD --listen 127.0.0.1:0` (serve or daemon), once it printed its URL. */
async function start(home: string, cmd: 'serve' | 'daemon'): Promise<Running> {
  const child = spawn(APPLIANCE, ['--home', home, '--json', cmd, '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  const lines: Running['lines'] = [];
  let err = '';
  let partial = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    partial += d.toString();
    for (let nl = partial.indexOf('\n'); nl >= 0; nl = partial.indexOf('\n')) {
      const line = partial.slice(0, nl);
      partial = partial.slice(nl + 1);
      try {
        lines.push({ at: performance.now(), o: JSON.parse(line) as Record<string, unknown> });
      } catch {
        // not a log line
      }
    }
  });
  const exited = once(child, 'exit').then(() => {
    throw new Error(`${cmd} exited before printing its URL: ${err}`);
  });
  const [first] = (await Promise.race([once(child.stdout!, 'data'), exited])) as [Buffer];
  return { child, url: (JSON.parse(first.toString().split('\n')[0]!) as { url: string }).url, lines, stderr: () => err };
}

async function stop(r: Running): Promise<void> {
  if (r.child.exitCode !== null || r.child.signalCode !== null) return;
  const ended = once(r.child, 'exit');
  r.child.kill('SIGTERM');
  await ended;
}

function writeImage(path: string, bytes: number): void {
  const buf = Buffer.alloc(Math.min(FILL_CHUNK, bytes));
  const fd = openSync(path, 'w');
  try {
    for (let off = 0; off < bytes; off += buf.length) {
      const n = Math.min(buf.length, bytes - off);
      randomFillSync(buf, 0, n);
      writeSync(fd, buf, 0, n, off);
    }
  } finally {
    closeSync(fd);
  }
}

interface Result {
  daemonMB: number;
  /** Anonymous and file-backed (with shared) RSS at the largest RSS sampled. */
  anonMB: number;
  fileMB: number;
  serverMB: number;
  seconds: number;
  /** Seconds during which two jobs ran at once. */
  overlapSeconds: number;
}

/** The time during which at least two of `spans` ([start, end) each) run at once. */
function overlap(spans: Array<[number, number]>): number {
  const edges = spans.flatMap(([s, e]) => [[s, 1], [e, -1]] as Array<[number, number]>).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let open = 0;
  let from = 0;
  let total = 0;
  for (const [t, d] of edges) {
    if (open >= 2) total += t - from;
    open += d;
    from = t;
  }
  return total;
}

async function run(k: number, images: string[]): Promise<Result> {
  const runDir = join(dir, `run-${k}`);
  mkdirSync(runDir);
  const a = join(runDir, 'onprem');
  const b = join(runDir, 'cloud');
  const [, ib] = await Promise.all([appliance(a, 'init', '--name', 'onprem'), appliance(b, 'init', '--name', 'cloud')]);
  const server = await start(b, 'serve');
  let daemon: Running | null = null;
  try {
    await appliance(a, 'peer', 'add', 'cloud', '--url', server.url, '--token', ib.token, '--fingerprint', ib.fingerprint);
    for (const [i, img] of images.entries()) await appliance(a, 'volume', 'add', `vol${i}`, '--path', img);
    writeFileSync(join(a, 'config.yaml'), 'appliance: { name: onprem }\npolicies:\n  silver: { rpo: 1h }\nassign:\n  - match: "*"\n    policy: silver\nreplication:\n  peer: cloud\n');
    const t0 = performance.now();
    daemon = await start(a, 'daemon');
    const d = daemon;
    const deadline = Date.now() + RUN_TIMEOUT_MS;
    // The parts of the largest RSS sampled (every 20 ms: the high-water mark itself is VmHWM).
    let top = { anon: 0, file: 0 };
    const sample = setInterval(() => {
      const p = rssParts(d.child.pid!);
      if (p && p.anon + p.file > top.anon + top.file) top = p;
    }, 20);
    const ends = () => d.lines.filter((l) => l.o.msg === 'job done' || l.o.msg === 'job failed');
    while (ends().length < images.length) {
      if (Date.now() > deadline) throw new Error(`the jobs did not end within ${RUN_TIMEOUT_MS / 1000} s:\n${d.stderr()}`);
      if (d.child.exitCode !== null) throw new Error(`the daemon exited:\n${d.stderr()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    clearInterval(sample);
    const failed = ends().find((l) => l.o.msg === 'job failed');
    if (failed) throw new Error(`a job failed: ${JSON.stringify(failed.o)}`);
    const seconds = (Math.max(...ends().map((l) => l.at)) - t0) / 1000;
    return { daemonMB: peakRss(d.child.pid!) / MB, anonMB: top.anon / MB, fileMB: top.file / MB, serverMB: peakRss(server.child.pid!) / MB, seconds, overlapSeconds: overlap(jobSpans(d)) / 1000 };
  } finally {
    if (daemon) await stop(daemon);
    await stop(server);
    rmSync(runDir, { recursive: true, force: true });
  }
}

/** Each job's span, from its 'job started' log line to its end. */
function jobSpans(d: Running): Array<[number, number]> {
  const units = new Map<string, { start?: number; end?: number }>();
  for (const { at, o } of d.lines) {
    if (typeof o.unit !== 'string') continue;
    const u = units.get(o.unit) ?? {};
    if (o.msg === 'job started') u.start ??= at;
    if (o.msg === 'job done' || o.msg === 'job failed') u.end ??= at;
    units.set(o.unit, u);
  }
  return [...units.values()].filter((u) => u.start !== undefined && u.end !== undefined).map((u) => [u.start!, u.end!]);
}

async function main(): Promise<void> {
  process.stderr.write(`bench/daemon-rss: ${VOLUMES} volumes of ${SIZE / 1024 / 1024} MiB, ${RUNS} runs, in ${dir}\n`);
  const images = Array.from({ length: VOLUMES }, (_, i) => join(dir, `vol${i}.img`));
  for (const img of images) writeImage(img, SIZE);
  const results: Result[] = [];
  try {
    for (let k = 0; k < RUNS; k++) {
      const r = await run(k, images);
      results.push(r);
      process.stderr.write(`  run ${k + 1}: daemon peak RSS ${r.daemonMB.toFixed(1)} MB (sampled top: ${r.anonMB.toFixed(1)} anon + ${r.fileMB.toFixed(1)} file), server ${r.serverMB.toFixed(1)} MB, ${r.seconds.toFixed(1)} s, jobs at once for ${r.overlapSeconds.toFixed(1)} s\n`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const d = results.map((r) => r.daemonMB);
  process.stdout.write(
    [
      `command: node --import tsx bench/daemon-rss.ts ${process.argv.slice(2).join(' ')}`.trimEnd(),
      `${VOLUMES} volumes of ${SIZE / 1024 / 1024} MiB replicated at once by a daemon, ${RUNS} runs (VmHWM, MB = 10^6 bytes)`,
      'run  daemon MB  anon+file at top sampled  server MB  seconds  jobs at once (s)',
      ...results.map((r, i) => `${String(i + 1).padStart(3)}  ${r.daemonMB.toFixed(1).padStart(9)}  ${`${r.anonMB.toFixed(1)} + ${r.fileMB.toFixed(1)}`.padStart(23)}  ${r.serverMB.toFixed(1).padStart(9)}  ${r.seconds.toFixed(1).padStart(7)}  ${r.overlapSeconds.toFixed(1).padStart(16)}`),
      `daemon peak RSS ${Math.min(...d).toFixed(1)}-${Math.max(...d).toFixed(1)} MB (target <= ${TARGET_MB} MB: ${d.filter((x) => x <= TARGET_MB).length} of ${d.length} runs)`,
      '',
    ].join('\n'),
  );
}

main().catch((e) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exit(1);
});
