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
 *   stays committed: the error says so and carries the snapshot result in `details.result`.
 */
import { spawn } from 'node:child_process';
import { childEnv } from '../common/ca.js';
import { TandemError } from '../common/errors.js';
import type { Hooks } from './config/index.js';

/** Output kept per hook for the error message and logs: enough for a diagnostic, bounded. */
const OUTPUT_TAIL_BYTES = 4096;
/** After SIGTERM on timeout, how long a hook gets before SIGKILL. */
const KILL_GRACE_MS = 2000;

export interface HookRun {
  readonly phase: 'pre' | 'post';
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
}

/** Run one hook command to completion (never throws: the outcome is in the result). */
export function runHook(phase: 'pre' | 'post', command: string, timeoutMs: number, env: Record<string, string> = {}, signal?: AbortSignal): Promise<HookRun> {
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
export async function withHooks<T>(hooks: Hooks | null, fn: () => Promise<T>, opts: HookOptions = {}): Promise<T> {
  if (hooks === null || (hooks.pre === null && hooks.post === null)) return fn();
  const runPost = async (): Promise<HookRun | null> => {
    if (hooks.post === null) return null;
    const r = await runHook('post', hooks.post, hooks.timeoutMs, opts.env);
    opts.onHook?.(r);
    return r;
  };
  if (hooks.pre !== null) {
    const pre = await runHook('pre', hooks.pre, hooks.timeoutMs, opts.env, opts.signal);
    opts.onHook?.(pre);
    if (failed(pre)) {
      const post = await runPost();
      // Stopped from outside (the sync's peer refused it, the daemon stopping): that is the
      // reason to report, not the hook killed by it.
      if (opts.signal?.aborted) throw opts.signal.reason;
      const postNote = post === null ? '' : failed(post) ? `; the ${describe(post, hooks.timeoutMs)} as well` : '; the post hook ran';
      throw new TandemError('ERR_HOOK_FAILED', `${describe(pre, hooks.timeoutMs)}: no snapshot was taken${postNote}. Fix the command (or its timeout) in config.yaml and rerun`, {
        details: { phase: 'pre', command: pre.command, exitCode: pre.exitCode, timedOut: pre.timedOut, output: pre.output, snapshotTaken: false },
      });
    }
  }
  let result: T;
  try {
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
