/**
 * Retention of EBS exports (cloud appliance): the volume's retention policy applied to its EBS
 * snapshots, as to its Tandem snapshots. Each export is a recovery point a failover or a drill
 * `--point` can start from, and EBS bills every block an export still holds; without this, the
 * exports of a volume exported every RPO would pile up in EBS for good.
 *
 * Kept, whatever the policy says:
 * - the newest export: the parent of the next incremental export, and the newest point;
 * - an export whose Tandem snapshot an operator holds (`appliance snapshots VOL --hold`);
 * - the points of active failovers and drills (their images map them; a failback diffs against
 *   the failover's point);
 * - an export an image maps (DeleteSnapshot would refuse it: InvalidSnapshot.InUse), e.g. an AMI
 *   an operator registered from it.
 * The exports in between are bucketed by their point in time (the Tandem snapshot's time, or the
 * export's when that snapshot is gone) with the same GFS rule (policy/retention.ts).
 *
 * Crash-safe, in this order: the exports to delete are first added to `ebs-deleting`, then taken
 * out of `ebs-exports` (no failover or drill picks them from then on), then deleted in EBS, then
 * taken out of `ebs-deleting`. A run killed anywhere, or a DeleteSnapshot that fails (throttled,
 * the network), leaves them in `ebs-deleting`, and the next run deletes them first: nothing is
 * left behind in EBS unseen, and no recovery point names a deleted snapshot.
 */
import type { RawRetention } from '../config/schema.js';
import { selectRetained } from '../policy/retention.js';
import { exportPointTime, listExportRecords, NS_DELETING, NS_IMPORTS, updateExportRecords, type ExportRecord, type ImportRecord } from './lineage.js';
import type { EbsStore } from './types.js';
import type { Store } from '../../store/index.js';

/** What deleting EBS snapshots needs from EC2 (appliance/recovery/ec2.ts). */
export interface EbsSnapshotDeleter {
  /** Of `ids`, those an image maps. */
  inImages(ids: readonly string[]): Promise<Set<string>>;
  delete(id: string): Promise<'deleted' | 'gone' | 'in-use'>;
}

export interface ExportRetentionOptions {
  /** Tandem snapshot ids an operator holds: their exports stay. */
  readonly held?: ReadonlySet<string>;
  /** EBS snapshot ids recovery runs use (active failovers and drills): they stay. */
  readonly inUse?: ReadonlySet<string>;
  readonly now?: number;
  /** Say what would go; change nothing, delete nothing (EC2 is only asked which an image maps). */
  readonly dryRun?: boolean;
}

export interface ExportRetentionResult {
  readonly volume: string;
  /** EBS snapshots kept as exports. */
  readonly kept: string[];
  /** Deleted in EBS now (including those an earlier run left to delete). */
  readonly deleted: string[];
  /** Kept because an image maps them (they stay as exports). */
  readonly inImages: string[];
  /** Taken out of the exports but not yet deleted in EBS, with why: the next run tries again. */
  readonly failed: Array<{ readonly ebsSnapshotId: string; readonly error: string }>;
}

type DeletingStore = Pick<EbsStore, 'getMeta' | 'putMeta' | 'deleteMeta' | 'getSnapshot'>;

