/**
 * Pre/post snapshot hooks: operator commands run around a snapshot (e.g. `fsfreeze -f /data`
 * before, `fsfreeze -u /data` after) so that the image is application-consistent.
 *
 * Contract of {@link withHooks}:
 * - pre runs first (`sh -c`, with a timeout); if it fails or times out the snapshot is not taken
 *   and ERR_HOOK_FAILED is thrown;
 * - post always runs once pre was attempted (a half-done freeze must be undone), whether the
 *   snapshot succeeded or not;
 * - a failing post after a successful snapshot throws ERR_HOOK_FAILED too, but the snapshot
 *   stays committed: the error says so and carries the snapshot result in `details.result`;
 * - a signal that ends the process (SIGINT, SIGTERM, SIGHUP: Ctrl-C, a closed ssh session) from
 *   the pre hook on runs the post hook first (after the pre hook, which it kills if it still
 *   runs), then ends the process as the signal would have; a snapshot not yet started is not
 *   taken, and one under way is stopped before it commits: `fn`'s signal is aborted before the
 *   post hook starts, so a snapshot that commits read nothing after the thaw. A process that
 *   handles the signal itself (the daemon) is left to do so.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { childEnv } from '../common/ca.js';
import { pidAlive } from '../common/pid.cjs';
import { writeFileAtomic } from './home.js';
import { TandemError } from '../common/errors.js';
import type { Hooks } from './config/index.js';

/** Output kept per hook for the error message and logs: enough for a diagnostic, bounded. */
const OUTPUT_TAIL_BYTES = 4096;
/** After SIGTERM on timeout, how long a hook gets before SIGKILL. */
const KILL_GRACE_MS = 2000;

export interface HookRun {
  /** pre/post: snapshot hooks; check: a drill's check of the recovered server (recovery/drill-check.ts). */
  readonly phase: 'pre' | 'post' | 'check';
  readonly command: string;
  readonly exitCode: number | null;
  readonly signal: string | null;
  readonly timedOut: boolean;
  readonly output: string;
  readonly durationMs: number;
}

export interface HookOptions {
  /** Extra environment for the hook (the scheduler sets TANDEM_GROUP and TANDEM_VOLUMES). */
  readonly env?: Record<string, string>;
  /** Called after each hook ran (for logs). */
  readonly onHook?: (run: HookRun) => void;
  /** Aborting kills a running pre hook (the daemon is stopping, a sync's peer refused it) and skips the snapshot; post still runs, and the abort's reason is what is thrown. */
  readonly signal?: AbortSignal;
  /**
   * Directory of the post hooks owed (HOME/run/hooks): one file per snapshot between its hooks,
   * from before the pre hook until the post hook ran. What a process killed with kill -9 (or
   * lost) owed is run by {@link runOwedPostHooks}.
   */
  readonly ledger?: string;
}

