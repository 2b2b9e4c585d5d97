/** `appliance volume add|list|remove`: register local devices and image files. */
import type { Command } from 'commander';
import { run, parseSize } from '../output.js';
import { TandemError } from '../../../common/errors.js';

export const order = 20;

export function define(program: Command): void {
  const volume = program.command('volume').description('register, list and remove volumes (devices or image files)');

  volume
    .command('add <vol>')
    .description('register a block device or image file as volume VOL (or attach one to VOL when it exists only as replicas pulled from a peer)')
    .requiredOption('--path <path>', 'device or image file to protect')
    .option('--block-size <size>', 'block size, a power of two from 4KiB to 16MiB', '512KiB')
    .option('--policy <name>', 'protection policy from the config')
    .option('--tag <tag...>', 'tags (policies may match on them)')
    .action(run(async (g, cmd, [name]) => {
      const o = cmd.opts<{ path: string; blockSize: string; policy?: string; tag?: string[] }>();
      if (o.path.trim() === '') throw new TandemError('ERR_USAGE', '--path is empty: name the device or image file to protect');
      // Given or defaulted: a replica being adopted keeps its own unless one is given.
      const blockSize = cmd.getOptionValueSource('blockSize') === 'default' ? undefined : parseSize(o.blockSize);
      const { withHomeStore, addVolume } = await import('../../ops.js');
      const { currentIO, formatBytes } = await import('../output.js');
      const { existsSync } = await import('node:fs');
      let unprotected = false;
      const { rec, snapshots } = await withHomeStore(g.home, async (home, store) => {
        const { loadConfig, policyFor } = await import('../../config/index.js');
        const config = await loadConfig(home);
        if (o.policy === undefined) {
          // No policy given and no assign rule that matches: no job will snapshot or replicate it.
          unprotected = policyFor(config, { name: name as string, ...(o.tag !== undefined ? { tags: o.tag } : {}) }) === null;
        } else {
          // A policy config.yaml does not define would leave the volume unprotected, silently.
          const defined = Object.keys(config.policies);
          if (!defined.includes(o.policy)) {
            throw new TandemError('ERR_POLICY_NOT_FOUND', `config.yaml defines no policy "${o.policy}" (${defined.length > 0 ? `its policies: ${defined.join(', ')}` : 'it defines none'}); nothing was registered. Define it under \`policies:\` first (\`appliance config check\`), or give one of those`, { details: { policy: o.policy, defined } });
          }
        }
        const snaps = (await store.getVolume(name as string)) ? (await store.listSnapshots(name as string)).length : 0;
        const added = await addVolume(store, {
          name: name as string,
          path: o.path,
          ...(blockSize !== undefined ? { blockSize } : {}),
          ...(o.policy !== undefined ? { policy: o.policy } : {}),
          ...(o.tag !== undefined ? { tags: o.tag } : {}),
        });
        return { rec: added, snapshots: snaps };
      }, { volume: name as string, op: 'volume add' });
      const path = rec.path!;
      const text = snapshots === 0
        ? `added volume "${rec.name}": ${path}, ${formatBytes(rec.size)}, blocks of ${formatBytes(rec.blockSize)}`
        : [
          `attached ${path} to volume "${rec.name}" (${snapshots} snapshot(s) kept, blocks of ${formatBytes(rec.blockSize)})`,
          existsSync(path)
            ? `  write its latest snapshot onto it with \`appliance sync ${rec.name} --peer PEER --reverse --apply\` (or \`appliance restore ${rec.name} --to ${path}\`)`
            : `  ${path} does not exist yet: \`appliance sync ${rec.name} --peer PEER --reverse --apply\` (or \`appliance restore ${rec.name} --to ${path}\`) creates it`,
        ].join('\n');
      if (unprotected) currentIO().err(`note: no policy matches volume "${rec.name}": no job snapshots or replicates it until one does (an \`assign\` rule in config.yaml, or --policy NAME when adding it)\n`);
      return { json: { ...rec, snapshotsKept: snapshots }, text };
    }));

  volume
    .command('list')
    .description('list volumes: size, block size, snapshots, age of the last one, path')
    .action(run(async (g) => {
      const { withHomeStore } = await import('../../ops.js');
      const { formatBytes } = await import('../output.js');
      const { formatTable, formatAge } = await import('../table.js');
      const rows = await withHomeStore(g.home, async (_home, store) => {
        const out = [];
        for (const v of await store.listVolumes()) {
          const snaps = await store.listSnapshots(v.name);
          out.push({ ...v, snapshots: snaps.length, lastSnapshot: snaps.at(-1)?.created ?? null });
        }
        return out;
      });
      const text = rows.length === 0
        ? 'no volumes; add one with `appliance volume add VOL --path PATH`'
        : formatTable(
          ['NAME', 'SIZE', 'BLOCK', 'SNAPSHOTS', 'LAST', 'PATH'],
          rows.map((r) => [r.name, formatBytes(r.size), formatBytes(r.blockSize), r.snapshots, formatAge(r.lastSnapshot ?? undefined) + (r.materializing ? ' (restoring)' : ''), r.path ?? '-']),
        );
      return { json: rows, text };
    }));

  volume
    .command('remove <vol>')
    .description('unregister VOL and delete its snapshots (space is reclaimed by `appliance gc`); refused while one is held')
    .option('--force', 'remove it with its held snapshots too')
    .action(run(async (g, cmd, [name]) => {
      const { withHomeStore, removeVolume } = await import('../../ops.js');
      const force = cmd.opts<{ force?: boolean }>().force === true;
      const rec = await withHomeStore(g.home, (home, store) => removeVolume(home, store, name as string, { force }));
      return { json: { removed: rec.name }, text: `removed volume "${rec.name}" and its snapshots; run \`appliance gc\` to reclaim their space` };
    }));
}
