/**
 * `appliance serve [--listen HOST:PORT]`: the HTTPS API and peer protocol of this appliance.
 * Prints `listening on https://HOST:PORT` and the certificate fingerprint, writes
 * HOME/run/server.json {pid, url} (so CLI commands on this home are forwarded here), and on
 * SIGTERM/SIGINT: forwarded commands get up to 30 s to finish (then the post hooks they owe run),
 * then the server closes, flushes and closes the store, removes server.json, exits 0.
 */
import type { Command } from 'commander';
import { currentIO, globalOptions, reportError } from '../output.js';

export const order = 70;
/** The appliance's well-known port (peers are configured with it). */
const DEFAULT_LISTEN = '0.0.0.0:7443';

export function define(program: Command): void {
  program
    .command('serve')
    .description('serve the HTTPS API and peer protocol; prints the URL it bound (port 0 picks a free port)')
    .option('--listen <host:port>', 'address to listen on', DEFAULT_LISTEN)
    .action(async (...args: unknown[]) => {
      const cmd = args[args.length - 1] as Command;
      const g = globalOptions(cmd);
      const io = currentIO();
      try {
        const { serve } = await import('../../../api/serve.js');
        await serve(g, cmd.opts<{ listen: string }>().listen, (s) => io.out(s), (s) => io.err(s));
        io.setExit(0);
      } catch (e) {
        reportError(e, g.json);
      }
    });
}
