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
import { TandemError, diskFullError } from '../../common/errors.js';
import { resolveHome } from './forward-client.cjs';

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
}

const processIO: CommandIO = {
  out: (s) => void process.stdout.write(s),
  err: (s) => void process.stderr.write(s),
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
    try {
      const r = await body(g, cmd, args.slice(0, -2));
      if (g.json) io.out(JSON.stringify(r.json, null, 2) + '\n');
      else if (r.text) io.out(r.text.endsWith('\n') ? r.text : r.text + '\n');
      io.setExit(r.exitCode ?? 0);
    } catch (e) {
      reportError(e, g.json);
    }
  };
}

export function reportError(e: unknown, json: boolean): void {
  const err = e instanceof TandemError
    ? e
    // A full disk met where no command expected it is still the operator's to fix, not a bug.
    : diskFullError(e, 'the disk') ?? new TandemError('ERR_INTERNAL', `unexpected error: ${(e as Error)?.stack ?? String(e)}`, { cause: e });
  const io = currentIO();
  if (json) io.out(JSON.stringify({ error: err.toJSON() }, null, 2) + '\n');
  io.err(`error ${err.code}: ${err.message}\n`);
  io.setExit(err.exitCode);
}

export { parseSize } from '../config/size.js';

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}
