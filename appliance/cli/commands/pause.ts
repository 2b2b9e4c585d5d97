/**
 * `appliance pause [VOL...] [--all] [--for DURATION] [--reason TEXT]` and
 * `appliance resume [VOL...] [--all]`: stop and restart the daemon's scheduled jobs of volumes
 * (appliance/pause.ts). The daemon notices at once when the command runs in it (forwarded), else
 * within a minute.
 */
import type { Command } from 'commander';
import { currentIO, run } from '../output.js';

export const order = 79;

interface PauseOpts { all?: boolean; for?: string; reason?: string }

export function define(program: Command): void {
  program
    .command('pause [volumes...]')
    .description("pause the daemon's scheduled snapshots and replication of VOLUMES (or --all) until `appliance resume`, or for --for; a running job of them stops")
    .option('--all', 'every volume of this appliance')
    .option('--for <duration>', 'lift the pause by itself after DURATION (e.g. 2h, 1d; at most 30d)')
    .option('--reason <text>', 'why, for the other operators (`appliance status`)')
    .action(run(async (g, cmd, args) => {
      const names = (args[0] as string[] | undefined) ?? [];
      const o = cmd.opts<PauseOpts>();
      const { TandemError } = await import('../../../common/errors.js');
      if ((names.length === 0) === (o.all !== true)) throw new TandemError('ERR_USAGE', 'name the volumes to pause, or give --all (not both)');
      let forMs: number | undefined;
      if (o.for !== undefined) {
        const { parseDuration } = await import('../../config/duration.js');
        try {
          forMs = parseDuration(o.for);
        } catch {
          throw new TandemError('ERR_USAGE', `--for "${o.for}" is not a duration; write e.g. 2h or 1d`);
        }
      }
      if (o.reason !== undefined && (o.reason.trim() === '' || o.reason.length > 500)) throw new TandemError('ERR_USAGE', '--reason takes 1 to 500 characters');
      const { withHomeStore } = await import('../../ops.js');
      const { pauseVolumes } = await import('../../pause.js');
      const { localUser } = await import('../forward-client.cjs');
      const by = currentIO().forwarded?.user ?? localUser();
      const paused = await withHomeStore(g.home, (_home, store) =>
        pauseVolumes(store, names, { all: o.all === true, by, now: Date.now(), ...(forMs !== undefined ? { forMs } : {}), ...(o.reason !== undefined ? { reason: o.reason.trim() } : {}) }));
      const until = (p: { until: string | null }) => (p.until === null ? 'until `appliance resume`' : `until ${p.until}`);
      const text = paused.length === 0
        ? 'no volumes to pause'
        : paused.map((p) => `${p.volume}: scheduled jobs paused ${until(p.paused)}`).join('\n') +
          "\nthe RPO keeps counting; manual commands (snapshot, sync, failover) still run";
      return { json: { paused }, text };
    }));

  program
    .command('resume [volumes...]')
    .description("resume the daemon's scheduled jobs of VOLUMES (or --all): a job overdue meanwhile starts at once")
    .option('--all', 'every volume of this appliance')
    .action(run(async (g, cmd, args) => {
      const names = (args[0] as string[] | undefined) ?? [];
      const o = cmd.opts<{ all?: boolean }>();
      const { TandemError } = await import('../../../common/errors.js');
      if ((names.length === 0) === (o.all !== true)) throw new TandemError('ERR_USAGE', 'name the volumes to resume, or give --all (not both)');
      const { withHomeStore } = await import('../../ops.js');
      const { resumeVolumes } = await import('../../pause.js');
      const resumed = await withHomeStore(g.home, (_home, store) => resumeVolumes(store, names, { all: o.all === true, now: Date.now() }));
      const text = resumed.length === 0
        ? 'nothing was paused'
        : resumed.map((r) => `${r.volume}: scheduled jobs resumed (paused by ${r.paused.by} at ${r.paused.at})`).join('\n');
      return { json: { resumed }, text };
    }));
}
