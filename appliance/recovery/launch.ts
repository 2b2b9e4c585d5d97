/**
 * Failover and drill: bring recovery plans up in EC2 from EBS exports.
 *
 * Both run the same steps; a drill differs in where and for how long:
 *
 * | step | failover | drill |
 * | --- | --- | --- |
 * | point | newest replicated data (exported now if needed) or --point | --point or the newest export; never exports |
 * | network | the plan's subnet, security groups, private IP | the plan's `drill` subnet and groups, no fixed IP (no clash with production) |
 * | afterwards | instances keep running; the run is recorded as active | checks, then terminate + deregister (after --keep minutes) |
 *
 * Steps: resolve one recovery point per volume → RegisterImage (root snapshot + data volumes as
 * block-device mappings) → RunInstances with an idempotency token → wait until running →
 * record the run (store meta `recovery-runs`), the measured RTO per volume (meta `rto`) and,
 * for a drill, its report (meta `drills`).
 *
 * A drill reads exports only: it takes no volume lock, writes no snapshot, and so leaves
 * production and replication untouched (tested by hashing both before and after).
 *
 * A plan that does not come up in a failover (RunInstances refused: no capacity for its instance
 * type, its fixed IP taken; or its instance terminated instead of running) does not stop the
 * others: in a disaster every server that can run should. Its image is deregistered, and the run
 * stays active with the servers that are up (they count as failed over; `failedPlans` and `error`
 * say what did not come up), answered by ERR_FAILOVER_PARTIAL naming the command that launches the
 * rest (`failover --plan NAME`). A failover that brings nothing up is failed, with nothing left in
 * EC2 (ERR_FAILOVER_FAILED). An instance still `pending` when the wait for `running` ends counts
 * as failed over: a rerun must not start a second copy of it. So does an instance EC2 launched
 * for a plan whose RunInstances failed (its answers lost; found by the run's tag): it is that
 * plan's server. A drill stops at its first failure and tears down.
 *
 * Interruptions (kill -9, a reboot, a lost session during `--keep`): the run is recorded as
 * active, with `owner` naming this process, before anything is created in EC2, and again after
 * each image and instance. A failover killed while its instances start is so still known as
 * failed over: no second copy is launched. A drill recorded as active by another process was
 * interrupted (only one process opens the store at a time): the next drill, and the daemon when
 * it starts, tear it down ({@link tearDownInterruptedDrills}): its instances and images are
 * found by their tag `tandem:run`, so those made after the last record are found too.
 */
import { randomBytes } from 'node:crypto';
import type { EC2Client, Instance } from '@aws-sdk/client-ec2';
import { TandemError } from '../../common/errors.js';
import type { Store, SnapshotRecord } from '../../store/index.js';
import * as ec2 from './ec2.js';
import { choosePoint, commonGroupRun, sizeGiB, type ExportEntry, type RecoveryPoint } from './points.js';
import { RUNS_NS, RUN_OWNER, interruptedDrills, unfinishedDrillText } from './state.js';
import type { RecoveryPlan } from './plan.js';

export type RunMode = 'failover' | 'drill';

export interface LaunchedDisk {
  readonly device: string;
  readonly volume: string;
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  /** The EC2 volume the instance got for this disk (what failback snapshots). */
  readonly ec2VolumeId: string | null;
}

export interface LaunchedServer {
  readonly plan: string;
  readonly imageId: string;
  readonly instanceId: string;
  readonly state: string;
  readonly subnetId: string | null;
  readonly privateIp: string | null;
  readonly disks: readonly LaunchedDisk[];
}

export interface DrillCheck {
  readonly name: string;
  readonly ok: boolean;
  readonly detail: string;
}

