/** `appliance init [--name N]`: create an appliance home (store, config, TLS, token). */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 10;

/** A default appliance name from the host name, reduced to the allowed alphabet. */
function defaultName(host: string): string {
  const cleaned = host.replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 63);
  return cleaned === '' ? 'appliance' : cleaned;
}

export function define(program: Command): void {
  program
    .command('init')
    .description('create the store, config, TLS key + self-signed certificate and API token; print the token and certificate fingerprint')
    .option('--name <name>', 'appliance name (default: the host name)')
    .action(run(async (g, cmd) => {
      const opts = cmd.opts<{ name?: string }>();
      const { hostname } = await import('node:os');
      const { Home } = await import('../../home.js');
      const home = await Home.init(g.home, opts.name ?? defaultName(hostname()));
      const doc = { name: home.identity.name, home: home.dir, token: home.token(), fingerprint: home.fingerprint() };
      return {
        json: doc,
        text: [
          `initialized appliance "${doc.name}" in ${doc.home}`,
          `token:       ${doc.token}`,
          `fingerprint: ${doc.fingerprint}`,
          '',
          `next: \`appliance volume add VOL --path PATH --home ${doc.home}\`, then \`appliance snapshot VOL\`;`,
          `start the API with \`appliance serve --home ${doc.home}\` (it prints its https:// URL); peers pair with the token and fingerprint above.`,
        ].join('\n'),
      };
    }));
}