/** The exports of `volume` its retention does not keep, in EBS, deleted (see the module comment). */
export async function applyExportRetention(
  store: DeletingStore,
  ec2: EbsSnapshotDeleter | null,
  volume: string,
  retention: RawRetention | null,
  opts: ExportRetentionOptions = {},
): Promise<ExportRetentionResult> {
  const now = opts.now ?? Date.now();
  const exports = await listExportRecords(store, volume);
  const deleting = (await store.getMeta<ExportRecord[]>(NS_DELETING, volume)) ?? [];
  // No retention policy: every export stays; only what an earlier run left to delete is finished.
  const doomed = retention === null ? [] : await chooseDoomed(store, volume, exports, retention, now, opts);
  let inImages: string[] = [];
  let going = doomed;
  if (doomed.length > 0 && ec2 !== null) {
    const mapped = await ec2.inImages(doomed.map((e) => e.ebsSnapshotId));
    inImages = [...mapped];
    going = doomed.filter((e) => !mapped.has(e.ebsSnapshotId));
  }
  if (opts.dryRun || ec2 === null) {
    const gone = new Set(going.map((e) => e.ebsSnapshotId));
    return { volume, kept: exports.filter((e) => !gone.has(e.ebsSnapshotId)).map((e) => e.ebsSnapshotId), deleted: going.map((e) => e.ebsSnapshotId), inImages, failed: [] };
  }

  // 1. Named for deletion, durably, before anything else changes.
  const pending = [...deleting, ...going.filter((e) => !deleting.some((d) => d.ebsSnapshotId === e.ebsSnapshotId))];
  if (going.length > 0) await store.putMeta(NS_DELETING, volume, pending);
  // 2. Out of the exports (also those a killed run named but had not taken out yet).
  const out = new Set(pending.map((e) => e.ebsSnapshotId));
  const kept = exports.some((e) => out.has(e.ebsSnapshotId))
    ? await updateExportRecords(store, volume, (list) => list.filter((e) => !out.has(e.ebsSnapshotId)))
    : exports;
  // 3. Deleted in EBS; 4. what is done leaves the list.
  const { deleted, failed } = await deletePending(store, ec2, volume, pending);
  return { volume, kept: kept.map((e) => e.ebsSnapshotId), deleted, inImages, failed };
}

/**
 * Delete in EBS the snapshots named in `ebs-deleting` for `volume` (`pending`: that list as read),
 * and take those done out of it. A snapshot EBS no longer has counts as deleted; one that an image
 * maps, or whose DeleteSnapshot fails, stays listed for the next run.
 */
export async function deletePending(
  store: Pick<EbsStore, 'putMeta' | 'deleteMeta'>,
  ec2: Pick<EbsSnapshotDeleter, 'delete'>,
  volume: string,
  pending: readonly ExportRecord[],
): Promise<{ deleted: string[]; failed: Array<{ ebsSnapshotId: string; error: string }> }> {
  const deleted: string[] = [];
  const failed: Array<{ ebsSnapshotId: string; error: string }> = [];
  const left: ExportRecord[] = [];
  for (const e of pending) {
    try {
      const r = await ec2.delete(e.ebsSnapshotId);
      if (r === 'in-use') {
        // An image mapped it after the check: it stays, and is tried again until the image goes.
        left.push(e);
        failed.push({ ebsSnapshotId: e.ebsSnapshotId, error: 'an image maps it (InvalidSnapshot.InUse); deregister the image, or it stays' });
      } else {
        deleted.push(e.ebsSnapshotId);
      }
    } catch (err) {
      left.push(e);
      failed.push({ ebsSnapshotId: e.ebsSnapshotId, error: (err as Error).message });
    }
  }
  if (left.length > 0) await store.putMeta(NS_DELETING, volume, left);
  else if (pending.length > 0) await store.deleteMeta(NS_DELETING, volume);
  return { deleted, failed };
}

/**
 * After the last failback of a failover (its run `failed-back`): the EBS snapshots the failbacks
 * took of the EC2 volumes (CreateSnapshot, tagged `tandem:run`) have been imported, and nothing
 * builds on them any more (a failback diffs against the failover's point; replication and exports
 * against Tandem snapshots). They are named in `ebs-deleting`, taken out of `ebs-imports`, and
 * deleted, as retention deletes exports: what fails stays listed, for the next retention run.
 */
