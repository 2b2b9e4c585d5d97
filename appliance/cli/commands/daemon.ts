/**
 * `appliance daemon [--listen HOST:PORT]`: `serve` plus the scheduler (replicate per policy,
 * export, retention, gc), GET /metrics and GET /v1/status, and the breach webhook. Runs until
 * SIGTERM/SIGINT (see appliance/scheduler/daemon.ts for the shutdown contract); SIGHUP re-reads
 * config.yaml at once.
 */
import type { Command } from 'commander';
import { currentIO, globalOptions, reportError } from '../output.js';
import type { RunningDaemon } from '../../scheduler/daemon.js';

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
      // Signals are handled from the first moment: a stop asked while the daemon starts (it may be
      // running post hooks that interrupted snapshots owed, or tearing down an interrupted drill)
      // is carried out, cleanly, once it has started; a reload asked meanwhile likewise.
      let daemon: RunningDaemon | null = null;
      let stopAsked: NodeJS.Signals | null = null;
      let reloadAsked: NodeJS.Signals | null = null;
      const stopWith = (signal: NodeJS.Signals) => {
        daemon!.stop(signal).then(() => process.exit(0), (e: unknown) => {
          io.err(`error during shutdown: ${(e as Error).message}\n`);
          process.exit(1);
        });
      };
      const onSignal = (signal: NodeJS.Signals) => (daemon ? stopWith(signal) : void (stopAsked ??= signal));
      // `kill -HUP` (the habit for "reload"; also a closed terminal) re-reads config.yaml instead of ending the daemon.
      const onHup = (signal: NodeJS.Signals) => (daemon ? void daemon.reload(signal) : void (reloadAsked = signal));
      process.once('SIGTERM', onSignal);
      process.once('SIGINT', onSignal);
      process.on('SIGHUP', onHup);
      try {
        const { runDaemon } = await import('../../scheduler/daemon.js');
        daemon = await runDaemon({ home: g.home, listen: cmd.opts<{ listen: string }>().listen, json: g.json, out: (s) => io.out(s) });
        // Return now (forwarded commands import the entry module, see daemon.ts); the signal ends the process.
        if (stopAsked) stopWith(stopAsked);
        else if (reloadAsked) void daemon.reload(reloadAsked);
        io.setExit(0);
      } catch (e) {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
        process.off('SIGHUP', onHup);
        reportError(e, g.json);
      }
    });
}
