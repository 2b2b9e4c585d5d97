/**
 * Adopt the EBS exports of a volume that another cloud appliance made: the way back after losing
 * the cloud appliance itself (its instance or its store volume), without sending the volumes over
 * the WAN again and without losing the recovery points it had exported.
 *
 * 1. Find them: DescribeSnapshots of this account, tagged `tandem:volume=VOL` (export.ts
 *    ebsTags), completed. Exports tagged by more than one appliance (`tandem:appliance`: two
 *    sites with a volume of one name) are refused unless `appliance` picks one.
 * 2. Import the newest (every non-zero block, through the EBS direct APIs) as the very snapshot
 *    it was exported from: its id, time and byte size come from its tags, so its tree has the
 *    same root as the on-prem appliance's. The on-prem appliance's next push then finds the
 *    blocks here and sends only what changed since.
 * 3. Record every export found in `ebs-exports`, oldest first: they are the recovery points of
 *    failover and drill `--point`, and the newest is the parent of the next export, which is so
 *    incremental again. Older exports name their Tandem snapshots, which this store lacks; a
 *    point from one of them takes its time from the snapshot id.
 *
 * Refused (ERR_USAGE) when the volume already has exports here: adopting is for a new appliance.
 */
import type { EC2Client, Snapshot } from '@aws-sdk/client-ec2';
import { TandemError } from '../../common/errors.js';
import { isValidSnapshotId, snapshotIdTime } from '../../store/index.js';
import { importSnapshot } from './import.js';
import { exportPointTime, listExportRecords, updateExportRecords, type ExportRecord } from './lineage.js';
import type { EbsImportResult, EbsStore } from './types.js';
import { GiB } from './api.js';

/** An export of the volume found in EBS. */
export interface FoundExport {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly size: number | null;
  readonly volumeSizeGiB: number;
  readonly appliance: string | null;
  /** When EBS started it (ISO-8601). */
  readonly started: string;
}

export interface AdoptResult {
  readonly volume: string;
  readonly adopted: FoundExport[];
  /** The import of the newest; null with `dryRun`. */
  readonly imported: EbsImportResult | null;
}

/** The exports of `volume` EBS holds for this account (see the module comment, step 1), oldest first. */
export async function findExports(ec2: EC2Client, volume: string): Promise<FoundExport[]> {
  const { describeSnapshots } = await import('../recovery/ec2.js');
  const out: FoundExport[] = [];
  for (const s of await describeSnapshots(ec2, [{ Name: 'tag:tandem:volume', Values: [volume] }, { Name: 'status', Values: ['completed'] }])) {
    const found = asExport(s, volume);
    if (found) out.push(found);
  }
  return out.sort((a, b) => a.tandemSnapshot.localeCompare(b.tandemSnapshot) || a.started.localeCompare(b.started));
}

function asExport(s: Snapshot, volume: string): FoundExport | null {
  const tag = (k: string) => s.Tags?.find((t) => t.Key === k)?.Value;
  const id = tag('tandem:snapshot');
  // A tag anyone with the account's access may have written: only a well-formed snapshot id counts.
  if (!s.SnapshotId || tag('tandem:volume') !== volume || !isValidSnapshotId(id) || snapshotIdTime(id) === undefined || !s.VolumeSize) return null;
  const size = Number(tag('tandem:size'));
  return {
    ebsSnapshotId: s.SnapshotId,
    tandemSnapshot: id,
    size: Number.isSafeInteger(size) && size > 0 && size <= s.VolumeSize * GiB ? size : null,
    volumeSizeGiB: s.VolumeSize,
    appliance: tag('tandem:appliance') ?? null,
    started: (s.StartTime ?? new Date()).toISOString(),
  };
}

/** Adopt the exports of `volume` (see the module comment). */
export async function adoptExports(
  store: EbsStore,
  ec2: EC2Client,
  volume: string,
  opts: { appliance?: string; dryRun?: boolean; onProgress?: (done: number, listed: number) => void } = {},
): Promise<AdoptResult> {
  const have = await listExportRecords(store, volume);
  if (have.length > 0) {
    throw new TandemError('ERR_USAGE', `volume "${volume}" already has ${have.length} EBS export(s) here (\`appliance ebs list ${volume}\`); adopt is for a new cloud appliance that has none`, { details: { volume } });
  }
  let found = await findExports(ec2, volume);
  const appliances = [...new Set(found.map((f) => f.appliance).filter((a): a is string => a !== null))];
  if (opts.appliance !== undefined) {
    found = found.filter((f) => f.appliance === opts.appliance);
  } else if (appliances.length > 1) {
    throw new TandemError('ERR_USAGE', `EBS holds exports of "${volume}" made by ${appliances.length} appliances (${appliances.join(', ')}): pick the lost one with --appliance NAME`, { details: { volume, appliances } });
  }
  if (found.length === 0) {
    throw new TandemError('ERR_EBS_NOT_EXPORTED', `EBS holds no completed export of "${volume}"${opts.appliance !== undefined ? ` made by appliance "${opts.appliance}"` : ''} (snapshots tagged tandem:volume=${volume}); check the volume name, AWS_REGION and the account`, { details: { volume } });
  }
  if (opts.dryRun) return { volume, adopted: found, imported: null };

  const newest = found[found.length - 1]!;
  // Already here (pushed by the on-prem appliance since): the same snapshot, nothing to read.
  const held = await store.getSnapshot(volume, newest.tandemSnapshot);
  const imported: EbsImportResult = held
    ? { snapshot: held, ebsSnapshotId: newest.ebsSnapshotId, baseEbsSnapshotId: null, blocksFetched: 0, bytesFetched: 0, requests: 0, seconds: 0 }
    : await importSnapshot(store, newest.ebsSnapshotId, volume, {
      as: { id: newest.tandemSnapshot, created: exportPointTime({ tandemSnapshot: newest.tandemSnapshot, created: newest.started }, null), size: newest.size },
      ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
    });
  const records: ExportRecord[] = found.map((f) => ({
    ebsSnapshotId: f.ebsSnapshotId,
    tandemSnapshot: f === newest ? imported.snapshot.id : f.tandemSnapshot,
    created: f.started,
    parentEbsSnapshotId: null,
    size: f === newest ? imported.snapshot.size : f.size ?? f.volumeSizeGiB * GiB,
    volumeSizeGiB: f.volumeSizeGiB,
  }));
  await updateExportRecords(store, volume, () => records);
  return { volume, adopted: found, imported };
}