export async function deleteFailbackSnapshots(
  store: Pick<EbsStore, 'getMeta' | 'putMeta' | 'deleteMeta'>,
  ec2: Pick<EbsSnapshotDeleter, 'delete'>,
  taken: ReadonlyArray<{ readonly ebsSnapshotId: string; readonly volume: string; readonly volumeSizeGiB: number }>,
): Promise<{ deleted: string[]; failed: Array<{ ebsSnapshotId: string; error: string }> }> {
  const out = { deleted: [] as string[], failed: [] as Array<{ ebsSnapshotId: string; error: string }> };
  for (const volume of new Set(taken.map((t) => t.volume))) {
    const imports = (await store.getMeta<ImportRecord[]>(NS_IMPORTS, volume)) ?? [];
    const mine = taken.filter((t) => t.volume === volume);
    const ids = new Set(mine.map((t) => t.ebsSnapshotId));
    const deleting = (await store.getMeta<ExportRecord[]>(NS_DELETING, volume)) ?? [];
    const pending: ExportRecord[] = [...deleting.filter((d) => !ids.has(d.ebsSnapshotId)), ...mine.map((t) => {
      const imp = imports.find((i) => i.ebsSnapshotId === t.ebsSnapshotId);
      return { ebsSnapshotId: t.ebsSnapshotId, tandemSnapshot: imp?.tandemSnapshot ?? '', created: imp?.created ?? new Date().toISOString(), parentEbsSnapshotId: null, size: imp?.size ?? 0, volumeSizeGiB: t.volumeSizeGiB };
    })];
    await store.putMeta(NS_DELETING, volume, pending);
    if (imports.some((i) => ids.has(i.ebsSnapshotId))) await store.putMeta(NS_IMPORTS, volume, imports.filter((i) => !ids.has(i.ebsSnapshotId)));
    const r = await deletePending(store, ec2, volume, pending);
    out.deleted.push(...r.deleted);
    out.failed.push(...r.failed);
  }
  return out;
}

/** The exports the policy does not keep, oldest first (see the module comment for what always stays). */
async function chooseDoomed(store: DeletingStore, volume: string, exports: readonly ExportRecord[], retention: RawRetention, now: number, opts: ExportRetentionOptions): Promise<ExportRecord[]> {
  if (exports.length <= 1) return [];
  const dated = [];
  for (const e of exports) {
    dated.push({ id: e.ebsSnapshotId, created: exportPointTime(e, await store.getSnapshot(volume, e.tandemSnapshot)) });
  }
  const pinned = new Set<string>([exports[exports.length - 1]!.ebsSnapshotId]);
  for (const e of exports) {
    if (opts.held?.has(e.tandemSnapshot) || opts.inUse?.has(e.ebsSnapshotId)) pinned.add(e.ebsSnapshotId);
  }
  const keep = selectRetained(dated, retention, now, pinned);
  return exports.filter((e) => !keep.has(e.ebsSnapshotId));
}

/**
 * {@link applyExportRetention} on this appliance: EC2 from the SDK's standard chain, the holds
 * of the volume, and the points of the active failovers and drills. A volume never exported
 * makes no AWS call.
 */
export async function retainExports(
  store: DeletingStore & Pick<Store, 'listMeta'>,
  volume: string,
  retention: RawRetention | null,
  opts: { now?: number; dryRun?: boolean } = {},
): Promise<ExportRetentionResult | null> {
  const exports = await listExportRecords(store, volume);
  const deleting = (await store.getMeta<ExportRecord[]>(NS_DELETING, volume)) ?? [];
  if (deleting.length === 0 && (retention === null || exports.length <= 1)) return null;
  const { listHolds } = await import('../snapshot-admin.js');
  const { RUNS_NS } = await import('../recovery/state.js');
  const held = new Set((await listHolds(store, volume)).keys());
  const inUse = new Set<string>();
  for (const [, run] of await store.listMeta<{ status?: string; points?: Array<{ ebsSnapshotId?: string }> }>(RUNS_NS)) {
    if (run.status !== 'active') continue;
    for (const p of run.points ?? []) if (typeof p.ebsSnapshotId === 'string') inUse.add(p.ebsSnapshotId);
  }
  const ec2 = await import('../recovery/ec2.js');
  const client = ec2.ec2Client();
  const destroy = () => client.destroy();
  const deleter: EbsSnapshotDeleter = { inImages: (ids) => ec2.snapshotsInImages(client, ids), delete: (id) => ec2.deleteEbsSnapshot(client, id) };
  try {
    return await applyExportRetention(store, deleter, volume, retention, { held, inUse, ...opts });
  } finally {
    destroy();
  }
}
