/**
 * The body of `appliance serve`: hold the store for the process lifetime, share it with
 * forwarded CLI commands, listen, and shut down cleanly on a signal.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { startServer } from './server.js';
import { Home, writeFileAtomic } from '../appliance/home.js';
import type { GlobalOptions } from '../appliance/cli/output.js';

/** Serve until SIGTERM/SIGINT. `out` gets the one line (or JSON document) announcing the URL. */
export async function serve(g: GlobalOptions, listen: string, out: (s: string) => void, err: (s: string) => void): Promise<void> {
  const home = Home.load(g.home);
  const store = await home.openStore();
  const unshare = home.shareStore(store);
  let server;
  try {
    server = await startServer({ home, store, listen });
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
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  err(`${signal}: shutting down\n`);
  rmSync(runFile, { force: true });
  await server.close();
  unshare();
  await store.flush();
  await store.close();
}
