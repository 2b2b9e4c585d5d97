/**
 * Failback: after a failover, bring the changes made in EC2 home, moving only what changed.
 *
 * It runs in three steps across the two appliances; the on-prem `appliance failback VOL`
 * drives them:
 *
 * 1. **prepare** (cloud appliance, {@link prepareFailback}): with `stop` (a failback that
 *    terminates the instances), StopInstances and wait until stopped, so the snapshot holds every
 *    write made in EC2; CreateSnapshot of the EC2 volume the failover launched for VOL, then import it into the cloud store incrementally:
 *    ListChangedBlocks against the EBS snapshot the instance was launched from, GetSnapshotBlock
 *    of those blocks only (appliance/ebs importSnapshot). The result is a Tandem snapshot of VOL.
 * 2. **apply** (on-prem): `sync VOL --reverse --apply`: pull that snapshot (only the blocks the
 *    on-prem store lacks travel), rescan the local volume, write only the differing blocks,
 *    rescan and check the root, and record it as the common base (appliance/replicate.ts).
 * 3. **complete** (cloud, {@link completeFailback}): mark the volume failed back in the run; with
 *    `terminate`, terminate the failover instances once every disk of a server is home.
 *
 * Each step is idempotent: rerunning a failed failback repeats prepare (a new EC2 snapshot,
 * still incremental), resumes the pull, and re-applies (only differing blocks are written).
 */
import type { EC2Client } from '@aws-sdk/client-ec2';
import { TandemError, isTandemError } from '../../common/errors.js';
import type { Store, SnapshotRecord } from '../../store/index.js';
import * as ec2 from './ec2.js';
import { activeFailover, RUNS_NS, type RecoveryRun } from './launch.js';
import { FAILBACKS_NS } from './state.js';

export interface PrepareResult {
  readonly volume: string;
  readonly run: string;
  readonly instanceId: string;
  /** The instance this prepare stopped before its snapshot (`stop`), or null. */
  readonly stopped: string | null;
  readonly ec2VolumeId: string;
  readonly ec2SnapshotId: string;
  readonly baseEbsSnapshotId: string;
  readonly snapshot: SnapshotRecord;
  readonly blocksFetched: number;
  readonly bytesFetched: number;
  readonly seconds: number;
}

export interface ImportFn {
  (ebsSnapshotId: string, volume: string, baseEbsSnapshotId: string): Promise<{ snapshot: SnapshotRecord; blocksFetched: number; bytesFetched: number }>;
}

export interface FailbackState {
  readonly volume: string;
  readonly snapshot: string;
  readonly ec2SnapshotId: string;
  readonly prepared: string;
  completed?: string;
}

/** Cloud side, step 1. */
export async function prepareFailback(deps: { store: Store; ec2: EC2Client; importSnapshot: ImportFn; applianceName: string }, volume: string, opts: { stop?: boolean } = {}): Promise<PrepareResult> {
  const t0 = performance.now();
  const active = await activeFailover(deps.store, volume);
  if (!active) {
    throw new TandemError('ERR_NOTHING_TO_SYNC', `no active failover runs volume "${volume}" on this appliance; failback brings back changes made by a failover (see \`appliance failover\`)`, { details: { volume } });
  }
  const { run, server, disk } = active;
  let ec2VolumeId = disk.ec2VolumeId;
  if (!ec2VolumeId) {
    // A failover interrupted while its instance started recorded it before EC2 said which volume
    // each device got: ask now.
    const [inst] = await ec2.describeInstances(deps.ec2, [server.instanceId]);
    ec2VolumeId = inst?.BlockDeviceMappings?.find((m) => m.DeviceName === disk.device)?.Ebs?.VolumeId ?? null;
  }
  if (!ec2VolumeId) {
    throw new TandemError('ERR_FAILOVER_FAILED', `failover ${run.id} recorded no EC2 volume for ${volume} (${disk.device} of ${server.instanceId}); check the instance's block devices`);
  }
  // The final failback (the instances are terminated after it): stopped first, so that the
  // snapshot holds every write the server made in EC2. A snapshot of a running instance misses
  // what it writes after, which the termination would then destroy.
  let stopped: string | null = null;
  if (opts.stop) {
    const [inst] = await ec2.describeInstances(deps.ec2, [server.instanceId]);
    const state = inst?.State?.Name;
    if (state !== 'stopped' && state !== 'terminated') {
      await ec2.stopInstances(deps.ec2, [server.instanceId]);
      stopped = server.instanceId;
    }
  }
  const ec2SnapshotId = await ec2.snapshotVolume(deps.ec2, ec2VolumeId, `Tandem failback of ${volume} from ${server.instanceId}`, {
    'tandem:appliance': deps.applianceName,
    'tandem:run': run.id,
    'tandem:volume': volume,
  });
  // Imported on top of what an earlier prepare of this failover imported, while the store holds
  // it (a rerun after a failed pull): only what changed in EC2 since is read from EBS, not every
  // block changed since the failover again. Else, or if EBS cannot compare the two, on the point.
  const key = `${run.id}/${volume}`;
  const prev = await deps.store.getMeta<FailbackState>(FAILBACKS_NS, key);
  const prevBase = prev && !prev.completed && prev.ec2SnapshotId !== ec2SnapshotId && (await deps.store.getSnapshot(volume, prev.snapshot)) ? prev.ec2SnapshotId : null;
  let base = prevBase ?? disk.ebsSnapshotId;
  let imported: Awaited<ReturnType<ImportFn>>;
  try {
    imported = await deps.importSnapshot(ec2SnapshotId, volume, base);
  } catch (e) {
    if (prevBase === null || !isTandemError(e)) throw e;
    base = disk.ebsSnapshotId;
    imported = await deps.importSnapshot(ec2SnapshotId, volume, base);
  }
  const state: FailbackState = { volume, snapshot: imported.snapshot.id, ec2SnapshotId, prepared: new Date().toISOString() };
  await deps.store.putMeta(FAILBACKS_NS, key, state);
  return {
    volume,
    run: run.id,
    instanceId: server.instanceId,
    stopped,
    ec2VolumeId: ec2VolumeId,
    ec2SnapshotId,
    baseEbsSnapshotId: base,
    snapshot: imported.snapshot,
    blocksFetched: imported.blocksFetched,
    bytesFetched: imported.bytesFetched,
    seconds: Math.round((performance.now() - t0) / 10) / 100,
  };
}

