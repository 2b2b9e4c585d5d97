/**
 * `appliance tls show|rotate`: this appliance's TLS certificate, which its peer pins by
 * fingerprint. `rotate` makes a new key and self-signed certificate (a key that may have leaked,
 * a policy that renews them); a running server serves them within a second. The other
 * appliance then pins the new fingerprint with `appliance peer update NAME --fingerprint F`:
 * until it does, its syncs are refused before any data is sent (ERR_PEER_FINGERPRINT).
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 73;

export function define(program: Command): void {
  const tls = program.command('tls').description('show or rotate the TLS certificate peers pin by fingerprint');
  tls
    .command('show')
    .description("print the certificate's SHA-256 fingerprint (as `init` printed it)")
    .action(run(async (g) => {
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      const { certificateEnd } = await import('../../health.js');
      return { json: { fingerprint: home.fingerprint(), validTo: certificateEnd(home) }, text: home.fingerprint() };
    }));
  tls
    .command('rotate')
    .description('make a new TLS key and certificate; then pin the new fingerprint on the other appliance with `appliance peer update NAME --fingerprint F`')
    .action(run(async (g) => {
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      const before = home.fingerprint();
      const fingerprint = await home.prepareTlsRotation();
      home.finishTlsRotation();
      return {
        json: { fingerprint, previous: before },
        text: [
          fingerprint,
          `the other appliance refuses this one's certificate until it pins the new fingerprint: run \`appliance peer update PEER --fingerprint ${fingerprint}\` there`,
        ].join('\n'),
      };
    }));
}
