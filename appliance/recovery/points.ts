/**
 * Recovery points: which EBS snapshot of each volume a failover or drill launches from.
 *
 * A point is an EBS export of a Tandem snapshot (appliance/ebs keeps the mapping). For a
 * point in time T the newest export whose Tandem snapshot was taken at or before T is used;
 * every volume of a plan is resolved against the same T, so a server's disks come back from
 * one moment (group snapshots are taken together, see the scheduler).
 */
import { TandemError } from '../../common/errors.js';
import type { Store, SnapshotRecord } from '../../store/index.js';
import { exportPointTime } from '../ebs/lineage.js';

export interface ExportEntry {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly created: string;
  /** The volume's byte size at that point, as the export recorded it. */
  readonly size?: number;
}

export interface RecoveryPoint {
  readonly volume: string;
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  /** When the volume was read: the recovery point itself. */
  readonly pointTime: string;
  /** Volume size in bytes (the EBS volume is this rounded up to whole GiB). */
  readonly size: number;
  /** True when this run exported the snapshot just now (failover of the freshest data). */
  readonly exportedNow: boolean;
}

export const GiB = 1024 ** 3;

export function sizeGiB(bytes: number): number {
  return Math.max(1, Math.ceil(bytes / GiB));
}

/** Parse --point: an ISO time, or a snapshot id of the form the store makes (time-sortable). */
export function parsePoint(s: string | undefined): Date | undefined {
  if (s === undefined) return undefined;
  const t = Date.parse(s);
  if (Number.isNaN(t)) {
    throw new TandemError('ERR_USAGE', `--point "${s}" is not a time; write an ISO time such as 2026-11-25T09:30:00Z`);
  }
  return new Date(t);
}

/**
 * Pick the export of `volume` for point `at` (undefined: the newest). `exportNow` is called
 * when the newest Tandem snapshot has no export yet and no point was asked for: a failover
 * should come back from the freshest replicated data, not from the last scheduled export.
 */
export async function choosePoint(
  store: Store,
  volume: string,
  exports: readonly ExportEntry[],
  at: Date | undefined,
  exportNow: ((snap: SnapshotRecord) => Promise<ExportEntry>) | null,
  want?: SnapshotRecord,
): Promise<RecoveryPoint> {
  if (want !== undefined) {
    // The snapshot of a group run all the server's disks share (commonGroupRun).
    const e = exports.find((x) => x.tandemSnapshot === want.id) ?? (exportNow ? await exportNow(want) : undefined);
    if (e === undefined) throw new TandemError('ERR_EBS_NOT_EXPORTED', `snapshot ${volume}@${want.id} has no EBS export; run \`appliance ebs export ${volume} --snapshot ${want.id}\``, { details: { volume } });
    return { volume, ebsSnapshotId: e.ebsSnapshotId, tandemSnapshot: want.id, pointTime: want.created, size: want.size, exportedNow: !exports.includes(e) };
  }
  const vol = await store.getVolume(volume);
  const candidates: Array<{ e: ExportEntry; snap: SnapshotRecord | null; time: number }> = [];
  for (const e of exports) {
    const snap = await store.getSnapshot(volume, e.tandemSnapshot);
    candidates.push({ e, snap, time: Date.parse(exportPointTime(e, snap)) });
  }
  candidates.sort((a, b) => a.time - b.time);

  if (at === undefined && exportNow) {
    const latest = await store.latestSnapshot(volume);
    const newestExported = candidates[candidates.length - 1];
    if (latest && (!newestExported || newestExported.e.tandemSnapshot !== latest.id) && Date.parse(latest.created) > (newestExported?.time ?? -Infinity)) {
      const e = await exportNow(latest);
      return { volume, ebsSnapshotId: e.ebsSnapshotId, tandemSnapshot: latest.id, pointTime: latest.created, size: latest.size, exportedNow: true };
    }
  }
  const limit = at?.getTime() ?? Infinity;
  const pick = [...candidates].reverse().find((c) => c.time <= limit);
  if (!pick) {
    const why = candidates.length === 0
      ? `volume "${volume}" has never been exported to EBS; run \`appliance ebs export ${volume}\` on the cloud appliance (or let the daemon do it)`
      : `volume "${volume}" has no EBS export at or before ${at!.toISOString()}; the oldest is from ${new Date(candidates[0]!.time).toISOString()}`;
    throw new TandemError('ERR_EBS_NOT_EXPORTED', why, { details: { volume } });
  }
  const size = pick.snap?.size ?? pick.e.size ?? vol?.size;
  if (size === undefined) {
    throw new TandemError('ERR_SNAPSHOT_NOT_FOUND', `the size of volume "${volume}" is unknown (snapshot ${pick.e.tandemSnapshot} was deleted); export a newer snapshot`);
  }
  return {
    volume,
    ebsSnapshotId: pick.e.ebsSnapshotId,
    tandemSnapshot: pick.e.tandemSnapshot,
    pointTime: new Date(pick.time).toISOString(),
    size,
    exportedNow: false,
  };
}

/**
 * The disks of one server that are snapshotted together (a config group: the scheduler labels
 * each snapshot of one group run with `groupRun`) must come back from one group run, or the
 * server would boot with disks of different moments: a database's data from one, its log from
 * another. That happens when a disaster cuts a group's replication short: one volume's snapshot
 * of the last run arrived, the other's did not.
 *
 * While the newest snapshot (at or before `at`) of every volume is a group snapshot, returns the
 * newest group run they all have a snapshot of, exported (or, `canExport`, exportable now), with
 * those snapshots. Null otherwise: volumes not snapshotted as a group each take their own newest
 * point. `exportsOf`: each volume's EBS exports.
 */
export async function commonGroupRun(
  store: Store,
  volumes: readonly string[],
  at: Date | undefined,
  exportsOf: ReadonlyMap<string, readonly ExportEntry[]>,
  canExport: boolean,
): Promise<{ groupRun: string; snapshots: Map<string, SnapshotRecord>; newer: string[] } | null> {
  if (volumes.length < 2) return null;
  const limit = at?.getTime() ?? Infinity;
  const runs = new Map<string, Map<string, SnapshotRecord>>(); // volume → group run → snapshot
  const newest = new Map<string, SnapshotRecord>();
  for (const v of volumes) {
    const byRun = new Map<string, SnapshotRecord>();
    for (const s of await store.listSnapshots(v)) {
      if (Date.parse(s.created) > limit) continue;
      if (s.labels?.groupRun) byRun.set(s.labels.groupRun, s);
      const n = newest.get(v);
      if (n === undefined || s.created > n.created || (s.created === n.created && s.id > n.id)) newest.set(v, s);
    }
    if (!newest.get(v)?.labels?.groupRun) return null; // not (or no longer) snapshotted as a group
    runs.set(v, byRun);
  }
  const first = runs.get(volumes[0]!)!;
  const shared = [...first.keys()]
    .filter((g) => volumes.every((v) => runs.get(v)!.has(g)))
    .sort((a, b) => (first.get(b)!.created > first.get(a)!.created ? 1 : -1));
  for (const g of shared) {
    const snapshots = new Map(volumes.map((v) => [v, runs.get(v)!.get(g)!]));
    if (canExport || volumes.every((v) => (exportsOf.get(v) ?? []).some((e) => e.tandemSnapshot === snapshots.get(v)!.id))) {
      return { groupRun: g, snapshots, newer: volumes.filter((v) => newest.get(v)!.id !== snapshots.get(v)!.id) };
    }
  }
  return null;
}
