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
      const { formatBytes } = await import('../output.js');
      const r = await withHomeStore(g.home, (_home, store) => store.gc());
      return {
        json: r,
        text: `removed ${r.blocksRemoved} blocks (${formatBytes(r.bytesReclaimed)}) and ${r.nodesRemoved} nodes, kept ${r.blocksKept} blocks, rewrote ${r.packsRewritten} packs`,
      };
    }));
}
