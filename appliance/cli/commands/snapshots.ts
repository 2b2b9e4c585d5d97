/** `appliance snapshots VOL`: list a volume's snapshots, oldest first. */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 35;

export function define(program: Command): void {
  program
    .command('snapshots <vol>')
    .description("list VOL's snapshots, oldest first")
    .action(run(async (g, _cmd, [name]) => {
      const { withHomeStore } = await import('../../ops.js');
      const { TandemError } = await import('../../../common/errors.js');
      const { formatBytes } = await import('../output.js');
      const { formatTable, formatAge } = await import('../table.js');
      const snaps = await withHomeStore(g.home, async (_home, store) => {
        if (!(await store.getVolume(name as string))) {
          throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${name as string}"; see \`appliance volume list\``, { details: { volume: name } });
        }
        return store.listSnapshots(name as string);
      });
      const text = snaps.length === 0
        ? `volume "${name as string}" has no snapshots; take one with \`appliance snapshot ${name as string}\``
        : formatTable(
          ['ID', 'CREATED', 'AGE', 'SIZE', 'DATA', 'ORIGIN'],
          snaps.map((s) => [s.id, s.created, formatAge(s.created), formatBytes(s.size), formatBytes(s.nonZeroBlocks * s.blockSize), s.origin]),
        );
      return { json: snaps, text };
    }));
}
