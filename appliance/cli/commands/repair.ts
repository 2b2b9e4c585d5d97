/** `appliance repair [VOL[@SNAP]] --peer NAME`: heal what verify finds with good copies from the peer. */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 55;

export function define(program: Command): void {
  program
    .command('repair [spec]')
    .description('verify (all, VOL or VOL@SNAP), fetch a good copy of each damaged or missing block and tree node from the peer, put it back, verify again; exits 1 while problems are left')
    .requiredOption('--peer <name>', 'the paired appliance to take good copies from (`appliance peer list`)')
    .option('--push', "heal the peer's store instead: send it this store's copies of the blocks its last verify found damaged or missing")
    .action(run(async (g, cmd, [spec]) => {
      const { withHomeStore, parseSnapshotSpec } = await import('../../ops.js');
      const { repairStore } = await import('../../repair.js');
      const { currentIO, formatBytes } = await import('../output.js');
      const { startProgress } = await import('../progress.js');
      const { TandemError } = await import('../../../common/errors.js');
      const { peer, push } = cmd.opts<{ peer: string; push?: boolean }>();
      if (push) {
        if (spec !== undefined) throw new TandemError('ERR_USAGE', 'repair --push heals what the peer\'s last verify found; it takes no VOL[@SNAP]');
        const { pushRepairs } = await import('../../repair.js');
        const p = await withHomeStore(g.home, (_home, store) => pushRepairs(store, peer));
        // Blocks repaired include those put back under a node; what is left is counted per list.
        const left = p.notHeld.length + p.damagedHere.length;
        const nodesLeft = p.peerDamagedNodes - p.nodesRepaired;
        const ok = left === 0 && nodesLeft <= 0;
        // The epoch: the peer keeps no verify record (GET /v1/damage of a store never verified).
        if (Date.parse(p.peerVerifiedAt) === 0) {
          const text = `${peer} has not verified its store yet, so it knows of nothing to heal and nothing was sent. Run \`appliance verify\` on ${peer} (its daemon also verifies on schedule), then this again`;
          return { json: { ok: false, neverVerified: true, ...p }, text, exitCode: 1 };
        }
        const lines = [
          `${peer}'s last verify (${p.peerVerifiedAt}) found ${p.peerDamagedBlocks} damaged blocks and ${p.peerDamagedNodes} damaged tree nodes; sent ${p.blocksSent} good copies of blocks, ${p.blocksRepaired} repaired there, and put back ${p.nodesRepaired} tree nodes`,
          ...p.notHeld.map((h) => `not held here: block ${h}`),
          ...p.damagedHere.map((h) => `damaged here too: block ${h}`),
          ...[...new Set(p.nodesNotRepaired)].map((h) => `not healed: tree node ${h} (this store lacks it or something under it, or holds it damaged too)`),
          ok ? `ok: nothing left for ${peer} to heal (its next verify confirms it)` : `FAILED: ${left} blocks and ${Math.max(0, nodesLeft)} tree nodes left on ${peer}`,
        ];
        return { json: { ok, ...p }, text: lines.join('\n'), exitCode: ok ? 0 : 1 };
      }
      const filter: { volume?: string; snapshot?: string } = spec === undefined ? {} : parseSnapshotSpec(spec as string);
      const io = currentIO();
      // The verify before and after the repair read the store: a bar for each (on a TTY).
      let bar: ReturnType<typeof startProgress> | null = null;
      let barPass = '';
      const r = await withHomeStore(g.home, async (_home, store) => {
        try {
          return await repairStore(store, peer, filter, {
            onNotice: (m) => io.err(`note: ${m}\n`),
            onVerifyProgress: (pass, p) => {
              if (barPass !== pass) {
                bar?.stop();
                bar = startProgress(g, { total: p.blocksTotal, unit: 'blocks', label: pass === 'before' ? 'verify' : 'verify again' });
                barPass = pass;
              }
              bar!.setTotal(p.blocksTotal);
              bar!.update(p.blocksDone, { read: formatBytes(p.bytesRead), problems: p.problems });
            },
          });
        } finally {
          bar?.stop();
        }
      });
      const ok = r.after.problems.length === 0;
      const lines = [
        `found ${r.before.problems.length} problems in ${r.before.snapshots} snapshots; repaired ${r.blocksRepaired} blocks and ${r.nodesRepaired} tree nodes from ${peer}`,
        ...r.unrepaired.map((u) => `not repaired: ${u.kind} ${u.hash}: ${u.code}: ${u.message}`),
        ...r.after.problems.map((p) => `${p.code}: ${p.kind} ${p.hash} of ${p.volume}@${p.snapshot}, block index ${p.blockIndex}`),
        ok ? 'ok: verify finds nothing wrong'
          : `FAILED: ${r.after.problems.length} problems left (ERR_VERIFY_FAILED); the peer lacks good copies of them: repair from another peer, or delete the affected snapshots (retention) and run \`appliance gc\``,
      ];
      return { json: { ok, ...r }, text: lines.join('\n'), exitCode: ok ? 0 : 1 };
    }));
}
