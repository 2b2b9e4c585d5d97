/**
 * DR workflows: failover, drill and failback (see launch.ts and failback.ts for the steps).
 *
 * This module wires them to the rest of the appliance: recovery plans from config.yaml, EBS
 * exports and imports from appliance/ebs, EC2 from the SDK's standard chain.
 */
import type { Home } from '../home.js';
import type { Store } from '../../store/index.js';
import { loadConfig } from '../config/index.js';
import { ec2Client } from './ec2.js';
import { launch, settleInterruptedFailovers, type LaunchDeps, type RecoveryRun, type RunMode } from './launch.js';
import { prepareFailback, completeFailback, endFailover, type PrepareResult } from './failback.js';
import { selectPlans, type PlanSelector } from './plan.js';
import { failedOverVolumes } from './state.js';
import { TandemError } from '../../common/errors.js';

export { listRuns, activeFailover, RUNS_NS, RTO_NS, DRILLS_NS, type RecoveryRun, type LaunchedServer } from './launch.js';
export { selectPlans, type RecoveryPlan, type PlanSelector } from './plan.js';
export { parsePoint } from './points.js';
export type { PrepareResult } from './failback.js';

async function launchDeps(home: Home, store: Store, step?: (line: string) => void): Promise<LaunchDeps> {
  const ebs = await import('../ebs/index.js');
  return {
    store,
    ec2: ec2Client(),
    applianceName: home.identity.name,
    step,
    listExports: (volume) => ebs.listExports(store, volume),
    exportNow: async (snap) => {
      const r = await ebs.exportSnapshot(store, snap, { appliance: home.identity.name });
      return { ebsSnapshotId: r.ebsSnapshotId, tandemSnapshot: r.tandemSnapshot, created: new Date().toISOString() };
    },
  };
}

export interface RecoverRequest extends PlanSelector {
  readonly mode: RunMode;
  readonly point?: Date;
  readonly keepMinutes?: number;
  readonly signal?: AbortSignal;
}

/** Failover or drill per the plans in config.yaml (run on the cloud appliance). */
export async function recover(home: Home, store: Store, req: RecoverRequest, step?: (line: string) => void): Promise<RecoveryRun> {
  const config = await loadConfig(home);
  const plans = selectPlans(config, req);
  const deps = await launchDeps(home, store, step);
  if (req.mode === 'failover') {
    // A failover killed before it recorded its instances: EC2 tells which it launched.
    await settleInterruptedFailovers(deps, selectPlans(config, {}));
    // A second copy of a server that already runs in EC2 would be a split brain there.
    const inEc2 = await failedOverVolumes(store);
    for (const plan of plans) {
      for (const disk of plan.disks) {
        const f = inEc2.get(disk.volume);
        if (f) {
          throw new TandemError('ERR_VOLUME_FAILED_OVER', `volume "${disk.volume}" (plan ${plan.name}) already runs in EC2 since ${f.since} (failover ${f.run}, instance ${f.instanceId}); nothing was launched. See \`appliance status ${disk.volume}\`; to launch it again, end that failover first with \`appliance failover ${disk.volume} --end --terminate\``, { details: { volume: disk.volume, plan: plan.name, ...f } });
        }
      }
    }
  }
  // A drill keeps its instances --keep minutes, else as long as its plans ask (drill.keepMinutes).
  const keepMinutes = req.mode !== 'drill' ? undefined : req.keepMinutes ?? Math.max(0, ...plans.map((p) => p.raw.drill?.keepMinutes ?? 0));
  return launch(deps, { mode: req.mode, plans, point: req.point, keepMinutes, signal: req.signal });
}

/**
 * Tear down the drills an interrupted process left in EC2 (launch.ts tearDownInterruptedDrills),
 * if there are any: without them, no AWS client is made.
 */
export async function tearDownInterrupted(home: Home, store: Store, step?: (line: string) => void): Promise<RecoveryRun[]> {
  const { interruptedDrills } = await import('./state.js');
  if ((await interruptedDrills(store)).length === 0) return [];
  const { tearDownInterruptedDrills } = await import('./launch.js');
  return tearDownInterruptedDrills(await launchDeps(home, store, step));
}

/** Failback step 1 on the cloud appliance: snapshot the EC2 volume and import it incrementally. */
export async function prepare(home: Home, store: Store, volume: string, opts: { stop?: boolean } = {}): Promise<PrepareResult> {
  const ebs = await import('../ebs/index.js');
  return prepareFailback({
    store,
    ec2: ec2Client(),
    applianceName: home.identity.name,
    importSnapshot: async (snapId, vol, base) => {
      const r = await ebs.importSnapshot(store, snapId, vol, { baseEbsSnapshotId: base });
      return { snapshot: r.snapshot, blocksFetched: r.blocksFetched, bytesFetched: r.bytesFetched };
    },
  }, volume, opts);
}

/** Failback step 3 on the cloud appliance. */
export async function complete(store: Store, volume: string, snapshot: string, terminate: boolean) {
  return completeFailback({ store, ec2: ec2Client() }, volume, snapshot, terminate);
}

/** `appliance failover VOL --end` on the cloud appliance: give up the failover without a failback. */
export async function end(store: Store, volume: string, terminate: boolean) {
  return endFailover({ store, ec2: ec2Client() }, volume, terminate);
}
