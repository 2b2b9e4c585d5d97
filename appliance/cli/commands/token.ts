/**
 * `appliance token show|rotate`: this appliance's API token (what peers send; the admin token,
 * HOME/admin.token, is what this machine's CLI sends to run commands in a running server; the
 * monitor token, HOME/monitor.token, reads /metrics and /v1/status only). `rotate` replaces it; the old one is still taken for `--grace` (default 24h) so the other
 * appliance can be given the new one (`appliance peer update NAME --token T` there) with no
 * failed sync meanwhile; `--grace 0` revokes it at once. A running server takes the change
 * within a second (api/server.ts, TokenCheck).
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 72;

/** Without --grace: a day to update the other appliance. */
const DEFAULT_GRACE = '24h';

export function define(program: Command): void {
  const token = program.command('token').description("show or rotate this appliance's API token (what peers and `peer add` use)");
  token
    .command('show')
    .description('print the API token (as `init` printed it), and the replaced one while it is still taken')
    .option('--monitor', 'print the monitor token instead (HOME/monitor.token: reads GET /metrics and GET /v1/status only; give it to the monitoring system)')
    .action(run(async (g, cmd) => {
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      if (cmd.opts<{ monitor?: boolean }>().monitor === true) {
        const monitor = home.monitorToken();
        return { json: { monitor: true, token: monitor }, text: monitor };
      }
      const [current, previous] = home.acceptedTokens();
      return { json: { token: current, previousStillTaken: previous !== undefined }, text: current! };
    }));
  token
    .command('rotate')
    .description('replace the API token; the old one is still taken for --grace (then give the peer the new one: `appliance peer update NAME --token T` there)')
    .option('--grace <duration>', 'how long the old token is still taken (0: revoke it at once, for a token that leaked)', DEFAULT_GRACE)
    .option('--admin', "replace the admin token instead (HOME/admin.token: this machine's CLI sends it to a running server; no peer has it)")
    .option('--monitor', 'replace the monitor token instead (HOME/monitor.token), at once; then give the monitoring system the new one')
    .action(run(async (g, cmd) => {
      const o = cmd.opts<{ grace: string; admin?: boolean; monitor?: boolean }>();
      const { TandemError } = await import('../../../common/errors.js');
      if (o.admin === true && o.monitor === true) throw new TandemError('ERR_USAGE', '--admin and --monitor name different tokens: replace one at a time');
      if (o.monitor === true) {
        if (cmd.getOptionValueSource('grace') !== 'default') throw new TandemError('ERR_USAGE', '--monitor replaces the monitor token at once: --grace does not apply');
        const { Home } = await import('../../home.js');
        const monitor = Home.load(g.home).rotateMonitorToken();
        return { json: { monitor: true, token: monitor }, text: [monitor, 'the old monitor token is refused now: give the monitoring system this one'].join('\n') };
      }
      if (o.admin === true) {
        if (cmd.getOptionValueSource('grace') !== 'default') throw new TandemError('ERR_USAGE', '--admin replaces the admin token at once: --grace does not apply');
        const { Home } = await import('../../home.js');
        Home.load(g.home).rotateAdminToken();
        return { json: { admin: true }, text: 'replaced the admin token (HOME/admin.token); the next `appliance` command uses it' };
      }
      const { parseDuration } = await import('../../config/index.js');
      let graceMs = 0;
      if (o.grace.trim() !== '0') {
        try {
          graceMs = parseDuration(o.grace);
        } catch {
          throw new TandemError('ERR_USAGE', `--grace "${o.grace}" is not a duration; write e.g. 1h, 24h or 7d, or 0 to revoke the old token at once`);
        }
        // An old token taken for longer is no rotation (and past ~270,000 years no date at all).
        if (graceMs > 365 * 86_400_000) throw new TandemError('ERR_USAGE', `--grace ${o.grace} is longer than a year: the old token would stay in force; give the other appliance the new one within days (e.g. --grace 7d)`);
      }
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      const r = await home.rotateToken(graceMs);
      const next = `give it to the other appliance: \`appliance peer update PEER --token ${r.token}\` there`;
      const text = [
        r.token,
        r.previousUntil === null
          ? `the old token is revoked: the other appliance's syncs fail with ERR_UNAUTHORIZED until you ${next}`
          : `the old token is still taken until ${r.previousUntil}; ${next}`,
      ].join('\n');
      return { json: { token: r.token, previousUntil: r.previousUntil }, text };
    }));
}
