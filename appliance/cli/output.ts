/**
 * Shared plumbing for CLI subcommands: global options, `--json` output, errors and exit codes.
 *
 * Contract for every subcommand (see DESIGN.md, "The user's surface"):
 * - `--json`: exactly one JSON document on stdout, nothing else there; progress/logs on stderr.
 * - exit 0 done, 1 failed (the message says what to do next), 2 bad usage.
 * - Errors are TandemErrors from common/errors.ts; anything else is reported as ERR_INTERNAL.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { Command } from 'commander';
import { TandemError, diskFullError, indexError } from '../../common/errors.js';
import { localUser, resolveHome } from './forward-client.cjs';
import { appendAudit, audited, redactArgs } from '../audit.js';

/**
 * Where a command's output goes. In the CLI process it is the process's own streams; when a
 * running server executes a command forwarded from a CLI on the same home (appliance/cli/forward.ts),
 * each command runs with its own captured IO, so concurrent commands never mix output.
 */
export interface CommandIO {
  out(s: string): void;
  err(s: string): void;
  setExit(code: number): void;
  readonly isTTY: boolean;
  /** A command forwarded from a CLI on the same home: its command line and who ran it (for the audit log). */
  readonly forwarded?: { readonly argv: readonly string[]; readonly user: string };
  /** Aborted when the command is to stop (a forwarded one: its CLI went away, Ctrl-C there). */
  readonly signal?: AbortSignal;
}

/**
 * `s` with its control characters but newline and tab shown as escapes (`\x1b`): text that
 * reaches the operator's terminal carries strings from peers and files (a snapshot's origin and
 * labels, a peer's error message, a volume's path), and a peer that put ESC sequences there
 * cleared the screen and retitled the terminal of whoever listed them. JSON output escapes them
 * already; the progress bar draws on stderr itself, not through this.
 */
