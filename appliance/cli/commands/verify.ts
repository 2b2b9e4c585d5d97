/** `appliance verify [VOL[@SNAP]]`: re-read and re-hash every node and block; exit 1 on any problem. */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 50;

export function define(program: Command): void {
  program
    .command('verify [spec]')
    .description('re-check every hash of every snapshot (or of VOL, or of VOL@SNAP); exits 1 and lists each problem')
    .option('--bwlimit <rate>', 'read at most RATE a second (e.g. 100MiB), to leave the disk to replication')
    .action(run(async (g, cmd, [spec]) => {
      const { withHomeStore, parseSnapshotSpec } = await import('../../ops.js');
      const { commandSignal, formatBytes, parseSize } = await import('../output.js');
      const { startProgress } = await import('../progress.js');
      const { TandemError } = await import('../../../common/errors.js');
      const filter: { volume?: string; snapshot?: string } = spec === undefined ? {} : parseSnapshotSpec(spec as string);
      const { bwlimit } = cmd.opts<{ bwlimit?: string }>();
      const bytesPerSecond = bwlimit === undefined ? undefined : parseSize(bwlimit);
      if (bytesPerSecond === 0) throw new TandemError('ERR_USAGE', '--bwlimit must be more than 0 bytes a second');
      // Reading back a large store takes long: a bar of the snapshots' blocks covered (on a TTY).
      let bar: ReturnType<typeof startProgress> | null = null;
      const report = await withHomeStore(g.home, async (_home, store) => {
        const { recordDamage } = await import('../../damage.js');
        try {
          const signal = commandSignal();
          const r = await store.verify(filter, {
            ...(bytesPerSecond ? { bytesPerSecond } : {}),
            ...(signal ? { signal } : {}),
            onProgress: (p) => {
              bar ??= startProgress(g, { total: p.blocksTotal, unit: 'blocks', label: 'verify' });
              bar.setTotal(p.blocksTotal); // an estimate until the end
              bar.update(p.blocksDone, { read: formatBytes(p.bytesRead), problems: p.problems });
            },
          });
          // What the paired appliance may heal by pushing good copies (appliance repair --push).
          await recordDamage(store, r, spec === undefined);
          return r;
        } finally {
          bar?.stop();
        }
      });
      const ok = report.problems.length === 0;
      const lines = [
        `checked ${report.snapshots} snapshots, ${report.nodes} nodes, ${report.blocks} blocks (${formatBytes(report.bytes)})`,
        ...report.problems.map((p) => `${p.code}: ${p.kind} ${p.hash} of ${p.volume}@${p.snapshot}, block index ${p.blockIndex}${p.detail !== undefined ? ` (${p.detail})` : ''}`),
        ...(ok ? ['ok'] : []),
        ...(report.problems.some((p) => p.code !== 'ERR_SNAPSHOT_INVALID') ? [`FAILED: ${report.problems.length} problems (ERR_VERIFY_FAILED); heal them with good copies from the paired appliance: \`appliance repair${spec === undefined ? '' : ` ${spec as string}`} --peer NAME\` here, or \`appliance repair --peer THIS --push\` on the appliance that replicates here`] : []),
        ...[...new Set(report.problems.filter((p) => p.code === 'ERR_SNAPSHOT_INVALID').map((p) => `${p.volume}@${p.snapshot}`))].map((s) => `FAILED: snapshot ${s} has a tree that does not fit its size or record (ERR_SNAPSHOT_INVALID): no restore can trust it and no copy heals it; delete it (\`appliance snapshots ${s.replace('@', ' --delete ')}\`) and sync again from a sound appliance`),
      ];
      return { json: { ok, ...report }, text: lines.join('\n'), exitCode: ok ? 0 : 1 };
    }));
}
