/**
 * `appliance tls show|rotate`: this appliance's TLS certificate, which its peers pin by
 * fingerprint. A rotation comes in two steps, so that it breaks no sync:
 * - `tls rotate` stages a new key and self-signed certificate; the server goes on serving the
 *   current pair and names the staged one in GET /v1/health, where the peers that pin this
 *   appliance learn it (their daemon within 30 s, or `appliance peer update NAME` there) and
 *   take both; each tells this appliance it did, which `tls show` lists;
 * - `tls rotate --activate` serves the staged pair (a running server within a second); each peer
 *   then pins the new fingerprint alone.
 * `tls rotate --now` replaces the pair at once (a key that may have leaked: the old one must not
 * be taken a minute longer); the other appliance's syncs are then refused before any data is sent
 * (ERR_PEER_FINGERPRINT) until it runs `appliance peer update NAME --fingerprint F`.
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 73;

export function define(program: Command): void {
  const tls = program.command('tls').description('show or rotate the TLS certificate peers pin by fingerprint');
  tls
    .command('show')
    .description("print the certificate's SHA-256 fingerprint (as `init` printed it), and the staged one with the peers that took it")
    .action(run(async (g) => {
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      const { certificateEnd } = await import('../../health.js');
      const staged = home.stagedTls();
      const acks = home.tlsAcks(staged);
      const lines = [home.fingerprint()];
      if (staged) {
        lines.push(`staged ${staged.fingerprint} since ${staged.since}; taken by ${acks.length === 0 ? 'no peer yet' : acks.map((a) => `${a.name} (${a.at})`).join(', ')}; serve it with \`appliance tls rotate --activate\``);
      }
      return {
        json: { fingerprint: home.fingerprint(), validTo: certificateEnd(home), staged: staged ? { ...staged, takenBy: acks } : null },
        text: lines.join('\n'),
      };
    }));
  tls
    .command('rotate')
    .description('stage a new TLS key and certificate; the peers learn its fingerprint and take both; then serve it with --activate. --now replaces it at once (a key that leaked)')
    .option('--activate', 'serve the staged certificate (`tls show` lists the peers that took it)')
    .option('--now', 'make a new key and certificate and serve them at once; the other appliance is refused until `appliance peer update NAME --fingerprint F` there')
    .action(run(async (g, cmd) => {
      const o = cmd.opts<{ activate?: boolean; now?: boolean }>();
      const { TandemError } = await import('../../../common/errors.js');
      if (o.activate === true && o.now === true) throw new TandemError('ERR_USAGE', '--activate serves the staged certificate, --now makes a new one and serves it: give one of them');
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      if (o.activate === true) {
        const acks = home.tlsAcks();
        const r = home.activateStagedTls();
        return {
          json: { fingerprint: r.fingerprint, previous: r.previous, activated: true, takenBy: acks },
          text: [
            r.fingerprint,
            acks.length > 0
              ? `served now; ${acks.map((a) => a.name).join(', ')} took it before and pin${acks.length === 1 ? 's' : ''} it alone from the next contact. Another appliance that pins this one: \`appliance peer update PEER --fingerprint ${r.fingerprint}\` there`
              : `served now; no peer had taken it: each appliance that pins this one refuses it until \`appliance peer update PEER --fingerprint ${r.fingerprint}\` there`,
          ].join('\n'),
        };
      }
      const before = home.fingerprint();
      if (o.now === true) {
        const fingerprint = await home.prepareTlsRotation();
        home.finishTlsRotation();
        return {
          json: { fingerprint, previous: before, activated: true },
          text: [
            fingerprint,
            `the other appliance refuses this one's certificate until it pins the new fingerprint: run \`appliance peer update PEER --fingerprint ${fingerprint}\` there`,
          ].join('\n'),
        };
      }
      const replaced = home.stagedTls();
      const fingerprint = await home.stageTlsRotation();
      return {
        json: { fingerprint, previous: before, activated: false, replacedStaged: replaced?.fingerprint ?? null },
        text: [
          fingerprint,
          `staged; still serving ${before}. The peers learn the new fingerprint at their next contact (their daemon within 30 s, or \`appliance peer update PEER\` there) and take both; \`appliance tls show\` lists those that did. Then serve it: \`appliance tls rotate --activate\``,
        ].join('\n'),
      };
    }));
}
