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
export async function executeForwarded(req: ForwardRequest): Promise<ForwardResult> {
  const { command } = inspect(req.argv.slice(2));
  if (command !== undefined && LOCAL_ONLY.has(command)) {
    return { exitCode: 2, stdout: '', stderr: `error ERR_USAGE: \`appliance ${command}\` cannot be forwarded to a running server; run it where the home is not served\n` };
  }
  return runCaptured(req.argv, { argv: req.argv, user: req.user ?? 'unknown' });
}

/**
 * Run a command line (process.argv form) in this process with its own captured output and exit
 * code; the caller's output is untouched. `forwarded`: the CLI it came from (the audit log's).
 */
export async function runCaptured(argv: string[], forwarded?: { readonly argv: readonly string[]; readonly user: string }): Promise<ForwardResult> {
  const { withIO } = await import('./output.js');
  const { runCli } = await import('./main.js');
  let stdout = '';
  let stderr = '';
  let exitCode = 0;
  await withIO({
    out: (s) => void (stdout += s),
    err: (s) => void (stderr += s),
    setExit: (c) => void (exitCode = c),
    isTTY: false,
    ...(forwarded ? { forwarded } : {}),
  }, () => runCli(argv));
  return { exitCode, stdout, stderr };
}
