/**
 * Run the real `appliance` CLI as a child process in tests.
 *
 * It runs the command package.json's "bin" names (bin/appliance, the launcher that starts the
 * compiled dist/appliance/cli/bin.cjs: `npm run build` first, as `npm test` does). Set
 * TANDEM_TEST_CLI=source to run appliance/cli/bin.cts from the sources through tsx instead
 * (slower start).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(__dirname, '../..');
/** The command package.json's "bin" names: what `npx appliance` and an installed package run. */
export const BIN = join(ROOT, (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { bin: { appliance: string } }).bin.appliance);
/** The compiled entry point the launcher starts. */
export const DIST_MAIN = join(ROOT, 'dist', 'appliance', 'cli', 'bin.cjs');
const SOURCE_MAIN = join(ROOT, 'appliance', 'cli', 'bin.cts');

/** The program and arguments that start the CLI. */
export function cliCommand(): { file: string; args: string[] } {
  if (process.env.TANDEM_TEST_CLI === 'source') return { file: process.execPath, args: ['--import', 'tsx', SOURCE_MAIN] };
  if (!existsSync(DIST_MAIN)) throw new Error(`${DIST_MAIN} is missing: run \`npm run build\` before the CLI tests`);
  return { file: BIN, args: [] };
}

export interface CliResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

export interface CliOptions {
  readonly env?: Record<string, string>;
  readonly cwd?: string;
}

/** Start the CLI without waiting (for kill -9 tests). CI=true keeps progress bars off. */
export function spawnCli(args: readonly string[], opts: CliOptions = {}): ChildProcess {
  const { file, args: start } = cliCommand();
  return spawn(file, [...start, ...args], {
    cwd: opts.cwd ?? ROOT,
    env: { ...process.env, CI: 'true', ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

/** Wait for a started CLI to end and collect its output. */
export function collect(child: ChildProcess): Promise<CliResult> {
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => void (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => void (stderr += d.toString()));
  return new Promise((resolvePromise, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolvePromise({ code, signal, stdout, stderr }));
  });
}

/** Run the CLI to completion. */
export function cli(args: readonly string[], opts: CliOptions = {}): Promise<CliResult> {
  return collect(spawnCli(args, opts));
}

/** Run the CLI with --json and parse stdout (throws with the output if it is not JSON). */
export async function cliJson<T = any>(args: readonly string[], opts: CliOptions = {}): Promise<CliResult & { json: T }> {
  const r = await cli([...args, '--json'], opts);
  try {
    return { ...r, json: JSON.parse(r.stdout) as T };
  } catch {
    throw new Error(`not JSON (exit ${r.code}): stdout=${r.stdout} stderr=${r.stderr}`);
  }
}

/**
 * Poll `path` until its first `want.length` bytes are `want` (a restore or an apply, which write
 * in block order, has begun writing), or until `done` settles (the process ended first).
 */
export async function untilWritten(path: string, want: Buffer, done: Promise<unknown>): Promise<void> {
  let ended = false;
  void done.then(() => (ended = true), () => (ended = true));
  const head = Buffer.alloc(want.length);
  const fd = openSync(path, 'r');
  try {
    while (!ended) {
      readSync(fd, head, 0, head.length, 0);
      if (head.equals(want)) return;
      await new Promise((r) => setTimeout(r, 1));
    }
  } finally {
    closeSync(fd);
  }
}

/** A temp directory removed when the test (or suite) ends. */
export function tempDir(t: { after(fn: () => void): void }, prefix = 'tandem-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A tmpfs of `size` (mount's syntax: 8m) mounted on a new directory, unmounted and removed when
 * the test ends: a small disk to fill. Needs root; otherwise the test is skipped and null
 * returned. Grow it with `mount -o remount,size=64m DIR`.
 */
export function smallTmpfs(t: { after(fn: () => void): void; skip(message?: string): void }, size: string): string | null {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-full-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'pipe' });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    t.skip(`cannot mount a small tmpfs here (${(e as Error).message.split('\n')[0]}); run as root to test a full disk`);
    return null;
  }
  t.after(() => {
    execFileSync('umount', ['-l', dir]);
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/**
 * A fresh ext4 filesystem of `mib` MiB (an image file on a loop device: `mkfs.ext4`, `mount -o
 * loop`), unmounted when the test ends; null, the test skipped with the reason, when this is not
 * root or mkfs.ext4 / loop devices are missing. For a full disk that behaves as a real one does
 * (O_DIRECT, ext4 freeing a deleted file's blocks only once its journal commits), where a tmpfs
 * does neither.
 */
export function smallExt4(t: { after(fn: () => void): void; skip(message?: string): void }, mib: number): string | null {
  if (process.getuid?.() !== 0) {
    t.skip('not root: mounting a small ext4 filesystem needs root (run the tests as root to cover a full disk)');
    return null;
  }
  const dir = mkdtempSync(join(tmpdir(), 'tandem-ext4-'));
  const image = `${dir}.img`;
  try {
    execFileSync('truncate', ['-s', `${mib}M`, image], { stdio: 'pipe' });
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', image], { stdio: 'pipe' }); // no blocks reserved for root: free is free
    execFileSync('mount', ['-o', 'loop', image, dir], { stdio: 'pipe' });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    rmSync(image, { force: true });
    t.skip(`cannot make and mount a small ext4 filesystem here (${(e as Error).message.split('\n')[0]}): needs mkfs.ext4 and loop devices`);
    return null;
  }
  t.after(() => {
    execFileSync('umount', ['-l', dir]); // lazily: a store the test closes later may still hold it
    rmSync(dir, { recursive: true, force: true });
    rmSync(image, { force: true });
  });
  return dir;
}

/**
 * `backing` attached as a loop block device (losetup), detached when the test ends. Needs root
 * and loop devices; otherwise the test is skipped and null returned.
 */
export function loopDevice(t: { after(fn: () => void): void; skip(message?: string): void }, backing: string): string | null {
  let dev: string;
  try {
    dev = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  } catch (e) {
    t.skip(`losetup refused (${(e as Error).message.split('\n')[0]}): no loop devices here`);
    return null;
  }
  t.after(() => execFileSync('losetup', ['-d', dev]));
  return dev;
}
