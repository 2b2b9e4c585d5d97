/**
 * `appliance discover [--json] [--write]`: list block devices, LVM logical volumes, image files
 * under config `discovery.paths` and libvirt domains' disks, with size, estimated data and a
 * proposed policy. `--write` adds an `assign` rule per proposal to config.yaml (comments kept)
 * and prints the `appliance volume add` commands that register them.
 */
import type { Command } from 'commander';
import { formatBytes, run } from '../output.js';

export const order = 85;

export function define(program: Command): void {
  program
    .command('discover')
    .description('find protectable devices, LVs, images and VM disks; propose a policy for each')
    .option('--write', 'add the proposed policy assignments to config.yaml')
    .action(run(async (g, cmd) => {
      const { withHomeStore } = await import('../../ops.js');
      const { loadConfig } = await import('../../config/index.js');
      const { discover, discoveryPathProblems, writeDiscovered } = await import('../../discover/index.js');
      const { formatTable } = await import('../table.js');
      const write = (cmd.opts() as { write?: boolean }).write === true;
      return withHomeStore(g.home, async (home, store) => {
        const config = await loadConfig(home);
        const assets = await discover(config, await store.listVolumes());
        const unsearched = await discoveryPathProblems(config.discovery.paths);
        const written = write ? await writeDiscovered(home.paths.config, config, assets) : null;
        const rows = assets.map((a) => [
          a.name, a.kind, a.path, formatBytes(a.size),
          a.nonZeroEstimate === null ? '?' : `~${formatBytes(a.nonZeroEstimate)}`,
          a.format, a.registered ?? '-', a.proposedPolicy ?? '-', [a.usedBy.join(' '), a.note ?? ''].filter(Boolean).join('; '),
        ]);
        let text = assets.length === 0 ? 'nothing found (add image directories under discovery.paths in config.yaml)' : formatTable(['NAME', 'KIND', 'PATH', 'SIZE', 'DATA', 'FORMAT', 'VOLUME', 'POLICY', 'NOTE'], rows);
        for (const u of unsearched) text += `\nnot searched: discovery.paths entry ${u.path} ${u.problem} (fix the path in config.yaml)`;
        if (written) {
          text += `\n\nconfig.yaml: ${written.added.length} assign rule(s) added${written.createdPolicy ? `, policy "${written.createdPolicy}" created` : ''}`;
          if (written.commands.length > 0) text += `\nregister the volumes:\n  ${written.commands.join('\n  ')}`;
        } else if (assets.some((a) => a.proposedPolicy !== null)) {
          text += '\n\nrerun with --write to add these policy assignments to config.yaml';
        }
        return { json: { assets, unsearched, ...(written ? { written } : {}) }, text };
      });
    }));
}
