/** `appliance restore VOL[@SNAP] --to PATH [--force]`: write a snapshot out as an image or onto a device. */
import type { Command } from 'commander';
import { run } from '../output.js';
import { TandemError } from '../../../common/errors.js';

export const order = 40;

export function define(program: Command): void {
  program
    .command('restore <spec>')
    .description('write snapshot VOL[@SNAP] (default: the latest) to PATH: a new sparse image, or only the differing blocks of an existing one')
    .requiredOption('--to <path>', 'image file or device to write')
    .option('--force', "resize an existing image of another size, write onto a larger device, or overwrite another volume's device or image")
    .action(run(async (g, cmd, [spec]) => {
      const o = cmd.opts<{ to: string; force?: boolean }>();
      if (o.to.trim() === '') throw new TandemError('ERR_USAGE', '--to is empty: name the image file or device to write');
      const { withHomeStore, restoreVolumeLocked, parseSnapshotSpec } = await import('../../ops.js');
      const { startProgress } = await import('../progress.js');
      const { commandSignal, currentIO, formatBytes } = await import('../output.js');
      const { volume } = parseSnapshotSpec(spec as string);
      let bar: ReturnType<typeof startProgress> | null = null;
      const started = process.hrtime.bigint();
      const r = await withHomeStore(g.home, async (home, store) => {
        try {
          const signal = commandSignal();
          return await restoreVolumeLocked(store, spec as string, o.to, {
            ...(o.force ? { force: true } : {}),
            ...(signal ? { signal } : {}),
            lockVolume: (v, op) => home.lockVolume(v, op),
            onProgress: (p) => {
              bar ??= startProgress(g, { total: p.blocksTotal, unit: 'blocks', label: `restore ${volume}` });
              bar.update(p.blocksDone, { written: formatBytes(p.bytesWritten) });
            },
          });
        } finally {
          bar?.stop();
        }
      }, { volume, op: 'restore' });
      const seconds = Math.round(Number(process.hrtime.bigint() - started) / 1e6) / 1000;
      const { snapshot, ...figures } = r;
      currentIO().err(`restored ${snapshot.volume}@${snapshot.id} to ${r.path}: ${r.created ? 'new image' : `compared ${r.blocksCompared} blocks (read ${formatBytes(r.bytesRead)}: the target's holes are not read)`}, wrote ${r.blocksWritten} blocks${r.blocksZeroed ? ` and zeroed ${r.blocksZeroed}` : ''} (${formatBytes(r.bytesWritten)}) in ${seconds}s\n`);
      return { json: { snapshot: { volume: snapshot.volume, id: snapshot.id, size: snapshot.size }, ...figures, seconds }, text: r.path };
    }));
}
