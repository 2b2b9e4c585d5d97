/**
 * `appliance snapshots VOL`: list a volume's snapshots, oldest first (with their holds); with
 * `--hold ID [--reason TEXT]`, `--release ID` or `--delete ID... [--force]`, manage single
 * snapshots (appliance/snapshot-admin.ts).
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 35;

interface Opts {
  hold?: string;
  reason?: string;
  release?: string;
  delete?: string[];
  force?: boolean;
}

export function define(program: Command): void {
  program
    .command('snapshots <vol>')
    .description("list VOL's snapshots, oldest first; --hold keeps one from retention and deletion, --delete deletes chosen ones")
    .option('--hold <id>', 'hold snapshot ID: retention, --delete and `volume remove` leave it alone until --release')
    .option('--reason <text>', 'why it is held (with --hold), shown in the listing')
    .option('--release <id>', 'release the hold on snapshot ID')
    .option('--delete <id...>', 'delete these snapshots (all or none; space comes back at `appliance gc`)')
    .option('--force', 'with --delete: also the newest snapshot, or one the next sync or EBS export builds on')
    .action(run(async (g, cmd, [name]) => {
      const o = cmd.opts<Opts>();
      const volume = name as string;
      const { withHomeStore } = await import('../../ops.js');
      const { TandemError } = await import('../../../common/errors.js');
      const actions = [o.hold, o.release, o.delete].filter((x) => x !== undefined).length;
      if (actions > 1) throw new TandemError('ERR_USAGE', '--hold, --release and --delete are separate commands: give one of them');
      if (o.reason !== undefined && o.hold === undefined) throw new TandemError('ERR_USAGE', '--reason goes with --hold ID');
      if (o.force === true && o.delete === undefined) throw new TandemError('ERR_USAGE', '--force goes with --delete ID...');
      const admin = await import('../../snapshot-admin.js');
      if (o.hold !== undefined) {
        const hold = await withHomeStore(g.home, (_home, store) => admin.holdSnapshot(store, volume, o.hold!, o.reason ?? ''));
        return { json: { volume, held: hold }, text: `held ${volume}@${hold.snapshot}${hold.reason ? ` ("${hold.reason}")` : ''}: retention and --delete leave it alone until \`appliance snapshots ${volume} --release ${hold.snapshot}\`` };
      }
      if (o.release !== undefined) {
        const released = await withHomeStore(g.home, (_home, store) => admin.releaseSnapshot(store, volume, o.release!));
        return { json: { volume, snapshot: o.release, released }, text: released ? `released ${volume}@${o.release}: retention may delete it again` : `${volume}@${o.release} was not held` };
      }
      if (o.delete !== undefined) {
        const r = await withHomeStore(g.home, (home, store) => admin.deleteSnapshots(home, store, volume, o.delete!, { force: o.force === true }));
        return { json: r, text: `deleted ${r.deleted.length} snapshot(s) of ${volume}: ${r.deleted.join(', ')}; run \`appliance gc\` to reclaim their space` };
      }
      const { formatBytes } = await import('../output.js');
      const { formatTable, formatAge } = await import('../table.js');
      const { snaps, holds } = await withHomeStore(g.home, async (_home, store) => {
        if (!(await store.getVolume(volume))) {
          throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${volume}"; see \`appliance volume list\``, { details: { volume } });
        }
        return { snaps: await store.listSnapshots(volume), holds: await admin.listHolds(store, volume) };
      });
      const listed = snaps.map((s) => {
        const h = holds.get(s.id);
        return { ...s, held: h ? { reason: h.reason, at: h.at } : null };
      });
      const text = snaps.length === 0
        ? `volume "${volume}" has no snapshots; take one with \`appliance snapshot ${volume}\``
        : formatTable(
          // A group's snapshots name their group run: restore the disks of a server from one run.
          ['ID', 'CREATED', 'AGE', 'SIZE', 'DATA', 'ORIGIN', 'GROUP RUN', 'HELD'],
          listed.map((s) => [s.id, s.created, formatAge(s.created), formatBytes(s.size), formatBytes(s.nonZeroBlocks * s.blockSize), s.origin, s.labels?.groupRun ? `${s.labels.group ?? ''} ${s.labels.groupRun}`.trim() : '-', s.held ? (s.held.reason || 'yes') : '-']),
        );
      return { json: listed, text };
    }));
}