/** Cloud side, step 3. Returns the instances terminated. */
export async function completeFailback(
  deps: { store: Store; ec2: EC2Client },
  volume: string,
  snapshot: string,
  terminate: boolean,
): Promise<{ run: string; terminated: string[]; runStatus: RecoveryRun['status']; ebsSnapshotsDeleted: string[]; ebsSnapshotsLeft: Array<{ ebsSnapshotId: string; error: string }> }> {
  const active = await activeFailover(deps.store, volume);
  if (!active) throw new TandemError('ERR_NOTHING_TO_SYNC', `no active failover runs volume "${volume}"; nothing to complete`);
  const { run } = active;
  const key = `${run.id}/${volume}`;
  const state = await deps.store.getMeta<FailbackState>(FAILBACKS_NS, key);
  if (!state || state.snapshot !== snapshot) {
    throw new TandemError('ERR_USAGE', `failback of "${volume}" was not prepared for snapshot ${snapshot}; run \`appliance failback ${volume}\` again from the start`);
  }
  state.completed = new Date().toISOString();
  await deps.store.putMeta(FAILBACKS_NS, key, state);

  // A server is home when every one of its disks is failed back.
  const done = new Set<string>();
  for (const [k, s] of await deps.store.listMeta<FailbackState>(FAILBACKS_NS)) if (k.startsWith(`${run.id}/`) && s.completed) done.add(s.volume);
  const terminated: string[] = [];
  const allHome = run.servers.every((s) => s.disks.every((d) => done.has(d.volume)));
  if (terminate) {
    for (const s of run.servers) {
      if (s.disks.every((d) => done.has(d.volume))) terminated.push(s.instanceId);
    }
    await ec2.terminateInstances(deps.ec2, terminated, false);
    for (const s of run.servers) if (terminated.includes(s.instanceId)) await ec2.deregisterImage(deps.ec2, s.imageId).catch(() => {});
  }
  if (allHome) run.status = 'failed-back';
  await deps.store.putMeta(RUNS_NS, run.id, run);
  // Every disk is home: the EBS snapshots the failbacks took of the EC2 volumes are imported and
  // nothing builds on them; they would stay billed (appliance/ebs/retention.ts).
  let ebsSnapshotsDeleted: string[] = [];
  let ebsSnapshotsLeft: Array<{ ebsSnapshotId: string; error: string }> = [];
  if (allHome) {
    try {
      const { deleteFailbackSnapshots } = await import('../ebs/retention.js');
      const taken = await ec2.snapshotsOfRun(deps.ec2, run.id);
      const r = await deleteFailbackSnapshots(deps.store, { delete: (id) => ec2.deleteEbsSnapshot(deps.ec2, id) }, taken);
      ebsSnapshotsDeleted = r.deleted;
      ebsSnapshotsLeft = r.failed;
    } catch (e) {
      ebsSnapshotsLeft = [{ ebsSnapshotId: '-', error: `could not list them: ${(e as Error).message}` }];
    }
  }
  return { run: run.id, terminated, runStatus: run.status, ebsSnapshotsDeleted, ebsSnapshotsLeft };
}


/**
 * Cloud side: give up the failover that runs `volume` without bringing its EC2 changes home
 * (the failover was a mistake, or on-prem stays the primary after all). The whole run ends: its
 * volumes take pushes again (appliance/recovery/state.ts), so on-prem replication resumes and
 * its next push replaces what the failover point held as the newest snapshot. The EC2 changes
 * stay only on the EC2 volumes (and in any EBS snapshot taken of them). With `terminate`, the
 * run's instances are terminated and their images deregistered.
 */
export async function endFailover(deps: { store: Store; ec2: EC2Client }, volume: string, terminate: boolean): Promise<{ run: string; volumes: string[]; terminated: string[] }> {
  const active = await activeFailover(deps.store, volume);
  if (!active) throw new TandemError('ERR_NOTHING_TO_SYNC', `no active failover runs volume "${volume}"; nothing to end (see \`appliance status\`)`, { details: { volume } });
  const { run } = active;
  const terminated: string[] = [];
  if (terminate) {
    for (const s of run.servers) terminated.push(s.instanceId);
    await ec2.terminateInstances(deps.ec2, terminated, false);
    for (const s of run.servers) await ec2.deregisterImage(deps.ec2, s.imageId).catch(() => {});
  }
  run.status = 'ended';
  run.tornDown = new Date().toISOString();
  await deps.store.putMeta(RUNS_NS, run.id, run);
  return { run: run.id, volumes: [...new Set(run.servers.flatMap((s) => s.disks.map((d) => d.volume)))], terminated };
}
