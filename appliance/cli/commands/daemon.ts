/**
 * `appliance daemon [--listen HOST:PORT]`: `serve` plus the scheduler (replicate per policy,
 * export, retention, gc), GET /metrics and GET /v1/status, and the breach webhook. Runs until
 * SIGTERM/SIGINT (see appliance/scheduler/daemon.ts for the shutdown contract); SIGHUP re-reads
 * config.yaml at once.
 */
import type { Command } from 'commander';
import { currentIO, globalOptions, reportError } from '../output.js';

export const order = 71;
/** The appliance's well-known port, as for `serve`. */
const DEFAULT_LISTEN = '0.0.0.0:7443';

export function define(program: Command): void {
  program
    .command('daemon')
    .description('serve the API and run the scheduler: snapshot and replicate each volume before its RPO, export, retention, alerts')
    .option('--listen <host:port>', 'address to listen on', DEFAULT_LISTEN)
    .action(async (...args: unknown[]) => {
      const cmd = args[args.length - 1] as Command;
      const g = globalOptions(cmd);
      const io = currentIO();
      try {
        const { runDaemon } = await import('../../scheduler/daemon.js');
        const daemon = await runDaemon({ home: g.home, listen: cmd.opts<{ listen: string }>().listen, json: g.json, out: (s) => io.out(s) });
        // Return now (forwarded commands import the entry module, see daemon.ts); the signal ends the process.
        const onSignal = (signal: NodeJS.Signals) => {
          daemon.stop(signal).then(() => process.exit(0), (e: unknown) => {
            io.err(`error during shutdown: ${(e as Error).message}\n`);
            process.exit(1);
          });
        };
        process.once('SIGTERM', onSignal);
        process.once('SIGINT', onSignal);
        // `kill -HUP` (the habit for "reload"; also a closed terminal) re-reads config.yaml instead of ending the daemon.
        process.on('SIGHUP', (signal) => void daemon.reload(signal));
        io.setExit(0);
      } catch (e) {
        reportError(e, g.json);
      }
    });
}
