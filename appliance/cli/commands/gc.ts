/** `appliance gc`: reclaim the space of blocks and nodes no retained snapshot references. */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 60;

export function define(program: Command): void {
  program
    .command('gc')
    .description('reclaim blocks and tree nodes that no snapshot references (rewrites packs)')
    .action(run(async (g) => {
      const { withHomeStore } = await import('../../ops.js');
      const { formatBytes, packsNotMergedText } = await import('../output.js');
      const { startProgress } = await import('../progress.js');
      // The copy is what takes long on a large store: a bar of index entries handled (on a TTY).
      let bar: ReturnType<typeof startProgress> | null = null;
      const r = await withHomeStore(g.home, async (_home, store) => {
        try {
          return await store.gc({
            onProgress: (p) => {
              bar ??= startProgress(g, { total: p.entriesTotal, unit: 'blocks', label: 'gc' });
              bar.update(p.entriesDone, { copied: formatBytes(p.bytesCopied) });
            },
          });
        } finally {
          bar?.stop();
        }
      });
      const text = `removed ${r.blocksRemoved} blocks (${formatBytes(r.bytesReclaimed)}) and ${r.nodesRemoved} nodes, kept ${r.blocksKept} blocks, rewrote ${r.packsRewritten} packs`;
      // Not a failure (nothing is lost), but the operator should know the packs were not merged, and why.
      const notMerged = packsNotMergedText(r);
      return { json: r, text: notMerged ? `${text}\n${notMerged}` : text };
    }));
}
