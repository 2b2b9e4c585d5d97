/**
 * The body of `appliance serve`: hold the store for the process lifetime, share it with
 * forwarded CLI commands, listen, and shut down cleanly on a signal.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyInstance, FastifyServerOptions } from 'fastify';
import { listenLocal, startServer } from './server.js';
import { Home, writeFileAtomic } from '../appliance/home.js';
import type { GlobalOptions } from '../appliance/cli/output.js';
import type { Store } from '../store/index.js';
import type { OwedPostOutcome } from '../appliance/hooks.js';

/** A home being served: its store held open for the process, the server, run/server.json. */
export interface Served {
  readonly store: Store;
  readonly url: string;
  /** One line (or JSON document) announcing the URL and certificate fingerprint. */
  announcement(json: boolean, label: string): string;
  /**
   * Refuse forwarded commands from now on and let those running finish, within `graceMs`
   * (config.yaml `shutdown.grace`, default 30 s: {@link stopGraceMs}; then their owed post hooks
   * run: appliance/cli/forward.ts stopForwarding). close() does this first; the daemon starts it
   * with its jobs' stop. Idempotent: the first call's grace holds.
   */
  stopForwarding(graceMs: number): Promise<void>;
  /** Stop forwarding (`graceMs` as above), remove server.json, close the server, stop sharing, flush and close the store. */
  close(graceMs: number): Promise<void>;
}

/**
 * The grace a stopping server gives the work running in it: config.yaml's `shutdown.grace`,
 * read when the stop begins (serve reads config.yaml for nothing else); an unreadable or
 * invalid config.yaml gives the default (30 s) and `warn` says so: the stop goes on.
 */
export async function stopGraceMs(home: Home, warn: (s: string) => void): Promise<number> {
  const { loadConfig, DEFAULT_SHUTDOWN_GRACE_MS } = await import('../appliance/config/index.js');
  try {
    return (await loadConfig(home)).shutdown.graceMs;
  } catch (e) {
    warn(`config.yaml: ${(e as Error).message.split('\n')[0]}; stopping with the default grace of ${DEFAULT_SHUTDOWN_GRACE_MS / 1000} s\n`);
    return DEFAULT_SHUTDOWN_GRACE_MS;
  }
}

export interface ServedOptions {
  /**
   * Told of each post hook that a snapshot killed between its hooks owed (appliance/hooks.ts
   * runOwedPostHooks), which startServed runs before anything else does: what it froze is thawed.
   */
  readonly onOwedPost?: (o: OwedPostOutcome) => void;
  /** Routes beyond the peer protocol and the appliance's management routes (the daemon's). */
  readonly routes?: (store: Store) => (app: FastifyInstance) => void | Promise<void>;
  readonly logger?: FastifyServerOptions['logger'];
}

/**
 * What `serve` and `daemon` share: open and share the home's store (forwarded CLI commands use
 * it), listen with the peer protocol and the appliance's management routes (appliance/routes.ts),
 * also on the Unix socket HOME/run/cli.sock, and publish HOME/run/server.json, which
 * appliance/cli/forward.ts reads.
 */
export async function startServed(home: Home, listen: string, opts: ServedOptions = {}): Promise<Served> {
  const store = await home.openStore({ server: true });
  store.keepWarm(); // scheduled and forwarded snapshots find the hash workers started and write past the page cache
  const unshare = home.shareStore(store);
  let server;
  try {
    const { applianceRoutes } = await import('../appliance/routes.js');
    const management = applianceRoutes(home, store);
    const more = opts.routes?.(store);
    server = await startServer({
      home,
      store,
      listen,
      extraRoutes: async (app) => {
        await management(app);
        await more?.(app);
      },
      ...(opts.logger !== undefined ? { logger: opts.logger } : {}),
    });
  } catch (e) {
    unshare();
    await store.close();
    throw e;
  }
  // A server or a command killed between a snapshot's hooks left its post hook owed.
  const { hookLedger } = await import('../appliance/ops.js');
  const { runOwedPostHooks } = await import('../appliance/hooks.js');
  for (const o of await runOwedPostHooks(hookLedger(home))) opts.onOwedPost?.(o);
  const local = await listenLocal(server.app, join(home.paths.run, 'cli.sock'));
  const runFile = join(home.paths.run, 'server.json');
  writeFileAtomic(runFile, JSON.stringify({ pid: process.pid, url: server.url, ...(local ? { socket: local.path } : {}) }) + '\n');
  const running = server;
  const stopForwarding = async (graceMs: number) => {
    const forward = await import('../appliance/cli/forward.js');
    await forward.stopForwarding(graceMs);
  };
  return {
    store,
    url: running.url,
    announcement(json, label) {
      const fingerprint = home.fingerprint();
      return json
        ? JSON.stringify({ url: running.url, fingerprint, pid: process.pid, name: home.identity.name }) + '\n'
        : `${label} ${running.url}\nfingerprint ${fingerprint}\n`;
    },
    stopForwarding,
    async close(graceMs) {
      await stopForwarding(graceMs);
      rmSync(runFile, { force: true });
      await local?.close();
      await running.close();
      unshare();
      await store.flush();
      await store.close();
    },
  };
}

/**
 * Start serving and return once listening; the process then lives on the server's handles.
 * It must return (not wait for the signal): the CLI entry module is still evaluating until the
 * command's action ends, and forwarded commands import it (appliance/cli/forward.ts), so a
 * command that never returns would block every forwarded command. At the start (startServed) it
 * runs the post hooks that snapshots killed between their hooks owe. On SIGTERM/SIGINT: refuse new forwarded
 * commands, give those running config.yaml's `shutdown.grace` (30 s by default; then run their
 * owed post hooks), close the server,
 * flush and close the store, remove server.json, exit 0. SIGHUP is ignored (said on stderr).
 */
export async function serve(g: GlobalOptions, listen: string, out: (s: string) => void, err: (s: string) => void): Promise<void> {
  const home = Home.load(g.home);
  const served = await startServed(home, listen, {
    onOwedPost: (o) => err(o.outcome === 'restarted'
      ? `dropped the post hook \`${o.post}\` an interrupted snapshot owed since ${o.since}: the machine restarted since\n`
      : `ran the post hook \`${o.post}\` an interrupted snapshot owed since ${o.since}: ${o.run?.exitCode === 0 ? 'exited 0' : `exit code ${o.run?.exitCode ?? 'none'}${o.run?.output ? `, output: ${o.run.output}` : ''}`}\n`),
  });
  let stopping = false;
  const shutdown = async (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    err(`${signal}: shutting down\n`);
    let code = 0;
    try {
      await served.close(await stopGraceMs(home, err));
    } catch (e) {
      err(`error during shutdown: ${(e as Error).message}\n`);
      code = 1;
    }
    process.exit(code);
  };
  process.once('SIGTERM', (s) => void shutdown(s));
  process.once('SIGINT', (s) => void shutdown(s));
  // `kill -HUP` (the habit for "reload", or a closed terminal) must not end the server: each
  // command it runs reads config.yaml itself, so there is nothing to reload.
  process.on('SIGHUP', (s) => err(`${s}: nothing to reload (each command reads config.yaml when it runs); still serving\n`));
  // Announced once the signals are handled: whoever starts it may signal it as soon as it reads this.
  out(served.announcement(g.json, 'listening on'));
}