export interface RecoveryRun {
  readonly id: string;
  readonly mode: RunMode;
  /**
   * active: instances up (failover) · torn-down: drill cleaned up · failed-back: on-prem again ·
   * ended: a failover given up without failback (`failover VOL --end`) · failed
   */
  status: 'active' | 'torn-down' | 'failed-back' | 'ended' | 'failed';
  readonly started: string;
  /** The point in time asked for, or null for "newest". */
  readonly requestedPoint: string | null;
  points: RecoveryPoint[];
  servers: LaunchedServer[];
  /** Seconds from the start of the command until every instance ran: the measured RTO. */
  rtoSeconds: number | null;
  /** Seconds spent waiting for EC2 to report `running` (the launch part of the RTO). */
  launchSeconds: number | null;
  checks: DrillCheck[];
  tornDown: string | null;
  error: string | null;
  /** The process that runs it (state.ts RUN_OWNER); absent in runs recorded by earlier versions. */
  owner?: string;
  /** Images registered for it so far (each also tagged `tandem:run`). */
  images?: string[];
  /** Plans of a failover that did not come up (with `error` saying why); its other servers run. */
  failedPlans?: string[];
  /** The plans asked for (absent in runs recorded by earlier versions). */
  plans?: string[];
}

export { RUNS_NS } from './state.js';
export const RTO_NS = 'rto';
export const DRILLS_NS = 'drills';

/** What a launch needs from the rest of the appliance (EBS exports live in appliance/ebs). */
export interface LaunchDeps {
  readonly store: Store;
  readonly ec2: EC2Client;
  readonly applianceName: string;
  listExports(volume: string): Promise<readonly ExportEntry[]>;
  /** Export a snapshot now (failover only). */
  exportNow(snap: SnapshotRecord): Promise<ExportEntry>;
  /** Progress lines for the operator ("registering image ...") on stderr. */
  step?(line: string): void;
}

export interface LaunchOptions {
  readonly mode: RunMode;
  readonly plans: readonly RecoveryPlan[];
  readonly point?: Date;
  /** Drill: minutes to keep the instances before teardown. */
  readonly keepMinutes?: number;
  readonly signal?: AbortSignal;
}

