/**
 * Command forwarding, server side: {@link executeForwarded} runs a command line sent by a CLI on
 * the same home (forward-client.cts, the client side) in this process, with captured output. It
 * is mounted by the API server as `POST /v1/cli`.
 */
import { LOCAL_ONLY, inspect, type ForwardRequest, type ForwardResult } from './forward-client.cjs';

/**
 * Server side: run a forwarded command line in this process with captured output. The caller
 * (the API route) has authenticated the request and made the open store available to
 * `Home.openStore()` through `Home.shareStore`.
 */
export async function executeForwarded(req: ForwardRequest, signal?: AbortSignal): Promise<ForwardResult> {
  const { command } = inspect(req.argv.slice(2));
  if (command !== undefined && LOCAL_ONLY.has(command)) {
    return { exitCode: 2, stdout: '', stderr: `error ERR_USAGE: \`appliance ${command}\` cannot be forwarded to a running server; run it where the home is not served\n` };
  }
  const forwarded = { argv: req.argv, user: req.user ?? 'unknown' };
  if (stopping !== null) {
    const { reportError } = await import('./output.js');
    const { TandemError } = await import('../../common/errors.js');
    const refused = new TandemError('ERR_SERVER_STOPPING', 'the server of this home is stopping: the command was not run. Run it again once the server has stopped (it then runs in your process) or started again');
    return captured(() => void reportError(refused, req.argv.includes('--json')), forwarded);
  }
  const run = runCaptured(req.argv, forwarded, signal);
  inFlight.add(run);
  try {
    return await run;
  } finally {
    inFlight.delete(run);
  }
}

/** Forwarded commands running now. */
const inFlight = new Set<Promise<ForwardResult>>();
/** Set once this server stops: forwarded commands that arrive then are refused. */
let stopping: Promise<void> | null = null;

/**
 * A server that stops (serve, daemon; Served.close): refuse forwarded commands from now on, give
 * those running `graceMs` to finish, then run the post hooks that any still owes (their
 * snapshots stop before committing) and wait for them to end. Their CLIs get their answers before
 * the server closes its connections, and no file system stays frozen. Idempotent.
 */
export function stopForwarding(graceMs: number): Promise<void> {
  stopping ??= (async () => {
    // Until the commands running now have ended, or `graceMs` has passed.
    const settled = async () => {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.allSettled([...inFlight]), new Promise<void>((resolve) => (timer = setTimeout(resolve, graceMs)))]);
      clearTimeout(timer);
    };
    if (inFlight.size === 0) return;
    await settled();
    if (inFlight.size === 0) return;
    const { thawHookedSnapshots } = await import('../hooks.js');
    await thawHookedSnapshots('SIGTERM');
    // Stopped before committing, each answers at once; a command without hooks may run on (a
    // long sync): it gets as long again, then the store closes under it (a sync resumes).
    await settled();
  })();
  return stopping;
}

/**
 * Run a command line (process.argv form) in this process with its own captured output and exit
 * code; the caller's output is untouched. `forwarded`: the CLI it came from (the audit log's).
 */
export async function runCaptured(argv: string[], forwarded?: { readonly argv: readonly string[]; readonly user: string }, signal?: AbortSignal): Promise<ForwardResult> {
  const { runCli } = await import('./main.js');
  return captured(() => runCli(argv), forwarded, signal);
}

/** Run `fn` with its own captured output and exit code (see runCaptured). */
async function captured(fn: () => Promise<void> | void, forwarded?: { readonly argv: readonly string[]; readonly user: string }, signal?: AbortSignal): Promise<ForwardResult> {
  const { printable, withIO } = await import('./output.js');
  let stdout = '';
  let stderr = '';
  let exitCode = 0;
  await withIO({
    out: (s) => void (stdout += printable(s)),
    err: (s) => void (stderr += printable(s)),
    setExit: (c) => void (exitCode = c),
    isTTY: false,
    ...(forwarded ? { forwarded } : {}),
    ...(signal ? { signal } : {}),
  }, async () => fn());
  return { exitCode, stdout, stderr };
}