/** Run one hook command to completion (never throws: the outcome is in the result). */
export function runHook(phase: HookRun['phase'], command: string, timeoutMs: number, env: Record<string, string> = {}, signal?: AbortSignal): Promise<HookRun> {
  const started = Date.now();
  return new Promise((resolve) => {
    // Own process group, so a timeout kills the whole pipeline the shell started.
    const child = spawn('sh', ['-c', command], { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: childEnv({ ...process.env, ...env, TANDEM_HOOK: phase }) });
    let output = Buffer.alloc(0);
    const collect = (c: Buffer) => {
      output = Buffer.concat([output, c]);
      if (output.length > OUTPUT_TAIL_BYTES) output = output.subarray(output.length - OUTPUT_TAIL_BYTES);
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    const kill = (sig: NodeJS.Signals) => {
      try {
        process.kill(-child.pid!, sig);
      } catch {
        // already gone
      }
    };
    const stop = () => {
      kill('SIGTERM');
      killTimer ??= setTimeout(() => kill('SIGKILL'), KILL_GRACE_MS);
    };
    const timer = setTimeout(() => {
      timedOut = true;
      stop();
    }, timeoutMs);
    signal?.addEventListener('abort', stop, { once: true });
    if (signal?.aborted) stop();
    const finish = (exitCode: number | null, sig: string | null) => {
      clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      signal?.removeEventListener('abort', stop);
      resolve({ phase, command, exitCode, signal: sig, timedOut, output: output.toString('utf8').trim(), durationMs: Date.now() - started });
    };
    child.on('error', (e) => {
      collect(Buffer.from(String(e.message)));
      finish(null, null);
    });
    child.on('close', (code, signal) => finish(code, signal));
  });
}

function failed(r: HookRun): boolean {
  return r.timedOut || r.exitCode !== 0;
}

function describe(r: HookRun, timeoutMs: number): string {
  const how = r.timedOut ? `did not finish within ${Math.round(timeoutMs / 1000)}s and was killed` : r.exitCode === null ? `was killed by ${r.signal ?? 'a signal'}` : `exited with status ${r.exitCode}`;
  return `${r.phase} hook \`${r.command}\` ${how}${r.output ? `; output: ${r.output.split('\n').slice(-5).join(' | ')}` : ''}`;
}

/**
 * Run `fn` between the pre and post hooks (see the module contract). `hooks` null runs `fn` alone.
 */
export async function withHooks<T>(hooks: Hooks | null, fn: (thawing: AbortSignal) => Promise<T>, opts: HookOptions = {}): Promise<T> {
  // Aborted when a signal runs the post hook early: the snapshot under way must not commit.
  const thawing = new AbortController();
  if (hooks === null || (hooks.pre === null && hooks.post === null)) return fn(thawing.signal);
  // Once only, whoever asks first: the snapshot's end or a signal. Never while the pre hook still
  // runs (a thaw before the freeze would leave the file system frozen): the pre hook has its timeout.
  let preDone!: () => void;
  const preSettled = new Promise<void>((resolve) => (preDone = resolve));
  let postRun: Promise<HookRun | null> | null = null;
  const runPost = (): Promise<HookRun | null> => (postRun ??= (async () => {
    await preSettled;
    if (hooks.post === null) return null;
    const r = await runHook('post', hooks.post, hooks.timeoutMs, opts.env);
    opts.onHook?.(r);
    return r;
  })());
  // A signal also stops a pre hook still running (killed, as on its timeout): the thaw need not
  // wait for a freeze that hangs.
  const stopPre = new AbortController();
  const release = hooks.post === null ? () => {} : postOnSignals((sig) => {
    const why = new TandemError('ERR_HOOK_FAILED', `${sig} arrived between the hooks: the post hook ran, no snapshot was taken`);
    stopPre.abort(why);
    thawing.abort(why);
    return runPost();
  });
  const entry = hooks.post !== null && opts.ledger !== undefined ? owe(opts.ledger, hooks.post, hooks.timeoutMs, opts.env ?? {}) : null;
  try {
    const preSignal = opts.signal ? AbortSignal.any([opts.signal, stopPre.signal]) : stopPre.signal;
    return await hooked(hooks, () => fn(thawing.signal), runPost, () => postRun !== null, preDone, preSignal, opts);
  } finally {
    release();
    if (entry !== null) rmSync(entry, { force: true });
  }
}

/** A post hook owed, as the ledger keeps it. */
interface OwedPost {
  readonly pid: number;
  /** The process's start time (/proc/PID/stat, field 22): a pid reused by another process is told apart. */
  readonly pidStart: string | null;
  /** The kernel's boot id: a freeze does not outlive a restart of the machine. */
  readonly bootId: string | null;
  readonly post: string;
  readonly timeoutMs: number;
  readonly env: Record<string, string>;
  readonly since: string;
}

function procStart(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

function bootId(): string | null {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return null;
  }
}

/** Record the post hook this process owes from now on; returns the entry's path. */
function owe(ledger: string, post: string, timeoutMs: number, env: Record<string, string>): string {
  mkdirSync(ledger, { recursive: true, mode: 0o750 });
  const path = join(ledger, `${Date.now()}-${randomBytes(4).toString('hex')}.json`);
  const owed: OwedPost = { pid: process.pid, pidStart: procStart(process.pid), bootId: bootId(), post, timeoutMs, env, since: new Date().toISOString() };
  writeFileAtomic(path, JSON.stringify(owed) + '\n', 0o600);
  return path;
}

export interface OwedPostOutcome {
  readonly since: string;
  readonly post: string;
  /** ran: run now, on behalf of the process that died; restarted: the machine restarted since, nothing to undo. */
  readonly outcome: 'ran' | 'restarted';
  readonly run?: HookRun;
}

/**
 * Run the post hooks that processes which ended between their hooks (kill -9, a crash) owed, so
 * that what their pre hooks froze is thawed; entries of processes still running are left alone,
 * and those from before a restart of the machine are dropped (nothing of a freeze survives it).
 * Each entry is removed once handled. `dryRun` only lists them (doctor).
 */
export async function runOwedPostHooks(ledger: string, dryRun = false): Promise<OwedPostOutcome[]> {
  let names: string[];
  try {
    names = readdirSync(ledger).filter((n) => n.endsWith('.json'));
  } catch {
    return [];
  }
  const out: OwedPostOutcome[] = [];
  const boot = bootId();
  for (const name of names.sort()) {
    const path = join(ledger, name);
    let owed: OwedPost;
    try {
      owed = JSON.parse(readFileSync(path, 'utf8')) as OwedPost;
    } catch {
      continue; // being written (atomically: never half) or gone
    }
    if (owed.bootId !== null && boot !== null && owed.bootId !== boot) {
      if (!dryRun) rmSync(path, { force: true });
      out.push({ since: owed.since, post: owed.post, outcome: 'restarted' });
      continue;
    }
    if (pidAlive(owed.pid) && (owed.pidStart === null || procStart(owed.pid) === owed.pidStart)) continue; // still between its hooks
    if (dryRun) {
      out.push({ since: owed.since, post: owed.post, outcome: 'ran' });
      continue;
    }
    const run = await runHook('post', owed.post, owed.timeoutMs, owed.env);
    rmSync(path, { force: true });
    out.push({ since: owed.since, post: owed.post, outcome: 'ran', run });
  }
  return out;
}

/** Signals that end a process by default, and that an operator or a closed terminal sends. */
const ENDING_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
/** The post hooks of the snapshots between their hooks in this process, run on a signal. */
const postsOnSignal = new Set<(sig: NodeJS.Signals) => Promise<HookRun | null>>();

function onEndingSignal(sig: NodeJS.Signals): void {
  // Another listener (the daemon, a server) owns this signal: it stops its jobs, whose post
  // hooks then run. This one is first in line (prepended), so theirs are still counted.
  if (process.listenerCount(sig) > 1) return;
  process.stderr.write(`${sig}: running the post hook before exiting\n`);
  void Promise.allSettled([...postsOnSignal].map((post) => post(sig))).finally(() => {
    for (const s of ENDING_SIGNALS) process.off(s, onEndingSignal);
    process.kill(process.pid, sig); // now with no listener: ends the process as the signal does
  });
}

/** Whether a snapshot of this process is between its hooks (its post hook, the thaw, still to run). */
export function thawPending(): boolean {
  return postsOnSignal.size > 0;
}

/**
 * Run now the post hooks owed by every snapshot of this process that is between its hooks; each
 * such snapshot stops before it commits. A server that stops (serve, daemon) calls this once its
 * forwarded commands had their time to finish: it owns the ending signals, and must not exit
 * with a file system frozen by a command it ran for a CLI.
 */
export function thawHookedSnapshots(sig: NodeJS.Signals): Promise<unknown> {
  return Promise.allSettled([...postsOnSignal].map((post) => post(sig)));
}

/**
 * From the pre hook on, a signal that would end this process (Ctrl-C, a closed ssh session,
 * `kill`) runs the post hook first, then ends the process as the signal would have: otherwise
 * `fsfreeze -f` would leave the production file system frozen. A process that handles the signal
 * itself is left to do so. Returns the function that withdraws this post hook.
 */
function postOnSignals(runPost: (sig: NodeJS.Signals) => Promise<HookRun | null>): () => void {
  if (postsOnSignal.size === 0) for (const s of ENDING_SIGNALS) process.prependListener(s, onEndingSignal);
  postsOnSignal.add(runPost);
  return () => {
    postsOnSignal.delete(runPost);
    if (postsOnSignal.size === 0) for (const s of ENDING_SIGNALS) process.off(s, onEndingSignal);
  };
}

async function hooked<T>(hooks: Hooks, fn: () => Promise<T>, runPost: () => Promise<HookRun | null>, posted: () => boolean, preDone: () => void, preSignal: AbortSignal, opts: HookOptions): Promise<T> {
  if (hooks.pre === null) preDone();
  if (hooks.pre !== null) {
    const pre = await runHook('pre', hooks.pre, hooks.timeoutMs, opts.env, preSignal).finally(preDone);
    opts.onHook?.(pre);
    if (failed(pre)) {
      const post = await runPost();
      // Stopped from outside (the sync's peer refused it, the daemon stopping, a signal or a
      // server stopping while it ran): that is the reason to report, not the hook killed by it.
      if (preSignal.aborted) throw preSignal.reason;
      const postNote = post === null ? '' : failed(post) ? `; the ${describe(post, hooks.timeoutMs)} as well` : '; the post hook ran';
      throw new TandemError('ERR_HOOK_FAILED', `${describe(pre, hooks.timeoutMs)}: no snapshot was taken${postNote}. Fix the command (or its timeout) in config.yaml and rerun`, {
        details: { phase: 'pre', command: pre.command, exitCode: pre.exitCode, timedOut: pre.timedOut, output: pre.output, snapshotTaken: false },
      });
    }
  }
  let result: T;
  try {
    // A signal during the pre hook ran the post hook already: the snapshot would not be consistent.
    if (posted()) throw new TandemError('ERR_HOOK_FAILED', 'a signal arrived while the pre hook ran: the post hook ran, no snapshot was taken');
    result = await fn();
  } catch (e) {
    const post = await runPost();
    if (post !== null && failed(post)) {
      // The snapshot error is what the operator must see first; the post failure rides along.
      (e as { postHookError?: string }).postHookError = describe(post, hooks.timeoutMs);
    }
    throw e;
  }
  const post = await runPost();
  if (post !== null && failed(post)) {
    throw new TandemError('ERR_HOOK_FAILED', `${describe(post, hooks.timeoutMs)}; the snapshot itself succeeded and is kept. Check that the application was resumed (e.g. thaw the filesystem by hand), then fix the command in config.yaml`, {
      details: { phase: 'post', command: post.command, exitCode: post.exitCode, timedOut: post.timedOut, output: post.output, snapshotTaken: true, result: result as unknown },
    });
  }
  return result;
}
