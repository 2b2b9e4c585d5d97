/** `appliance snapshot VOL [--changed-blocks FILE]`: scan a volume and commit a snapshot. */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 30;

export function define(program: Command): void {
  program
    .command('snapshot <vol>')
    .description('read VOL (all of it, or only the blocks in --changed-blocks) and commit a snapshot; prints its id')
    .option('--changed-blocks <file>', 'read only the blocks listed in FILE (format: appliance/volumes/README.md)')
    .action(run(async (g, cmd, [name]) => {
      const o = cmd.opts<{ changedBlocks?: string }>();
      const { commandSignal, currentIO, formatBytes, ownCommandLine } = await import('../output.js');
      const io = currentIO();
      // A full scan by a one-shot CLI (a server keeps its hash workers warm).
      if (o.changedBlocks === undefined && ownCommandLine()) (await import('../../../store/scan.js')).prestartScan();
      const { withHomeStore, snapshotVolumeHooked } = await import('../../ops.js');
      const { startProgress } = await import('../progress.js');
      const notices: string[] = [];
      let last = { blocksDone: 0, blocksTotal: 0, bytesRead: 0, bytesReadDirect: 0, blocksStored: 0, blocksStoredAsDeltas: 0 };
      let bar: ReturnType<typeof startProgress> | null = null;
      const started = process.hrtime.bigint();
      const { trace } = await import('../../../sync/trace.js');
      trace('snapshot command: modules loaded');
      const rec = await withHomeStore(g.home, async (home, store) => {
        trace('store open');
        try {
          const signal = commandSignal();
          return await snapshotVolumeHooked(home, store, name as string, {
            ...(o.changedBlocks !== undefined ? { changedBlocksFile: o.changedBlocks } : {}),
            ...(signal ? { signal } : {}),
            onNotice: (m) => {
              notices.push(m);
              io.err(`note: ${m}\n`);
            },
            onProgress: (p) => {
              last = p;
              bar ??= startProgress(g, { total: p.blocksTotal, unit: 'blocks', label: `snapshot ${name as string}` });
              bar.update(p.blocksDone, { read: formatBytes(p.bytesRead), stored: p.blocksStored });
            },
          });
        } finally {
          bar?.stop();
        }
      }, { volume: name as string, op: 'snapshot' });
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      const figures = {
        bytesRead: last.bytesRead,
        /** Of bytesRead, read past the page cache (a block device, O_DIRECT). */
        bytesReadDirect: last.bytesReadDirect,
        blocksRead: last.blocksDone,
        blocksStored: last.blocksStored,
        /** Of blocksStored, stored as the bytes that differ from the blocks they replaced, or from zeros (store/README.md, "Delta records"). */
        blocksStoredAsDeltas: last.blocksStoredAsDeltas,
        seconds: Math.round(seconds * 1000) / 1000,
        mbPerSecond: seconds > 0 ? Math.round((last.bytesRead / 1e6 / seconds) * 10) / 10 : 0,
      };
      const direct = figures.bytesReadDirect === 0 ? '' : figures.bytesReadDirect === figures.bytesRead ? ', past the page cache' : `, ${formatBytes(figures.bytesReadDirect)} of it past the page cache`;
      io.err(`snapshot ${rec.volume}@${rec.id}: read ${formatBytes(figures.bytesRead)} in ${figures.seconds}s (${figures.mbPerSecond} MB/s${direct}), stored ${figures.blocksStored} new blocks${figures.blocksStoredAsDeltas > 0 ? ` (${figures.blocksStoredAsDeltas} as only the bytes that differ from the blocks they replaced or from zeros)` : ''}\n`);
      return { json: { snapshot: rec, ...figures, notices }, text: rec.id };
    }));
}
