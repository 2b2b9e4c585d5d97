/**
 * `appliance ebs export|import|list`: incremental EBS snapshots out of and into the store
 * (the cloud appliance's failover and failback paths). Library: appliance/ebs.
 */
import type { Command } from 'commander';
import { run } from '../output.js';
import type { Progress } from '../progress.js';

export const order = 60;

export function define(program: Command): void {
  const ebs = program.command('ebs').description('export snapshots to EBS and import EBS snapshots (incremental, through the EBS direct APIs)');

  ebs
    .command('export <vol>')
    .description("upload VOL's latest snapshot (or --snapshot) as an EBS snapshot: only blocks changed since the last export; prints the EBS snapshot id")
    .option('--snapshot <id>', 'the Tandem snapshot to export (default: the latest)')
    .option('--kms-key <arn>', 'encrypt the EBS snapshot with this KMS key')
    .option('--description <text>', 'EBS snapshot description')
    .action(run(async (g, cmd, [vol]) => {
      const o = cmd.opts<{ snapshot?: string; kmsKey?: string; description?: string }>();
      const volume = vol as string;
      const { withHomeStore } = await import('../../ops.js');
      const { exportSnapshot } = await import('../../ebs/index.js');
      const { startProgress } = await import('../progress.js');
      const { currentIO, formatBytes } = await import('../output.js');
      const r = await withHomeStore(g.home, async (home, store) => {
        const snap = await store.resolveSnapshot(o.snapshot !== undefined ? `${volume}@${o.snapshot}` : volume);
        let bar = null as Progress | null;
        try {
          return await exportSnapshot(store, snap, {
            appliance: home.identity.name,
            ...(o.kmsKey !== undefined ? { kmsKeyArn: o.kmsKey } : {}),
            ...(o.description !== undefined ? { description: o.description } : {}),
            onProgress: (done, total) => {
              bar ??= startProgress(g, { total, unit: 'blocks', label: `ebs export ${volume}` });
              bar.update(done);
            },
          });
        } finally {
          bar?.stop();
        }
      }, { volume, op: 'ebs-export' });
      const mbps = r.seconds > 0 ? Math.round((r.bytesUploaded / 1e6 / r.seconds) * 10) / 10 : 0;
      currentIO().err(`ebs export ${volume}@${r.tandemSnapshot} -> ${r.ebsSnapshotId}${r.parentEbsSnapshotId ? ` (parent ${r.parentEbsSnapshotId})` : ''}${r.resumed ? ', resumed' : ''}: uploaded ${r.blocksUploaded} blocks (${formatBytes(r.bytesUploaded)}) in ${r.seconds.toFixed(1)}s (${mbps} MB/s), ${r.requests} requests\n`);
      return { json: { ...r, mbPerSecond: mbps }, text: r.ebsSnapshotId };
    }));

  ebs
    .command('import <snapId>')
    .description('make a Tandem snapshot of VOL from an EBS snapshot, reading only the blocks changed since an earlier export or import of VOL when EBS can diff them; prints the Tandem snapshot id')
    .requiredOption('--volume <vol>', 'the Tandem volume to import into (created if new)')
    .option('--base <snapId>', 'diff against this EBS snapshot (an earlier export or import of VOL) instead of the newest one')
    .action(run(async (g, cmd, [snapId]) => {
      const o = cmd.opts<{ volume: string; base?: string }>();
      const { withHomeStore } = await import('../../ops.js');
      const { importSnapshot } = await import('../../ebs/index.js');
      const { startProgress } = await import('../progress.js');
      const { currentIO, formatBytes } = await import('../output.js');
      let bar = null as Progress | null;
      const r = await withHomeStore(g.home, async (_home, store) => {
        try {
          return await importSnapshot(store, snapId as string, o.volume, {
            ...(o.base !== undefined ? { baseEbsSnapshotId: o.base } : {}),
            onProgress: (done) => {
              // The total is known only page by page: show blocks fetched.
              bar ??= startProgress(g, { total: Number.MAX_SAFE_INTEGER, unit: 'blocks', label: `ebs import ${snapId as string}` });
              bar.update(done);
            },
          });
        } finally {
          bar?.stop();
        }
      }, { volume: o.volume, op: 'ebs-import' });
      const mbps = r.seconds > 0 ? Math.round((r.bytesFetched / 1e6 / r.seconds) * 10) / 10 : 0;
      currentIO().err(`ebs import ${r.ebsSnapshotId} -> ${o.volume}@${r.snapshot.id}${r.baseEbsSnapshotId ? ` (changes since ${r.baseEbsSnapshotId})` : ''}: fetched ${r.blocksFetched} blocks (${formatBytes(r.bytesFetched)}) in ${r.seconds.toFixed(1)}s (${mbps} MB/s)\n`);
      return { json: { ...r, mbPerSecond: mbps }, text: r.snapshot.id };
    }));

  ebs
    .command('adopt <vol>')
    .description("a new cloud appliance, after the old one was lost: take over VOL's EBS exports (the recovery points) and import the newest, so the next push and export are incremental")
    .option('--appliance <name>', 'only the exports made by this appliance (when EBS holds exports of VOL from several)')
    .option('--dry-run', 'list the exports found; import and record nothing')
    .action(run(async (g, cmd, [vol]) => {
      const volume = vol as string;
      const o = cmd.opts<{ appliance?: string; dryRun?: boolean }>();
      const { withHomeStore } = await import('../../ops.js');
      const { adoptExports } = await import('../../ebs/adopt.js');
      const { ec2Client } = await import('../../recovery/ec2.js');
      const { startProgress } = await import('../progress.js');
      const { formatBytes } = await import('../output.js');
      const ec2 = ec2Client();
      let bar = null as Progress | null;
      try {
        const r = await withHomeStore(g.home, async (_home, store) => adoptExports(store, ec2, volume, {
          ...(o.appliance !== undefined ? { appliance: o.appliance } : {}),
          dryRun: o.dryRun === true,
          onProgress: (done) => {
            bar ??= startProgress(g, { total: Number.MAX_SAFE_INTEGER, unit: 'blocks', label: `ebs adopt ${volume}` });
            bar.update(done);
          },
        }), { volume, op: 'ebs-import' });
        const lines = r.adopted.map((f) => `${o.dryRun ? 'found  ' : 'adopted'}  ${f.tandemSnapshot}  ${f.ebsSnapshotId}${f.appliance ? `  (made by ${f.appliance})` : ''}`);
        if (r.imported) {
          lines.push(`${volume}@${r.imported.snapshot.id}: ${r.imported.blocksFetched > 0 ? `imported from ${r.imported.ebsSnapshotId}, ${r.imported.blocksFetched} blocks (${formatBytes(r.imported.bytesFetched)}) in ${r.imported.seconds.toFixed(1)}s` : 'already here'}; the next push of ${volume} and its next export are incremental`);
        }
        return { json: r, text: lines.join('\n') };
      } finally {
        bar?.stop();
        ec2.destroy();
      }
    }));

  ebs
    .command('list <vol>')
    .description("VOL's exports to EBS and imports from EBS, oldest first")
    .action(run(async (g, _cmd, [vol]) => {
      const volume = vol as string;
      const { withHomeStore } = await import('../../ops.js');
      const { listExports, listImportRecords, getPending } = await import('../../ebs/index.js');
      const { exports, imports, pending } = await withHomeStore(g.home, async (_home, store) => ({
        exports: await listExports(store, volume),
        imports: await listImportRecords(store, volume),
        pending: await getPending(store, volume),
      }));
      const lines = [
        ...exports.map((e) => `export  ${e.created}  ${e.tandemSnapshot} -> ${e.ebsSnapshotId}${e.parentEbsSnapshotId ? `  (parent ${e.parentEbsSnapshotId})` : ''}`),
        ...imports.map((i) => `import  ${i.created}  ${i.ebsSnapshotId} -> ${i.tandemSnapshot}${i.baseEbsSnapshotId ? `  (changes since ${i.baseEbsSnapshotId})` : ''}`),
      ];
      if (pending) lines.push(`pending ${pending.started}  ${pending.tandemSnapshot} -> ${pending.ebsSnapshotId || '(starting)'}  (rerun \`appliance ebs export ${volume}\` to resume)`);
      return { json: { volume, exports, imports, pending }, text: lines.length ? lines.join('\n') : `volume "${volume}" has no EBS exports or imports` };
    }));
}
