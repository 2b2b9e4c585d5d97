/**
 * Bookkeeping of what went to and came from EBS, kept in the store's meta namespaces so it is
 * backed up, synced and crash-safe with the store itself:
 *
 * | namespace     | key    | value |
 * | ---           | ---    | --- |
 * | `ebs-exports` | volume | {@link ExportRecord}[], oldest first: Tandem snapshot → EBS snapshot |
 * | `ebs-pending` | volume | {@link PendingExport}: the export in progress, for resume after a crash |
 * | `ebs-imports` | volume | {@link ImportRecord}[], oldest first: EBS snapshot → Tandem snapshot |
 * | `ebs-deleting` | volume | {@link ExportRecord}[]: exports retention took out of `ebs-exports`, not yet deleted in EBS (retention.ts) |
 *
 * Exports and imports together are the volume's EBS lineage: an export's parent is the latest
 * export; an import reads only what changed since the newest export or import it can diff against.
 */
import { snapshotIdTime } from '../../store/index.js';
import type { EbsStore } from './types.js';

export const NS_EXPORTS = 'ebs-exports';
export const NS_PENDING = 'ebs-pending';
export const NS_IMPORTS = 'ebs-imports';
export const NS_DELETING = 'ebs-deleting';

export interface ExportRecord {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  /** When the export completed (ISO-8601). */
  readonly created: string;
  readonly parentEbsSnapshotId: string | null;
  /** The Tandem volume size in bytes: an import of this lineage restores exactly this many. */
  readonly size: number;
  readonly volumeSizeGiB: number;
  readonly kmsKeyArn?: string;
}

export interface ImportRecord {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly created: string;
  /** The EBS snapshot it was diffed against (ListChangedBlocks), or null (ListSnapshotBlocks). */
  readonly baseEbsSnapshotId: string | null;
  readonly size: number;
}

/**
 * An export in progress. Blocks are uploaded in ascending index order with a bounded window in
 * flight; `uploadedUpTo` is a low-water mark: every changed block with a smaller index is
 * confirmed by EBS. A rerun skips those (PutSnapshotBlock is idempotent, so re-sending the
 * window above the mark is harmless) and recomputes their SHA-256 from the store for the
 * aggregate checksum instead of persisting digests.
 */
export interface PendingExport {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  /** The Tandem snapshot diffed against (the parent export's), or null for a full export. */
  readonly baseTandemSnapshot: string | null;
  readonly parentEbsSnapshotId: string | null;
  readonly clientToken: string;
  readonly started: string;
  /** Last time a block was confirmed: EBS cancels a pending snapshot `timeoutMinutes` after its last write. */
  readonly lastProgress: string;
  readonly timeoutMinutes: number;
  readonly volumeSizeGiB: number;
  readonly uploadedUpTo: number;
  readonly kmsKeyArn?: string;
  readonly description?: string;
}

export async function listExportRecords(store: Pick<EbsStore, 'getMeta'>, volume: string): Promise<ExportRecord[]> {
  return (await store.getMeta<ExportRecord[]>(NS_EXPORTS, volume)) ?? [];
}

export async function listImportRecords(store: Pick<EbsStore, 'getMeta'>, volume: string): Promise<ImportRecord[]> {
  return (await store.getMeta<ImportRecord[]>(NS_IMPORTS, volume)) ?? [];
}

/**
 * The point in time an export holds: its Tandem snapshot's time, or, when this store lacks that
 * snapshot (deleted by retention, or an export adopted from a lost appliance), the time in its id,
 * else the export's own.
 */
export function exportPointTime(e: { readonly tandemSnapshot: string; readonly created: string }, snap: { readonly created: string } | null): string {
  if (snap) return snap.created;
  const t = snapshotIdTime(e.tandemSnapshot);
  return t === undefined ? e.created : new Date(t).toISOString();
}

/** Per volume: the read-modify-writes of its export list, one after the other (an export and retention). */
const exportListTails = new Map<string, Promise<unknown>>();

/** Change the export list of `volume` with no other change of it in between; returns the list written. */
export async function updateExportRecords(store: Pick<EbsStore, 'getMeta' | 'putMeta'>, volume: string, change: (list: ExportRecord[]) => ExportRecord[]): Promise<ExportRecord[]> {
  const update = async () => {
    const list = change(await listExportRecords(store, volume));
    await store.putMeta(NS_EXPORTS, volume, list);
    return list;
  };
  const prior = exportListTails.get(volume) ?? Promise.resolve();
  const result = prior.then(update, update);
  const tail = result.catch(() => undefined);
  exportListTails.set(volume, tail);
  void tail.then(() => {
    if (exportListTails.get(volume) === tail) exportListTails.delete(volume);
  });
  return result;
}

/** Append (or replace, for the same EBS snapshot id) an export record. Idempotent. */
export async function recordExport(store: EbsStore, volume: string, rec: ExportRecord): Promise<void> {
  await updateExportRecords(store, volume, (list) => [...list.filter((r) => r.ebsSnapshotId !== rec.ebsSnapshotId), rec]);
}

export async function recordImport(store: EbsStore, volume: string, rec: ImportRecord): Promise<void> {
  const list = (await listImportRecords(store, volume)).filter((r) => r.ebsSnapshotId !== rec.ebsSnapshotId);
  list.push(rec);
  await store.putMeta(NS_IMPORTS, volume, list);
}

export async function getPending(store: EbsStore, volume: string): Promise<PendingExport | null> {
  return (await store.getMeta<PendingExport>(NS_PENDING, volume)) ?? null;
}

export async function putPending(store: EbsStore, volume: string, p: PendingExport): Promise<void> {
  await store.putMeta(NS_PENDING, volume, p);
}

export async function clearPending(store: EbsStore, volume: string): Promise<void> {
  await store.deleteMeta(NS_PENDING, volume);
}

/** Whether EBS has already cancelled a pending snapshot for lack of writes. */
export function pendingExpired(p: PendingExport, now = Date.now()): boolean {
  return now - Date.parse(p.lastProgress) >= p.timeoutMinutes * 60_000;
}