function runId(mode: RunMode): string {
  const t = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${mode}-${t}-${randomBytes(3).toString('hex')}`;
}

async function save(store: Store, run: RecoveryRun): Promise<void> {
  await store.putMeta(RUNS_NS, run.id, run);
  if (run.mode === 'drill') await store.putMeta(DRILLS_NS, run.id, drillReport(run));
}

/** The drill report kept in meta `drills` (status reads the newest per volume). */
export function drillReport(run: RecoveryRun): Record<string, unknown> {
  return {
    id: run.id,
    at: run.started,
    volumes: run.points.map((p) => p.volume),
    plans: run.plans ?? [...new Set(run.servers.map((s) => s.plan))],
    points: run.points.map((p) => ({ volume: p.volume, pointTime: p.pointTime, ebsSnapshotId: p.ebsSnapshotId })),
    passed: run.error === null && run.checks.length > 0 && run.checks.every((c) => c.ok),
    rtoSeconds: run.rtoSeconds,
    checks: run.checks,
    tornDown: run.tornDown,
    error: run.error,
  };
}

/**
 * Failover or drill of `opts.plans`. Returns the recorded run. A drill that fails its checks
 * still tears down and then throws ERR_DRILL_FAILED; a failover that cannot launch throws
 * ERR_FAILOVER_FAILED naming what it created, so the operator can see and clean up.
 */
export async function launch(deps: LaunchDeps, opts: LaunchOptions): Promise<RecoveryRun> {
  const { store, step = () => {} } = deps;
  // Before anything else a drill creates: what an interrupted one left in the drill subnet.
  if (opts.mode === 'drill') await tearDownInterruptedDrills(deps);
  const t0 = performance.now();
  const run: RecoveryRun = {
    id: runId(opts.mode),
    mode: opts.mode,
    status: 'active',
    started: new Date().toISOString(),
    requestedPoint: opts.point?.toISOString() ?? null,
    points: [],
    servers: [],
    rtoSeconds: null,
    launchSeconds: null,
    checks: [],
    tornDown: null,
    error: null,
    owner: RUN_OWNER,
    images: [],
    plans: opts.plans.map((p) => p.name),
  };

  // 1. One recovery point per volume, all against the same moment; a server's disks that are
  // snapshotted together come back from one group run (points.ts commonGroupRun).
  const volumes = [...new Set(opts.plans.flatMap((p) => p.disks.map((d) => d.volume)))];
  const exportsOf = new Map<string, readonly ExportEntry[]>();
  for (const volume of volumes) exportsOf.set(volume, await deps.listExports(volume));
  const wanted = new Map<string, SnapshotRecord>();
  for (const plan of opts.plans) {
    const disks = [...new Set(plan.disks.map((d) => d.volume))];
    const common = await commonGroupRun(store, disks, opts.point, exportsOf, opts.mode === 'failover');
    if (common === null) continue;
    for (const [v, snap] of common.snapshots) wanted.set(v, snap);
    if (common.newer.length > 0) {
      step(`${plan.name}: its disks come back from group run ${common.groupRun}, the newest that all of ${disks.join(', ')} hold: ${common.newer.join(', ')} ${common.newer.length === 1 ? 'has a newer snapshot' : 'have newer snapshots'} that the others lack (replication cut short), not used so that the disks agree`);
    }
  }
  const points = new Map<string, RecoveryPoint>();
  for (const volume of volumes) {
    const exports = exportsOf.get(volume)!;
    const exportNow = opts.mode === 'failover' ? async (snap: SnapshotRecord) => {
      step(`exporting snapshot ${snap.id} of ${volume} to EBS`);
      return deps.exportNow(snap);
    } : null;
    const p = await choosePoint(store, volume, exports, opts.point, exportNow, wanted.get(volume));
    points.set(volume, p);
    step(`${volume}: recovery point ${p.pointTime} (${p.ebsSnapshotId})`);
  }
  run.points = [...points.values()];

  const images: string[] = [];
  const instances: string[] = [];
  // Recorded before anything exists in EC2: an interruption from here on is found later.
  await save(store, run);
  const drill = opts.mode === 'drill';
  // A failover goes on with the other plans when one cannot launch (no capacity for its instance
  // type, its fixed IP taken...): in a disaster, every server that can run should. A drill stops
  // at the first failure and tears down.
  const failures: PlanFailure[] = [];
  try {
    // 2. One AMI and one instance per plan.
    const baseTags = { 'tandem:appliance': deps.applianceName, 'tandem:run': run.id, 'tandem:mode': opts.mode };
    const launched: Launched[] = [];
    for (const plan of opts.plans) {
      if (opts.signal?.aborted) throw new TandemError('ERR_FAILOVER_FAILED', `${opts.mode} interrupted`);
      let imageId: string | undefined;
      try {
        const arch = plan.raw.architecture ?? 'x86_64';
        imageId = await ec2.registerImage(deps.ec2, {
          name: `tandem-${plan.name}-${run.id}`,
          description: `Tandem ${opts.mode} of ${plan.name} at ${points.get(plan.disks[0]!.volume)!.pointTime}`,
          architecture: arch,
          disks: plan.disks.map((d) => {
            const p = points.get(d.volume)!;
            return { device: d.device, snapshotId: p.ebsSnapshotId, sizeGiB: sizeGiB(p.size) };
          }),
          tags: { ...baseTags, 'tandem:plan': plan.name },
        });
        images.push(imageId);
        run.images = [...images];
        await save(store, run);
        step(`${plan.name}: registered image ${imageId}`);
        if (drill && !plan.raw.drill) {
          throw new TandemError('ERR_PLAN_INVALID', `recovery plan "${plan.name}" has no \`drill\` section; add drill.subnet (an isolated subnet) and drill.securityGroups so a drill cannot reach production`);
        }
        const instanceId = await ec2.runInstance(deps.ec2, {
          imageId,
          instanceType: plan.raw.instanceType,
          subnetId: drill ? plan.raw.drill!.subnet : plan.raw.subnet,
          securityGroupIds: drill ? plan.raw.drill!.securityGroups : plan.raw.securityGroups,
          privateIp: drill ? undefined : plan.raw.privateIp,
          userData: plan.raw.userData,
          keyName: plan.raw.keyName,
          tags: { ...(plan.raw.tags ?? {}), ...baseTags, 'tandem:plan': plan.name, Name: `${plan.name}${drill ? ' (drill)' : ''}` },
          clientToken: `${run.id}-${plan.name}`.slice(0, 64),
        });
        instances.push(instanceId);
        launched.push({ plan, imageId, instanceId });
        // Known before it runs: a failover killed while waiting counts as failed over.
        run.servers.push(serverOf(plan, imageId, instanceId, undefined, points));
        await save(store, run);
        step(`${plan.name}: launched ${instanceId}`);
      } catch (e) {
        if (drill) throw e;
        failures.push({ plan: plan.name, imageId, error: errorText(e) });
        step(`${plan.name}: could not launch: ${errorText(e)}${opts.plans.length > 1 ? '; the other plans go on' : ''}`);
      }
    }

    if (failures.length > 0) await adoptLostLaunches(deps, run, opts.plans, launched, instances, failures, points);

    // 3. Wait until every instance runs: that moment is the recovery time.
    const tWait = performance.now();
    let waitError: unknown = null;
    if (instances.length > 0) {
      try {
        await ec2.waitRunning(deps.ec2, instances);
      } catch (e) {
        // The waiter gives up when an instance terminates instead of running (its launch failed)
        // or after RUNNING_WAIT_SECONDS: which instances are up is read below.
        if (drill) throw e;
        waitError = e;
      }
    }
    const described = await describeLaunched(deps, instances, waitError !== null);
    if (waitError === null && failures.length === 0) {
      run.launchSeconds = round((performance.now() - tWait) / 1000);
      run.rtoSeconds = round((performance.now() - t0) / 1000);
      run.servers = launched.map(({ plan, imageId, instanceId }) => serverOf(plan, imageId, instanceId, described.get(instanceId), points));
      step(`all ${instances.length} instance(s) running after ${run.rtoSeconds} s`);
      for (const v of volumes) {
        await store.putMeta(RTO_NS, v, { mode: opts.mode, run: run.id, at: new Date().toISOString(), rtoSeconds: run.rtoSeconds, launchSeconds: run.launchSeconds });
      }
    } else {
      await settleFailedLaunch(deps, run, launched, described, failures, waitError, points);
    }

    if (drill) {
      run.checks = drillChecks(opts.plans, run.servers);
      // The operator's own check of each server (drill-check.ts), once it runs isolated.
      for (const plan of opts.plans) {
        const check = plan.raw.drill?.check;
        const server = run.servers.find((s) => s.plan === plan.name);
        if (check === undefined || server === undefined) continue;
        if (run.checks.some((c) => c.name.startsWith(`${plan.name} `) && !c.ok)) {
          run.checks.push({ name: `${plan.name} check`, ok: false, detail: 'not run: the instance did not come up isolated with its disks' });
          continue;
        }
        step(`${plan.name}: running its check \`${check.command}\``);
        const { runDrillCheck } = await import('./drill-check.js');
        run.checks.push(await runDrillCheck(check, server, run.id, opts.signal, step));
      }
      for (const c of run.checks) step(`check ${c.ok ? 'passed' : 'FAILED'}: ${c.name}: ${c.detail}`);
    }
    await save(store, run);
  } catch (e) {
    run.status = 'failed';
    run.error = errorText(e);
    if (drill) {
      const teardownError = await teardown(deps, run, instances, images).then(() => null, (t: unknown) => t);
      await save(store, run);
      if (teardownError !== null) {
        throw new TandemError(
          'ERR_DRILL_FAILED',
          `drill ${run.id} failed: ${run.error}; its teardown failed too: ${errorText(teardownError)}; the next drill or the daemon tears it down (instances [${instances.join(', ')}], tagged tandem:run=${run.id})`,
          { cause: e, details: { run: run.id, instances } },
        );
      }
      throw new TandemError('ERR_DRILL_FAILED', `drill ${run.id} failed and was torn down: ${run.error}`, { cause: e, details: { run: run.id } });
    }
    await save(store, run);
    throw new TandemError(
      'ERR_FAILOVER_FAILED',
      `failover ${run.id} failed: ${run.error}; created so far: images [${images.join(', ')}], instances [${instances.join(', ')}] (tagged tandem:run=${run.id}); fix the cause and rerun, or terminate them`,
      { cause: e, details: { run: run.id, images, instances } },
    );
  }
  if (run.error !== null) throw failedLaunchError(run, failures);

  if (opts.mode === 'drill') {
    if (opts.keepMinutes && opts.keepMinutes > 0) {
      step(`keeping the drill instances for ${opts.keepMinutes} min`);
      await sleep(opts.keepMinutes * 60_000, opts.signal);
    }
    await teardown(deps, run, instances, images);
    await save(store, run);
    const report = drillReport(run);
    if (!report.passed) {
      throw new TandemError('ERR_DRILL_FAILED', `drill ${run.id} failed its checks: ${run.checks.filter((c) => !c.ok).map((c) => c.name).join(', ')}`, { details: { run: run.id, report } });
    }
  }
  return run;
}