export function printable(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

const processIO: CommandIO = {
  out: (s) => void process.stdout.write(printable(s)),
  err: (s) => void process.stderr.write(printable(s)),
  setExit: (code) => void (process.exitCode = code),
  get isTTY() {
    return process.stderr.isTTY === true;
  },
};

const ioContext = new AsyncLocalStorage<CommandIO>();

/** The IO of the command running in this async context. */
export function currentIO(): CommandIO {
  return ioContext.getStore() ?? processIO;
}

/**
 * Whether the running command is this process's own command line (a one-shot CLI), not one a
 * server runs for a CLI (forwarded) or for itself (support-bundle) with captured IO.
 */
export function ownCommandLine(): boolean {
  return ioContext.getStore() === undefined;
}

/** The process's own command's stop signal (one-shot CLI), made by the first {@link commandSignal}. */
let processStop: AbortController | null = null;
/** The signal that stopped this process's own command, which then ends the process by it ({@link run}). */
let stoppedBy: NodeJS.Signals | null = null;

/**
 * The signal that stops the running command at its next safe point (a scan before it commits,
 * a restore between blocks, a sync before it commits on the peer), with ERR_INTERRUPTED: for a
 * forwarded command, its CLI going away (Ctrl-C there); for this process's own command, the
 * first SIGINT, SIGTERM or SIGHUP (a second one ends the process at once). Asked by the commands that
 * can run long and stop cleanly (snapshot, sync, restore, verify); a command that never asks
 * keeps Node's default (the process ends), as `serve` and `daemon` handle their signals themselves.
 */
export function commandSignal(): AbortSignal | undefined {
  const io = ioContext.getStore();
  if (io) return io.signal;
  if (!processStop) {
    const ctl = (processStop = new AbortController());
    const stop = (sig: NodeJS.Signals) => {
      if (ctl.signal.aborted) {
        // Never with a file system frozen by a pre hook: its post hook (the thaw) runs first.
        const { thawPending } = require('../hooks.js') as typeof import('../hooks.js');
        if (thawPending()) {
          process.stderr.write(`${sig} again: the post hook (the thaw) runs first, then the command ends\n`);
          return;
        }
        process.stderr.write(`${sig} again: stopping at once\n`);
        process.exit(130);
      }
      process.stderr.write(`\n${sig}: stopping at the next safe point (${sig === 'SIGINT' ? 'Ctrl-C' : sig} again to stop at once)\n`);
      stoppedBy = sig;
      ctl.abort(interrupted(`${sig === 'SIGINT' ? 'Ctrl-C' : sig}`));
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
    process.on('SIGHUP', stop); // a closed terminal or ssh session
  }
  return processStop.signal;
}

/** ERR_INTERRUPTED for a command stopped by `by`. */
export function interrupted(by: string): TandemError {
  return new TandemError('ERR_INTERRUPTED', `stopped by ${by} at a safe point: a snapshot or sync not finished is not committed; a restore to a new image removed it, one onto an existing target left it partly written (restore it again before use). Run the command again to do it`);
}

/** Run `fn` with `io` as the current command IO. */
export function withIO<T>(io: CommandIO, fn: () => Promise<T>): Promise<T> {
  return ioContext.run(io, fn);
}

export interface GlobalOptions {
  /** Resolved home directory (--home, else $TANDEM_HOME, else /var/lib/tandem). */
  readonly home: string;
  readonly json: boolean;
}

/** What a subcommand returns: the JSON document for --json and the human text otherwise. */
export interface CommandResult {
  readonly json: unknown;
  readonly text: string;
  /** Exit code when the command ran but found a failure to report (e.g. verify found problems). */
  readonly exitCode?: 0 | 1;
}

/** Options of the root program (global flags) merged for a subcommand. */
export function globalOptions(cmd: Command): GlobalOptions {
  const all = cmd.optsWithGlobals() as { home?: string; json?: boolean };
  if (all.home !== undefined && all.home.trim() === '') throw new TandemError('ERR_USAGE', '--home is empty: name the appliance home directory (or leave --home out for $TANDEM_HOME, else /var/lib/tandem)');
  return { home: resolveHome(all.home), json: all.json === true };
}

/** True when progress bars may be drawn: stderr is a TTY and --json is off. */
export function interactive(g: GlobalOptions): boolean {
  return !g.json && currentIO().isTTY && process.env.CI !== 'true';
}

/**
 * Wrap a subcommand body: prints the result, maps errors to exit codes.
 * Usage: `.action(run(async (g, cmd) => ({ json, text })))`; the last commander arg is the Command.
 */
export function run(body: (g: GlobalOptions, cmd: Command, args: unknown[]) => Promise<CommandResult>) {
  return async (...args: unknown[]): Promise<void> => {
    const cmd = args[args.length - 1] as Command;
    const g = globalOptions(cmd);
    const io = currentIO();
    let exitCode = 0;
    let error: string | undefined;
    audit(g, cmd, io, undefined, undefined); // its start: a command killed midway is still on record
    try {
      const r = await body(g, cmd, args.slice(0, -2));
      if (g.json) io.out(JSON.stringify(r.json, null, 2) + '\n');
      else if (r.text) io.out(r.text.endsWith('\n') ? r.text : r.text + '\n');
      exitCode = r.exitCode ?? 0;
      io.setExit(exitCode);
    } catch (e) {
      const err = reportError(e, g.json);
      exitCode = err.exitCode;
      error = err.code;
    }
    audit(g, cmd, io, exitCode, error);
    // Stopped by a signal (its error and audit record written): the process ends by that signal,
    // as a shell expects of a command it sent Ctrl-C (a script's loop stops too), not with a code.
    if (stoppedBy !== null && ioContext.getStore() === undefined) {
      process.removeAllListeners(stoppedBy);
      process.kill(process.pid, stoppedBy);
    }
  };
}

/**
 * Record the command in the home's audit log when it may have changed something
 * (appliance/audit.ts): as it starts (exitCode undefined; written, not synced: a kill -9 keeps it,
 * and the end record is synced) and as it ends.
 */
function audit(g: GlobalOptions, cmd: Command, io: CommandIO, exitCode: number | undefined, error: string | undefined): void {
  const words: string[] = [];
  for (let c: Command | null = cmd; c?.parent; c = c.parent) words.unshift(c.name());
  if (!audited(words.join(' '), cmd.opts())) return;
  try {
    appendAudit(g.home, {
      at: new Date().toISOString(),
      user: io.forwarded?.user ?? localUser(),
      pid: process.pid,
      ...(io.forwarded ? { forwarded: true as const } : {}),
      command: redactArgs((io.forwarded?.argv ?? process.argv).slice(2)),
      ...(exitCode === undefined ? { started: true as const } : { exitCode }),
      ...(error !== undefined ? { error } : {}),
    }, { sync: exitCode !== undefined });
  } catch (e) {
    io.err(`note: the audit log (${g.home}/audit.log) could not be written: ${(e as Error).message}\n`);
  }
}

export function reportError(e: unknown, json: boolean): TandemError {
  const err = e instanceof TandemError
    ? e
    // A full disk met where no command expected it is still the operator's to fix, not a bug.
    : indexError(e) ?? diskFullError(e, 'the disk') ?? new TandemError('ERR_INTERNAL', `unexpected error: ${(e as Error)?.stack ?? String(e)}`, { cause: e });
  const io = currentIO();
  if (json) io.out(JSON.stringify({ error: err.toJSON() }, null, 2) + '\n');
  io.err(`error ${err.code}: ${err.message}\n`);
  io.setExit(err.exitCode);
  return err;
}

export { parseSize } from '../config/size.js';

/**
 * The line that tells the operator gc left small packs unmerged for lack of free space (not a
 * failure: nothing is lost), and what to do; empty when it merged them all. For `gc` and
 * `retention`, which runs gc.
 */
export function packsNotMergedText(r: { readonly packsNotMerged: ReadonlyArray<{ readonly pack: number; readonly needBytes: number; readonly freeBytes: number }> }): string {
  const left = r.packsNotMerged[0];
  if (!left) return '';
  return `left ${r.packsNotMerged.length} small packs unmerged for lack of space (nothing is lost): pack ${left.pack} needs ${formatBytes(left.needBytes)} free to be copied and ${formatBytes(left.freeBytes)} were free; free space on the store's disk or grow it, then run gc again to merge them`;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}
