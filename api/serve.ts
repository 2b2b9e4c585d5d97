/**
 * The body of `appliance serve`: hold the store for the process lifetime, share it with
 * forwarded CLI commands, listen, and shut down cleanly on a signal.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { startServer } from './server.js';
import { Home, writeFileAtomic } from '../appliance/home.js';
import type { GlobalOptions } from '../appliance/cli/output.js';

/**
 * Start serving and return once listening; the process then lives on the server's handles.
 * It must return (not wait for the signal): the CLI entry module is still evaluating until the
 * command's action ends, and forwarded commands import it (appliance/cli/forward.ts), so a
 * command that never returns would block every forwarded command. On SIGTERM/SIGINT: close the
 * server, flush and close the store, remove server.json, exit 0.
 */
export async function serve(g: GlobalOptions, listen: string, out: (s: string) => void, err: (s: string) => void): Promise<void> {
  const home = Home.load(g.home);
  const store = await home.openStore();
  const unshare = home.shareStore(store);
  let server;
  try {
    const { applianceRoutes } = await import('../appliance/routes.js');
    server = await startServer({ home, store, listen, extraRoutes: applianceRoutes(home, store) });
  } catch (e) {
    unshare();
    await store.close();
    throw e;
  }
  const runFile = join(home.paths.run, 'server.json');
  writeFileAtomic(runFile, JSON.stringify({ pid: process.pid, url: server.url }) + '\n');
  const fingerprint = home.fingerprint();
  if (g.json) out(JSON.stringify({ url: server.url, fingerprint, pid: process.pid, name: home.identity.name }) + '\n');
  else out(`listening on ${server.url}\nfingerprint ${fingerprint}\n`);
  let stopping = false;
  const shutdown = async (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    err(`${signal}: shutting down\n`);
    let code = 0;
    try {
      rmSync(runFile, { force: true });
      await server.close();
      unshare();
      await store.flush();
      await store.close();
    } catch (e) {
      err(`error during shutdown: ${(e as Error).message}\n`);
      code = 1;
    }
    process.exit(code);
  };
  process.once('SIGTERM', (s) => void shutdown(s));
  process.once('SIGINT', (s) => void shutdown(s));
}