/** What a drill checks once its instances report running. */
export function drillChecks(plans: readonly RecoveryPlan[], servers: readonly LaunchedServer[]): DrillCheck[] {
  const checks: DrillCheck[] = [];
  for (const plan of plans) {
    const s = servers.find((x) => x.plan === plan.name);
    if (!s) {
      checks.push({ name: `${plan.name} launched`, ok: false, detail: 'no instance' });
      continue;
    }
    checks.push({ name: `${plan.name} running`, ok: s.state === 'running', detail: `${s.instanceId} is ${s.state}` });
    const want = plan.raw.drill?.subnet;
    checks.push({ name: `${plan.name} isolated`, ok: s.subnetId === want, detail: `in ${s.subnetId ?? 'no subnet'}, drill subnet ${want}` });
    const attached = s.disks.filter((d) => d.ec2VolumeId !== null).length;
    checks.push({ name: `${plan.name} disks attached`, ok: attached === plan.disks.length, detail: `${attached} of ${plan.disks.length} disks` });
  }
  return checks;
}

interface Launched { readonly plan: RecoveryPlan; readonly imageId: string; readonly instanceId: string }

/** A plan of a failover that did not come up: why, and the image registered for it, if any. */
export interface PlanFailure {
  readonly plan: string;
  readonly imageId?: string;
  readonly error: string;
}

