/**
 * Real appliances for integration tests: homes made by `appliance init`, servers started with
 * `appliance serve --listen 127.0.0.1:0` as child processes, CLI commands run against a home.
 * Runs the compiled CLI (dist/: `npm run build` first), see ./cli.ts.
 *
 * ```ts
 * const a = await initHome(t, 'site-a');
 * const srv = await startServe(t, a);          // srv.url, srv.kill('SIGKILL'), srv.stop()
 * const r = await cli(a, 'peer', 'list');       // {code, stdout, stderr, json}
 * ```
 */
import type { ChildProcess } from 'node:child_process';
import assert from 'node:assert/strict';
import { closeSync, cpSync, mkdtempSync, openSync, readFileSync, readdirSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { RemotePeer } from '../../api/client.js';
import { spawnCli, collect, tempDir } from './cli.js';
import { writeRandom } from './files.js';

export { tempDir } from './cli.js';

export interface TestHome {
  readonly dir: string;
  readonly name: string;
  readonly token: string;
  readonly fingerprint: string;
}

export interface CliRun {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
  /** stdout parsed as JSON when it is JSON (commands run with --json), else undefined. */
  readonly json: any;
}

type TestCtx = { after(fn: () => void | Promise<void>): void };

/** Run `appliance --home HOME --json ...args` to completion. */
export async function cli(home: TestHome | string, ...args: string[]): Promise<CliRun> {
  return startCli(home, ...args).done;
}

/** Start `appliance --home HOME --json ...args` without waiting (for kill tests). */
export function startCli(home: TestHome | string, ...args: string[]): { child: ChildProcess; done: Promise<CliRun> } {
  const dir = typeof home === 'string' ? home : home.dir;
  const child = spawnCli(['--home', dir, '--json', ...args]);
  const done = collect(child).then((r) => {
    let json: unknown;
    try {
      json = JSON.parse(r.stdout);
    } catch {
      json = undefined;
    }
    return { ...r, json };
  });
  return { child, done };
}

/** `appliance init --name NAME` in a fresh temp dir (removed after the test). */
export async function initHome(t: TestCtx, name: string): Promise<TestHome> {
  const dir = join(tempDir(t, `tandem-${name}-`), 'home');
  const r = await cli(dir, 'init', '--name', name);
  if (r.code !== 0 || !r.json) throw new Error(`init failed (${r.code}): ${r.stderr}`);
  return { dir, name, token: r.json.token, fingerprint: r.json.fingerprint };
}

export interface Served {
  readonly url: string;
  readonly fingerprint: string;
  readonly child: ChildProcess;
  /** SIGTERM and wait: resolves with the exit code. */
  stop(): Promise<number | null>;
  /** Send a signal (e.g. SIGKILL) and wait for the process to end. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** What it wrote on stderr so far. */
  stderr(): string;
}

/** Longest a server may take to print its URL (a cold start on a loaded 2-core machine). */
const SERVE_START_TIMEOUT_MS = 30_000;

/** `appliance serve --listen 127.0.0.1:0`; resolves once it printed the URL it bound. Stopped after the test. */
export async function startServe(t: TestCtx, home: TestHome | string, listen = '127.0.0.1:0', env: Record<string, string> = {}): Promise<Served> {
  const dir = typeof home === 'string' ? home : home.dir;
  const child = spawnCli(['--home', dir, '--json', 'serve', '--listen', listen], { env });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => void (stderr += d.toString()));
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  const line = await new Promise<string>((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`serve did not print its URL in ${SERVE_START_TIMEOUT_MS} ms: ${stderr}`)), SERVE_START_TIMEOUT_MS);
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(buf.slice(0, nl));
      }
    });
    void exited.then(([code]) => {
      clearTimeout(timer);
      reject(new Error(`serve exited with ${code} before listening: ${stderr}`));
    });
  });
  const info = JSON.parse(line) as { url: string; fingerprint: string };
  let ended = false;
  void exited.then(() => void (ended = true));
  const kill = async (signal: NodeJS.Signals = 'SIGKILL') => {
    if (ended) return;
    child.kill(signal);
    await exited;
  };
  t.after(() => kill('SIGKILL'));
  return {
    url: info.url,
    fingerprint: info.fingerprint,
    child,
    kill,
    stop: async () => {
      if (!ended) child.kill('SIGTERM');
      const [code] = await exited;
      return code;
    },
    stderr: () => stderr,
  };
}

/** `peer add NAME` on `home` for the served appliance `peer`. */
export async function pair(home: TestHome, name: string, peer: TestHome, served: Served): Promise<void> {
  const r = await cli(home, 'peer', 'add', name, '--url', served.url, '--token', peer.token, '--fingerprint', peer.fingerprint);
  if (r.code !== 0 || r.json?.peer?.name !== name) throw new Error(`peer add failed (${r.code}): ${r.stderr} ${r.stdout}`);
}

/**
 * The usual two-appliance setup of the sync fault tests: `onprem` (a) paired with a served
 * `cloud` (b), and a volume "vol" of `blocks` random 64 KiB blocks registered on a.
 */
export async function pairedWithVolume(t: TestCtx, blocks: number, blockSize = 64 * 1024) {
  const [a, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  const sb = await startServe(t, b);
  await pair(a, 'cloud', b, sb);
  const dir = tempDir(t, 'tandem-faults-');
  const img = join(dir, 'disk.img');
  writeRandom(img, blocks * blockSize);
  const add = await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', `${blockSize / 1024}KiB`);
  assert.equal(add.code, 0, add.stderr);
  return { a, b, sb, dir, img };
}

/**
 * For a failure seen only under a loaded full run: what the home holds now (peers, volumes, the
 * index's files), and a copy of it kept outside the test's temp dirs (not removed) to inspect.
 */
export async function diagnose(home: TestHome): Promise<string> {
  const kept = mkdtempSync(join(tmpdir(), 'tandem-kept-'));
  cpSync(home.dir, kept, { recursive: true });
  const index = join(home.dir, 'store', 'index');
  const files = readdirSync(index).map((f) => `${f} ${statSync(join(index, f)).size}`).join(', ');
  const peers = await cli(home, 'peer', 'list');
  const volumes = await cli(home, 'volume', 'list');
  return `home kept in ${kept}; peer list: ${peers.stdout.trim() || peers.stderr.trim()}; volume list: ${volumes.stdout.trim() || volumes.stderr.trim()}; index: ${files}`;
}

/** A pinned client of a served home (to read its receiving-side counters). */
export function peerClient(b: TestHome, s: Served): RemotePeer {
  return new RemotePeer({ url: s.url, token: b.token, fingerprint: b.fingerprint, name: 'cloud' });
}

/**
 * Flip a byte of the record holding each block in `blocks` (whole blocks' bytes) in the packs of
 * `home`, found by their bytes (the store may be held by a server): disk corruption under the store.
 */
export function damageBlock(home: TestHome, ...blocks: Buffer[]): void {
  const dir = join(home.dir, 'store', 'packs');
  const left = new Set(blocks);
  for (const name of readdirSync(dir).filter((n) => n.endsWith('.pack'))) {
    const pack = readFileSync(join(dir, name));
    const fd = openSync(join(dir, name), 'r+');
    for (const data of [...left]) {
      const at = pack.indexOf(data);
      if (at < 0) continue;
      writeSync(fd, Buffer.from([data[1000]! ^ 0x80]), 0, 1, at + 1000);
      left.delete(data);
    }
    closeSync(fd);
  }
  if (left.size > 0) throw new Error(`${left.size} blocks not found in the packs`);
}
