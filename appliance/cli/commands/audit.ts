/**
 * `appliance audit [--since DURATION] [--limit N]`: who ran which command that may have changed
 * this appliance, when, and how it ended (HOME/audit.log: appliance/audit.ts). Read-only.
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 81;

export function define(program: Command): void {
  program
    .command('audit')
    .description('who ran which command that may change this appliance, when, and how it ended (HOME/audit.log), oldest first')
    .option('--since <duration>', 'only the last DURATION (e.g. 24h, 7d)')
    .option('--limit <n>', 'only the last N records', '100')
    .action(run(async (g, cmd) => {
      const o = cmd.opts<{ since?: string; limit: string }>();
      const { TandemError } = await import('../../../common/errors.js');
      const limit = Number(o.limit);
      if (!Number.isInteger(limit) || limit < 1) throw new TandemError('ERR_USAGE', `--limit "${o.limit}" is not a positive whole number`);
      let since = -Infinity;
      if (o.since !== undefined) {
        const { parseDuration } = await import('../../config/index.js');
        try {
          since = Date.now() - parseDuration(o.since);
        } catch {
          throw new TandemError('ERR_USAGE', `--since "${o.since}" is not a duration; write e.g. 24h or 7d`);
        }
      }
      const { Home } = await import('../../home.js');
      const { auditEntries, readAudit } = await import('../../audit.js');
      const home = Home.load(g.home);
      const entries = auditEntries(readAudit(home.dir)).filter((r) => Date.parse(r.at) >= since).slice(-limit);
      const ended = (r: (typeof entries)[number]) => (r.started ? 'started, no end recorded (killed, or the machine stopped)' : r.exitCode === 0 ? 'ok' : `exit ${r.exitCode}${r.error ? ` ${r.error}` : ''}`);
      const text = entries.length === 0
        ? 'no recorded command'
        : entries.map((r) => `${r.at}  ${r.user}${r.forwarded ? ' (via the server)' : ''}  ${ended(r)}  appliance ${r.command.join(' ')}`).join('\n');
      return { json: { entries }, text };
    }));
}