function errorText(e: unknown): string {
  return e instanceof TandemError ? `${e.code}: ${e.message}` : String((e as Error)?.message ?? e);
}

/**
 * DescribeInstances of what was launched. After a failed wait (`lenient`) a describe that fails
 * too leaves the instances unknown: they are then taken as starting, so that they count as
 * failed over rather than be launched a second time.
 */
async function describeLaunched(deps: LaunchDeps, ids: readonly string[], lenient: boolean): Promise<Map<string, Instance>> {
  if (ids.length === 0) return new Map();
  try {
    return new Map((await ec2.describeInstances(deps.ec2, ids)).map((i) => [i.InstanceId!, i]));
  } catch (e) {
    if (!lenient) throw e;
    (deps.step ?? (() => {}))(`could not read the state of ${ids.join(', ')} (${errorText(e)}): taken as starting`);
    return new Map();
  }
}

/**
 * A RunInstances that failed may still have launched (its answers lost on the way back, the SDK's
 * retries with its client token too): EC2 knows the run's instances by their tag. One found for a
 * plan recorded as failed becomes its server, waited for like the others, and the plan did not
 * fail: a rerun of the plan would otherwise start a second copy.
 */
async function adoptLostLaunches(
  deps: LaunchDeps,
  run: RecoveryRun,
  plans: readonly RecoveryPlan[],
  launched: Launched[],
  instances: string[],
  failures: PlanFailure[],
  points: ReadonlyMap<string, RecoveryPoint>,
): Promise<void> {
  const step = deps.step ?? (() => {});
  let found;
  try {
    found = await ec2.resourcesOfRun(deps.ec2, run.id);
  } catch (e) {
    step(`could not look for instances of the plans that failed (${errorText(e)}); check EC2 for instances tagged tandem:run=${run.id}`);
    return;
  }
  for (const inst of found.described) {
    const name = inst.Tags?.find((t) => t.Key === 'tandem:plan')?.Value;
    const plan = plans.find((p) => p.name === name);
    const i = failures.findIndex((f) => f.plan === name);
    if (plan === undefined || i < 0 || instances.includes(inst.InstanceId!)) continue;
    step(`${plan.name}: EC2 launched ${inst.InstanceId} though RunInstances failed (${failures[i]!.error}): it is this plan's server`);
    failures.splice(i, 1);
    const imageId = inst.ImageId ?? '';
    instances.push(inst.InstanceId!);
    launched.push({ plan, imageId, instanceId: inst.InstanceId! });
    run.servers.push(serverOf(plan, imageId, inst.InstanceId!, undefined, points));
  }
  await save(deps.store, run);
}

