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
  const { withIO } = await import('./output.js');
  const { runCli } = await import('./main.js');
  let stdout = '';
  let stderr = '';
  let exitCode = 0;
  const args = req.argv.slice(2);
  const { command } = inspect(args);
  if (command !== undefined && LOCAL_ONLY.has(command)) {
    return { exitCode: 2, stdout: '', stderr: `error ERR_USAGE: \`appliance ${command}\` cannot be forwarded to a running server; run it where the home is not served\n` };
  }
  await withIO({
    out: (s) => void (stdout += s),
    err: (s) => void (stderr += s),
    setExit: (c) => void (exitCode = c),
    isTTY: false,
    forwarded: { argv: req.argv, user: req.user ?? 'unknown' },
  }, () => runCli(req.argv));
  return { exitCode, stdout, stderr };
}
