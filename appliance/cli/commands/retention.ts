/**
 * `appliance retention [VOL] [--dry-run]`: apply each volume's retention policy now (what the
 * daemon does after every job), then reclaim space with gc. Pinned snapshots (sync bases, the
 * last EBS export) and the newest snapshot are always kept. The volume's EBS exports (cloud
 * appliance) get the same policy (appliance/ebs/retention.ts). `--dry-run` lists what would go.
 */
import type { Command } from 'commander';
import { formatBytes, packsNotMergedText, run } from '../output.js';

export const order = 62;

export function define(program: Command): void {
  program
    .command('retention [volume]')
    .description('delete the snapshots the policy does not keep (then gc); --dry-run shows them')
    .option('--dry-run', 'list what would be deleted; delete nothing')
    .action(run(async (g, cmd, args) => {
      const only = args[0] as string | undefined;
      const dryRun = (cmd.opts() as { dryRun?: boolean }).dryRun === true;
      const { withHomeStore } = await import('../../ops.js');
      const { loadConfig, policyFor } = await import('../../config/index.js');
      const { applyRetention, selectRetained, pinnedSnapshots } = await import('../../policy/index.js');
      const { TandemError } = await import('../../../common/errors.js');
      return withHomeStore(g.home, async (home, store) => {
        const config = await loadConfig(home);
        const volumes = (await store.listVolumes()).filter((v) => only === undefined || v.name === only);
        if (only !== undefined && volumes.length === 0) throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${only}"; \`appliance volume list\` shows the volumes`, { details: { volume: only } });
        const { retainExports } = await import('../../ebs/retention.js');
        type EbsOutcome = { kept: string[]; deleted: string[]; inImages: string[]; failed: Array<{ ebsSnapshotId: string; error: string }> };
        const results: Array<{ volume: string; policy: string | null; kept: string[]; deleted: string[]; ebs?: EbsOutcome }> = [];
        for (const v of volumes) {
          const policy = policyFor(config, v);
          const snaps = await store.listSnapshots(v.name);
          if (policy === null || policy.retention === null) {
            results.push({ volume: v.name, policy: policy?.name ?? null, kept: snaps.map((s) => s.id), deleted: [] });
          } else if (dryRun) {
            const keep = selectRetained(snaps, policy.retention, Date.now(), await pinnedSnapshots(store, v.name));
            results.push({ volume: v.name, policy: policy.name, kept: snaps.filter((s) => keep.has(s.id)).map((s) => s.id), deleted: snaps.filter((s) => !keep.has(s.id)).map((s) => s.id) });
          } else {
            const r = await applyRetention(store, v.name, policy);
            results.push({ volume: v.name, policy: policy.name, kept: r.kept, deleted: r.deleted });
          }
          // Its EBS exports too (cloud appliance): the same policy, applied to the EBS snapshots.
          let ebs: EbsOutcome | null = null;
          try {
            // Without a retention policy, only what an earlier run could not delete in EBS is finished.
            const r = await retainExports(store, v.name, policy?.retention ?? null, { dryRun });
            ebs = r && { kept: r.kept, deleted: r.deleted, inImages: r.inImages, failed: r.failed };
          } catch (e) {
            ebs = { kept: [], deleted: [], inImages: [], failed: [{ ebsSnapshotId: '-', error: (e as Error).message }] };
          }
          if (ebs !== null) results[results.length - 1]!.ebs = ebs;
        }
        const deleted = results.reduce((a, r) => a + r.deleted.length, 0);
        const gc = !dryRun && deleted > 0 ? await store.gc() : null;
        const ebsLines = (e: EbsOutcome | undefined) => e === undefined ? '' : [
          `\n  EBS exports: ${e.deleted.length} ${dryRun ? 'would be deleted' : 'deleted'}, ${e.kept.length} kept${e.inImages.length > 0 ? ` (${e.inImages.join(', ')} kept: an image maps ${e.inImages.length === 1 ? 'it' : 'them'})` : ''}`,
          ...e.deleted.map((id) => `\n    ${id}`),
          ...e.failed.map((f) => `\n  EBS: could not delete ${f.ebsSnapshotId}: ${f.error}; the next retention run tries again (\`appliance doctor\` lists what is left)`),
        ].join('');
        const lines = results.map((r) => `${r.volume}: ${r.policy === null ? 'no policy, all kept' : `${r.deleted.length} ${dryRun ? 'would be deleted' : 'deleted'}, ${r.kept.length} kept (policy ${r.policy})`}${r.deleted.length > 0 ? `\n  ${r.deleted.join('\n  ')}` : ''}${ebsLines(r.ebs)}`);
        if (gc) lines.push(`gc: ${formatBytes(gc.bytesReclaimed)} reclaimed`, ...(packsNotMergedText(gc) ? [`gc: ${packsNotMergedText(gc)}`] : []));
        return { json: { dryRun, volumes: results, ...(gc ? { gc } : {}) }, text: lines.join('\n') || 'no volumes' };
      });
    }));
}