/** States of an instance that holds the server's disks: it counts as failed over. */
const ALIVE = new Set(['pending', 'running', 'stopping', 'stopped']);

/**
 * A failover in which some plan did not come up: a plan whose instance terminated instead of
 * running (or never launched) joins `failures`, its image is deregistered, and the run keeps the
 * instances that are alive. With any alive it stays active (those volumes run in EC2, so a second
 * launch of them is refused); with none it is failed, and nothing of it is left in EC2.
 */
async function settleFailedLaunch(
  deps: LaunchDeps,
  run: RecoveryRun,
  launched: readonly Launched[],
  described: ReadonlyMap<string, Instance>,
  failures: PlanFailure[],
  waitError: unknown,
  points: ReadonlyMap<string, RecoveryPoint>,
): Promise<void> {
  const step = deps.step ?? (() => {});
  const alive: LaunchedServer[] = [];
  for (const { plan, imageId, instanceId } of launched) {
    const inst = described.get(instanceId);
    const state = inst?.State?.Name ?? 'pending';
    if (ALIVE.has(state)) {
      alive.push(serverOf(plan, imageId, instanceId, inst, points));
      if (state !== 'running') step(`${plan.name}: ${instanceId} is ${state}${waitError !== null ? ` after the wait ended (${errorText(waitError)})` : ''}; it counts as failed over`);
      continue;
    }
    const why = inst?.StateReason?.Message ?? (waitError !== null ? errorText(waitError) : 'unknown');
    failures.push({ plan: plan.name, imageId, error: `its instance ${instanceId} is ${state} instead of running: ${why}` });
    step(`${plan.name}: ${instanceId} is ${state} instead of running: ${why}`);
  }
  run.servers = alive;
  for (const f of failures) {
    if (f.imageId === undefined) continue;
    try {
      await ec2.deregisterImage(deps.ec2, f.imageId);
      run.images = (run.images ?? []).filter((i) => i !== f.imageId);
    } catch (e) {
      step(`${f.plan}: could not deregister its image ${f.imageId}: ${errorText(e)}`);
    }
  }
  run.error = failures.length > 0
    ? failures.map((f) => `${f.plan}: ${f.error}`).join('; ')
    : `not every instance reported running: ${errorText(waitError)}`;
  if (alive.length === 0) run.status = 'failed';
  run.failedPlans = failures.map((f) => f.plan);
}

