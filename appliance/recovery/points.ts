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

export interface ExportEntry {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly created: string;
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
): Promise<RecoveryPoint> {
  const vol = await store.getVolume(volume);
  const candidates: Array<{ e: ExportEntry; snap: SnapshotRecord | null; time: number }> = [];
  for (const e of exports) {
    const snap = await store.getSnapshot(volume, e.tandemSnapshot);
    candidates.push({ e, snap, time: Date.parse(snap?.created ?? e.created) });
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
  const size = pick.snap?.size ?? vol?.size;
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
