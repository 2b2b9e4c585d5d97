/**
 * Which volumes run in EC2 right now, read from the cloud appliance's records of its recovery
 * runs (meta `recovery-runs`, appliance/recovery/launch.ts) and failbacks (meta `failbacks`,
 * appliance/recovery/failback.ts). Kept free of the AWS SDK: the peer routes ask it on every
 * push (api/routes/peer.ts).
 *
 * A volume is failed over from the failover that launched it until its failback completes or
 * the failover is ended (`appliance failover VOL --end`). Meanwhile the copy in EC2 is the newest
 * data, and the cloud appliance refuses pushes of the volume (ERR_VOLUME_FAILED_OVER): an
 * on-prem appliance that comes back after the disaster would otherwise replicate its stale copy
 * over the failover point, and report its RPO met while production runs elsewhere. A second
 * failover of the volume is refused too (appliance/recovery/index.ts recover): the same server
 * would run twice in EC2.
 */
import { randomUUID } from 'node:crypto';
import type { Store } from '../../store/index.js';

export const RUNS_NS = 'recovery-runs';
export const FAILBACKS_NS = 'failbacks';

/**
 * This process, in the runs it records (launch.ts): only one process opens a store at a time, so
 * a drill recorded as active by another owner was interrupted before its teardown.
 */
export const RUN_OWNER = randomUUID();

/** The parts of a recorded run (launch.ts RecoveryRun) this module reads. */
export interface RunRecord {
  readonly id: string;
  readonly mode: string;
  readonly status: string;
  readonly owner?: string;
  readonly started: string;
  /** When its instances were terminated and images deregistered (drills; null until then). */
  readonly tornDown?: string | null;
  readonly servers: ReadonlyArray<{ readonly instanceId: string; readonly disks: ReadonlyArray<{ readonly volume: string }> }>;
}

export interface FailedOver {
  /** The failover run. */
  readonly run: string;
  /** When it started (ISO). */
  readonly since: string;
  /** The EC2 instance that runs the volume. */
  readonly instanceId: string;
}

/** Every volume that is failed over and not yet back (see above), with its failover: one read of the runs. */
export async function failedOverVolumes(store: Pick<Store, 'listMeta' | 'getMeta'>): Promise<Map<string, FailedOver>> {
  const out = new Map<string, FailedOver>();
  for (const [, run] of await store.listMeta<RunRecord>(RUNS_NS)) {
    if (run.mode !== 'failover' || run.status !== 'active') continue;
    for (const server of run.servers) {
      for (const { volume } of server.disks) {
        if (out.has(volume)) continue;
        const failback = await store.getMeta<{ completed?: string }>(FAILBACKS_NS, `${run.id}/${volume}`);
        if (!failback?.completed) out.set(volume, { run: run.id, since: run.started, instanceId: server.instanceId });
      }
    }
  }
  return out;
}

/** The failover `volume` runs in, if it is failed over and not yet back (see above). */
export async function failedOver(store: Pick<Store, 'listMeta' | 'getMeta'>, volume: string): Promise<FailedOver | null> {
  return (await failedOverVolumes(store)).get(volume) ?? null;
}

/**
 * Drills whose teardown did not finish, their instances perhaps still running: recorded as
 * active by another process (interrupted: killed, the machine restarted), or failed with a
 * teardown that failed too (EC2 refused or did not answer). `T`: the caller's view of the record
 * (launch.ts RecoveryRun).
 */
export async function interruptedDrills<T extends RunRecord = RunRecord>(store: Pick<Store, 'listMeta'>): Promise<T[]> {
  return (await store.listMeta<T>(RUNS_NS)).map(([, r]) => r).filter((r) => r.mode === 'drill' && !r.tornDown
    && ((r.status === 'active' && r.owner !== RUN_OWNER) || r.status === 'failed'));
}

/** How doctor and the teardown name a drill interruptedDrills returned. */
export function unfinishedDrillText(run: RunRecord): string {
  return run.status === 'failed' ? 'failed, and its teardown did not finish' : 'was interrupted before its teardown';
}