/** The error of a failover that did not bring every plan up (settleFailedLaunch). */
function failedLaunchError(run: RecoveryRun, failures: readonly PlanFailure[]): TandemError {
  const failed = failures.map((f) => `${f.plan}: ${f.error}`);
  const details = { run: run.id, running: run.servers.map((s) => ({ plan: s.plan, instanceId: s.instanceId, state: s.state })), failed: failures };
  if (run.servers.length === 0) {
    const left = run.images ?? [];
    const inEc2 = left.length === 0 ? 'Nothing of it is left in EC2' : `Its images ${left.join(', ')} are left (tagged tandem:run=${run.id}; deregister them)`;
    return new TandemError('ERR_FAILOVER_FAILED', `failover ${run.id} brought no server up: ${failed.join('; ')}. ${inEc2}, and no volume counts as failed over: fix the cause and rerun the failover`, { details });
  }
  const up = run.servers.map((s) => `${s.plan} (${s.instanceId}, ${s.state})`).join(', ');
  const rerun = failures.map((f) => `\`appliance failover --plan ${f.plan}\``).join(', ');
  return new TandemError(
    'ERR_FAILOVER_PARTIAL',
    `failover ${run.id} came up in part: ${up} ${run.servers.length === 1 ? 'runs' : 'run'} in EC2 and ${run.servers.length === 1 ? 'counts' : 'count'} as failed over. ${failed.length > 0 ? `Not up: ${failed.join('; ')}. Fix the cause and run ${rerun || 'the failover of those plans'} (its volumes are not failed over)` : `Not every instance reported running: ${run.error}; check ${run.servers.map((s) => s.instanceId).join(', ')} in EC2`}; \`appliance status\` shows what runs`,
    { details },
  );
}

/** Terminate the run's instances (waiting for it) and deregister its images. */
/** A launched server as recorded: `inst` is what DescribeInstances said of it (absent while it starts). */
function serverOf(plan: RecoveryPlan, imageId: string, instanceId: string, inst: Instance | undefined, points: ReadonlyMap<string, RecoveryPoint>): LaunchedServer {
  const byDevice = new Map((inst?.BlockDeviceMappings ?? []).map((m) => [m.DeviceName, m.Ebs?.VolumeId ?? null]));
  return {
    plan: plan.name,
    imageId,
    instanceId,
    state: inst?.State?.Name ?? 'pending',
    subnetId: inst?.SubnetId ?? null,
    privateIp: inst?.PrivateIpAddress ?? null,
    disks: plan.disks.map((d) => ({
      device: d.device,
      volume: d.volume,
      ebsSnapshotId: points.get(d.volume)!.ebsSnapshotId,
      tandemSnapshot: points.get(d.volume)!.tandemSnapshot,
      ec2VolumeId: byDevice.get(d.device) ?? null,
    })),
  };
}

/**
 * Tear down every drill that another process recorded as active and did not finish: it was
 * interrupted (killed, the machine restarted) and may have left instances running in the drill
 * subnet, and images. They are found by their tag `tandem:run`, then terminated and deregistered; the run is recorded as failed, saying so. A teardown that fails
 * is reported through `step` and tried again next time. Returns the runs torn down.
 */
export async function tearDownInterruptedDrills(deps: LaunchDeps): Promise<RecoveryRun[]> {
  const step = deps.step ?? (() => {});
  const done: RecoveryRun[] = [];
  for (const run of await interruptedDrills<RecoveryRun>(deps.store)) {
    try {
      // By tag only: an id recorded long ago may be unknown to EC2 by now, which would fail the
      // teardown every time; every instance and image of the run carries the tag from its creation.
      const found = await ec2.resourcesOfRun(deps.ec2, run.id);
      step(`drill ${run.id} (started ${run.started}) ${unfinishedDrillText(run)}: tearing it down`);
      const failed = run.status === 'failed';
      await teardown(deps, run, found.instances, found.images);
      run.status = 'failed';
      run.error = failed
        ? `${run.error ?? 'failed'}; its teardown failed, and was finished at ${run.tornDown}`
        : `interrupted: the process that ran it ended before its teardown; torn down at ${run.tornDown}`;
      await save(deps.store, run);
      done.push(run);
    } catch (e) {
      step(`could not tear down the interrupted drill ${run.id}: ${(e as Error).message}; the next drill tries again`);
    }
  }
  return done;
}

