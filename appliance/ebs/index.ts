/**
 * EBS export and import: the cloud appliance turns Tandem snapshots into incremental EBS
 * snapshots (failover) and reads EBS snapshots back incrementally (failback), through the EBS
 * direct APIs. See README.md in this folder.
 */
import { listExportRecords } from './lineage.js';
import type { EbsMapping, EbsStore } from './types.js';

export { exportSnapshot, EXPORT_TIMEOUT_MINUTES } from './export.js';
export { importSnapshot } from './import.js';
export { ebsClient, checkClient } from './client.js';
export { AdaptiveLimiter, type LimiterOptions, type LimiterStats } from './limiter.js';
export { LinearChecksum, sha256Base64 } from './checksum.js';
export { EBS_BLOCK_SIZE } from './api.js';
export { NS_EXPORTS, NS_IMPORTS, NS_PENDING, getPending, listImportRecords, type ExportRecord, type ImportRecord, type PendingExport } from './lineage.js';
export type { EbsExportOptions, EbsExportResult, EbsImportOptions, EbsImportResult, EbsMapping, EbsStore } from './types.js';

/** Exports of a volume (Tandem snapshot → EBS snapshot), oldest first. */
export async function listExports(store: Pick<EbsStore, 'getMeta'>, volume: string): Promise<EbsMapping[]> {
  return (await listExportRecords(store, volume)).map((r) => ({
    ebsSnapshotId: r.ebsSnapshotId,
    tandemSnapshot: r.tandemSnapshot,
    created: r.created,
    parentEbsSnapshotId: r.parentEbsSnapshotId,
    size: r.size,
  }));
}

/** The newest export of a volume, or null. */
export async function lastExport(store: Pick<EbsStore, 'getMeta'>, volume: string): Promise<EbsMapping | null> {
  const all = await listExports(store, volume);
  return all[all.length - 1] ?? null;
}