/**
 * Complete the records of failovers another process left unfinished (killed between RunInstances
 * and its record, or while its instances started): each instance EC2 holds with the run's tag
 * `tandem:run` is recorded as one of its servers, so the volume counts as failed over and no
 * second copy is launched; a run that launched nothing is recorded as failed. `plans`: the
 * configured recovery plans (an instance's plan is its tag `tandem:plan`).
 */
export async function settleInterruptedFailovers(deps: LaunchDeps, plans: readonly RecoveryPlan[]): Promise<void> {
  const step = deps.step ?? (() => {});
  for (const run of await listRuns(deps.store)) {
    if (run.mode !== 'failover' || run.status !== 'active' || run.rtoSeconds !== null || run.error !== null || run.owner === undefined || run.owner === RUN_OWNER) continue;
    const found = await ec2.resourcesOfRun(deps.ec2, run.id);
    const points = new Map(run.points.map((p) => [p.volume, p]));
    for (const inst of found.described) {
      if (run.servers.some((s) => s.instanceId === inst.InstanceId)) continue;
      const name = inst.Tags?.find((t) => t.Key === 'tandem:plan')?.Value;
      const plan = plans.find((p) => p.name === name);
      if (plan === undefined || !plan.disks.every((d) => points.has(d.volume))) continue;
      run.servers.push(serverOf(plan, inst.ImageId ?? '', inst.InstanceId!, inst, points));
      step(`failover ${run.id} was interrupted after it launched ${inst.InstanceId} (plan ${plan.name}): recorded`);
    }
    // Images it registered that no instance of it runs from: nothing will (the run is over), and
    // an image keeps EBS retention from deleting the export it maps.
    const used = new Set([...run.servers.map((s) => s.imageId), ...found.described.map((i) => i.ImageId)]);
    const orphans = found.images.filter((img) => !used.has(img));
    for (const img of orphans) await ec2.deregisterImage(deps.ec2, img);
    if (orphans.length > 0) step(`failover ${run.id} was interrupted with image(s) ${orphans.join(', ')} registered and no instance from them: deregistered`);
    if (run.servers.length === 0) {
      run.status = 'failed';
      run.error = `interrupted before any instance was launched${orphans.length > 0 ? `; its images ${orphans.join(', ')} were deregistered` : ''}`;
      step(`failover ${run.id} was interrupted before it launched anything: recorded as failed`);
    }
    await save(deps.store, run);
  }
}

export async function teardown(deps: LaunchDeps, run: RecoveryRun, instances: readonly string[], images: readonly string[]): Promise<void> {
  const step = deps.step ?? (() => {});
  // Images are deregistered before the wait for termination (EC2 allows it while instances run
  // from them), so a wait that fails leaves no image behind.
  await ec2.terminateInstances(deps.ec2, instances, false);
  for (const img of images) await ec2.deregisterImage(deps.ec2, img);
  await ec2.waitTerminated(deps.ec2, instances);
  step(`torn down: terminated ${instances.length} instance(s), deregistered ${images.length} image(s)`);
  run.tornDown = new Date().toISOString();
  if (run.status !== 'failed') run.status = 'torn-down';
}

function round(x: number): number {
  return Math.round(x * 100) / 100;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });
}

/** Recorded runs, newest first. */
export async function listRuns(store: Store): Promise<RecoveryRun[]> {
  const runs = (await store.listMeta<RecoveryRun>(RUNS_NS)).map(([, r]) => r);
  return runs.sort((a, b) => b.started.localeCompare(a.started));
}

/** The active failover that runs `volume`, if any (failback starts from it). */
export async function activeFailover(store: Store, volume: string): Promise<{ run: RecoveryRun; server: LaunchedServer; disk: LaunchedDisk } | null> {
  for (const run of await listRuns(store)) {
    if (run.mode !== 'failover' || run.status !== 'active') continue;
    for (const server of run.servers) {
      const disk = server.disks.find((d) => d.volume === volume);
      if (disk) return { run, server, disk };
    }
  }
  return null;
}
