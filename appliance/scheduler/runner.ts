/**
 * The scheduler: runs each protected volume's job early enough to meet its RPO.
 *
 * A *unit* is what one job protects: a volume group (snapshotted together, between its hooks)
 * or a single volume. On the appliance that owns the volumes (they have a local path) a
 * `protect` job snapshots the unit, replicates each snapshot to the peer (config
 * `replication.peer`), then applies retention. On the appliance that receives replicas (no
 * local path) a `replica` job runs when a new replica arrives: export to EBS when the policy
 * says `export: ebs`, then retention. `gc()` runs after retention deleted something.
 *
 * Guarantees:
 * - at most one job per volume (units are disjoint; the volume lock also stops a CLI snapshot);
 * - jobs are ordered by deadline (earliest deadline first) with at most `maxParallel` at once;
 * - each step is checkpointed in meta `scheduler` (state.ts); after a restart the job resumes
 *   from its step (a snapshot step is redone: a recovery point must be taken between its hooks;
 *   a replication continues with the same snapshots, and the sync itself resumes where it stopped);
 * - `stop()` stops scheduling, lets running jobs finish for a bounded time, then aborts them:
 *   their checkpoint stays and the next start resumes them.
 *
 * Held replication: when the peer refuses a push for a reason a retry does not change (a code
 * of {@link HOLD_CODES}: the volume runs in EC2 after a failover, or another appliance is its
 * source there), the unit is *held* (volume state `held`): no backoff and no further jobs, so a
 * stale disk is not rescanned every few minutes for pushes that are refused anyway. Every
 * {@link HOLD_PROBE_MS} one lock request asks the peer whether it takes pushes again (after the
 * failback, or once the other source is gone); when it does, the job runs at once.
 */
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { isTandemError, TandemError } from '../../common/errors.js';
import type { GcReport, SnapshotRecord, VolumeRecord } from '../../store/types.js';
import { groupOf, policyFor, type Config, type Hooks, type Policy } from '../config/index.js';
import { withHooks } from '../hooks.js';
import { applyRetention, type RetentionStore } from '../policy/index.js';
import type { Clock } from './clock.js';
import { believable, expectedDurationMs, nextStart, updateRates } from './deadline.js';
import {
  clearCheckpoint, listCheckpoints, pushedPointAt, readRates, readVolumeState, saveCheckpoint, updateVolumeState, JOB_PREFIX, RATES_NS, STATE_NS,
  type HeldReplication, type JobCheckpoint, type MetaStore,
} from './state.js';
import { onPauseChange } from '../pause.js';
import { getSyncBase, pushPoint } from '../sync-base.js';

/** What a job does to a volume; the daemon wires these to ops, replicate and ebs (steps.ts). */
export interface JobSteps {
  /**
   * Take a snapshot of a local volume (takes the volume lock). `replicateTo`: the job's replicate
   * step pushes this snapshot to that peer next, so its new blocks may start travelling during
   * the scan (steps.ts).
   */
  snapshot(volume: string, opts: { labels: Record<string, string>; signal: AbortSignal; replicateTo?: string }): Promise<SnapshotRecord>;
  /**
   * Push `snapshot` to peer `peer` (config `replication.peer`); null: this appliance does not
   * replicate. Returns the bytes sent, of which `bytesSentEarly` (`blocksSentEarly` blocks) went
   * from the snapshot step's scan.
   */
  replicate: ((volume: string, snapshot: SnapshotRecord, peer: string, signal: AbortSignal) => Promise<{ bytesSent: number; bytesSentEarly?: number; blocksSentEarly?: number; peerRepaired?: number; peerNodesRepaired?: number }>) | null;
  /**
   * Would peer `peer` take a push of `volume` now? null if so, else its refusal (a code of
   * {@link HOLD_CODES}); any other failure throws. Asked only of held volumes.
   */
  pushRefusal: ((volume: string, peer: string, signal: AbortSignal) => Promise<{ code: string; message: string } | null>) | null;
  /** A job of these volumes ended (done, failed or stopped): what its steps still hold for it is given up. */
  endJob?(volumes: readonly string[]): Promise<void>;
  /** Export a replica to EBS; null where EBS is not available. */
  exportEbs: ((volume: string, snapshot: SnapshotRecord, signal: AbortSignal) => Promise<{ ebsSnapshotId: string; bytesUploaded: number; seconds: number }>) | null;
}

export interface SchedulerStore extends MetaStore, RetentionStore {
  listVolumes(): Promise<VolumeRecord[]>;
  latestSnapshot(volume: string): Promise<SnapshotRecord | null>;
  getSnapshot(volume: string, id: string): Promise<SnapshotRecord | null>;
  gc(): Promise<GcReport>;
}

/** Structured log sink (pino's logger fits). */
export interface Log {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

export interface SchedulerOptions {
  readonly store: SchedulerStore;
  readonly steps: JobSteps;
  /** Called every round: the daemon re-reads config.yaml so edits apply without a restart. */
  readonly loadConfig: () => Promise<Config>;
  /** The hooks' ledger (hooks.ts HookOptions.ledger): what a job killed between its hooks owes. */
  readonly hookLedger?: string;
  readonly clock: Clock;
  readonly log: Log;
  /** Jobs at once (on different volumes). */
  readonly maxParallel?: number;
  /** Longest sleep between rounds: how soon new volumes, replicas and config edits are noticed. */
  readonly rescanMs?: number;
  /**
   * Called after each job (tests and the daemon's alerting wait on this instead of sleeping).
   * `held`: the job only checked a held unit, and the peer still refuses it.
   */
  readonly onJobEnd?: (unit: string, outcome: { ok: boolean; held?: boolean; paused?: boolean; error?: unknown }) => void;
}

export interface Unit {
  readonly key: string;
  readonly kind: 'protect' | 'replica';
  readonly group: string | null;
  readonly volumes: readonly VolumeRecord[];
  /** The strictest policy among the unit's volumes (smallest RPO). */
  readonly policy: Policy;
  readonly hooks: Hooks | null;
}

/** Two jobs at once keep a slow replication from starving other volumes on a 2-core appliance. */
export const DEFAULT_MAX_PARALLEL = 2;
/** Config edits, new volumes and arriving replicas are noticed within a minute. */
export const DEFAULT_RESCAN_MS = 60_000;
/** After a failed job: retry after 30 s, doubling up to 10 min (never hammer a dead peer). */
export const RETRY_BASE_MS = 30_000;
export const RETRY_MAX_MS = 600_000;
/** Peer refusals that hold a unit until the peer takes pushes of the volume again. */
export const HOLD_CODES: ReadonlySet<string> = new Set(['ERR_VOLUME_FAILED_OVER', 'ERR_VOLUME_NAME_TAKEN']);
/** How often a held unit asks its peer again: replication resumes within a minute of the failback. */
export const HOLD_PROBE_MS = 60_000;

/** The units to schedule: groups and single volumes with a policy (pure). */
export function planUnits(config: Config, volumes: readonly VolumeRecord[]): Unit[] {
  const units: Unit[] = [];
  const byName = new Map(volumes.map((v) => [v.name, v]));
  const grouped = new Set<string>();
  for (const g of Object.values(config.groups)) {
    const members = g.volumes.map((n) => byName.get(n)).filter((v): v is VolumeRecord => v !== undefined && v.path !== undefined);
    members.forEach((v) => grouped.add(v.name));
    const policies = members.map((v) => policyFor(config, v)).filter((p): p is Policy => p !== null);
    if (members.length === 0 || policies.length === 0) continue;
    const policy = policies.reduce((a, b) => (b.rpoMs < a.rpoMs ? b : a));
    units.push({ key: `group:${g.name}`, kind: 'protect', group: g.name, volumes: members, policy, hooks: g.hooks });
  }
  for (const v of volumes) {
    if (grouped.has(v.name)) continue;
    const policy = policyFor(config, v);
    if (policy === null) continue;
    const kind = v.path !== undefined ? 'protect' : 'replica';
    units.push({ key: `volume:${v.name}`, kind, group: null, volumes: [v], policy, hooks: kind === 'protect' ? groupOf(config, v.name)?.hooks ?? null : null });
  }
  return units;
}

function newJobId(now: number): string {
  return `job-${new Date(now).toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}-${randomBytes(3).toString('hex')}`;
}

/** A failure as the log records it: its stable code and message. */
export function errorInfo(e: unknown): { code: string; message: string } {
  return isTandemError(e) ? { code: e.code, message: e.message } : { code: 'ERR_INTERNAL', message: (e as Error)?.message ?? String(e) };
}

interface Running {
  readonly promise: Promise<void>;
  readonly abort: AbortController;
  readonly volumes: readonly string[];
}

export class Scheduler {
  private readonly o: Required<Omit<SchedulerOptions, 'onJobEnd' | 'hookLedger'>> & Pick<SchedulerOptions, 'onJobEnd' | 'hookLedger'>;
  private readonly running = new Map<string, Running>();
  private readonly failures = new Map<string, { count: number; retryAt: number }>();
  private stopping = false;
  private wake = new AbortController();
  private loopDone: Promise<void> | null = null;
  private lastConfig: Config | null = null;
  /** Volumes already told to name a policy config.yaml lacks (`volume@policy`): told once each. */
  private readonly toldMissing = new Set<string>();
  /** Stops listening to pauses and resumes (appliance/pause.ts), which wake the loop. */
  private unlistenPause: (() => void) | null = null;

  constructor(opts: SchedulerOptions) {
    this.o = { maxParallel: DEFAULT_MAX_PARALLEL, rescanMs: DEFAULT_RESCAN_MS, ...opts };
  }

  /** Start: resume checkpointed jobs, then schedule. Returns at once; `stop()` ends it. */
  start(): void {
    if (this.loopDone) return;
    this.unlistenPause = onPauseChange(() => this.wake.abort());
    this.loopDone = this.loop();
  }

  /** Jobs running now, by unit key. */
  runningUnits(): string[] {
    return [...this.running.keys()];
  }

  /**
   * Stop scheduling; wait up to `graceMs` (real time) for running jobs, then abort them (their
   * checkpoints stay for the next start) and wait for them to unwind.
   */
  async stop(graceMs = 30_000): Promise<void> {
    this.stopping = true;
    this.unlistenPause?.();
    this.wake.abort();
    const all = () => Promise.allSettled([...this.running.values()].map((r) => r.promise));
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<'timeout'>((r) => { timer = setTimeout(() => r('timeout'), graceMs); });
    const first = await Promise.race([all().then(() => 'done' as const), graceOver]);
    clearTimeout(timer);
    if (first === 'timeout') {
      for (const [unit, r] of this.running) {
        this.o.log.warn({ unit }, 'stopping: aborting the running job; it resumes from its checkpoint at the next start');
        r.abort.abort(new TandemError('ERR_INTERNAL', 'the daemon is stopping'));
      }
      await all();
    }
    await this.loopDone;
  }

  /** Run a scheduling round now (config.yaml re-read: `kill -HUP` of the daemon) instead of at the next rescan. */
  wakeUp(): void {
    this.wake.abort();
  }

  private async loadConfig(): Promise<Config | null> {
    try {
      this.lastConfig = await this.o.loadConfig();
    } catch (e) {
      this.o.log.error({ err: errorInfo(e) }, 'config.yaml is invalid: keeping the last valid configuration');
    }
    return this.lastConfig;
  }

  private async loop(): Promise<void> {
    const { store, clock, log } = this.o;
    // Resume what a previous run left half done, before anything new.
    try {
      await this.resumeCheckpoints();
    } catch (e) {
      log.error({ err: errorInfo(e) }, 'could not read checkpointed jobs');
    }
    while (!this.stopping) {
      let sleepMs = this.o.rescanMs;
      try {
        sleepMs = await this.round();
      } catch (e) {
        // A store or config read failed: log, and try again after the rescan interval.
        log.error({ err: errorInfo(e) }, 'scheduling round failed');
      }
      if (this.stopping) break;
      await clock.sleep(sleepMs, this.wake.signal);
      if (this.wake.signal.aborted) this.wake = new AbortController();
    }
  }

  /** One scheduling round: launch what is due (earliest deadline first); returns how long to sleep. */
  private async round(): Promise<number> {
    const { store, clock } = this.o;
    const config = await this.loadConfig();
    if (!config) return this.o.rescanMs;
    let sleepMs = this.o.rescanMs;
    const now = clock.now();
    const due: Array<{ unit: Unit; at: number }> = [];
    const volumes = await store.listVolumes();
    for (const v of volumes) {
      const key = `${v.name}@${v.policy ?? ''}`;
      if (v.policy === undefined || config.policies[v.policy] !== undefined || this.toldMissing.has(key)) continue;
      this.toldMissing.add(key);
      this.o.log.error({ volume: v.name, policy: v.policy }, `volume ${v.name} names policy "${v.policy}", which config.yaml does not define (renamed or removed?): no job protects it; define it again or give the volume another (status shows it BREACHED)`);
    }
    for (const unit of planUnits(config, volumes)) {
      const running = this.running.get(unit.key);
      if (running) {
        if (!running.abort.signal.aborted && (await this.pausedUntil(unit, now)) !== null) {
          this.o.log.info({ unit: unit.key }, 'the volume was paused: stopping its running job (it resumes from its checkpoint when the pause ends)');
          running.abort.abort(new TandemError('ERR_VOLUME_PAUSED', `the scheduled jobs of ${unit.volumes.map((v) => v.name).join(', ')} were paused (\`appliance resume\`)`));
        }
        continue;
      }
      const at = Math.max(await this.dueAt(unit, config, now), this.failures.get(unit.key)?.retryAt ?? -Infinity);
      due.push({ unit, at });
    }
    due.sort((a, b) => a.at - b.at);
    for (const d of due) {
      if (d.at > now) {
        sleepMs = Math.min(sleepMs, d.at - now);
        break;
      }
      if (this.running.size >= this.o.maxParallel) break;
      if (d.unit.volumes.some((v) => this.busy(v.name))) continue;
      // A job stopped by a pause left its checkpoint: it goes on from there.
      const cp = await store.getMeta<JobCheckpoint>(STATE_NS, JOB_PREFIX + d.unit.key);
      if (cp) this.o.log.info({ unit: d.unit.key, job: cp.id, step: cp.step }, 'resuming a job a pause stopped');
      this.launch(d.unit, cp ? { ...cp, resumes: cp.resumes + 1 } : null);
    }
    return sleepMs;
  }

  /** Relaunch the jobs a previous process left checkpointed. */
  private async resumeCheckpoints(): Promise<void> {
    const { store, log } = this.o;
    const config = await this.loadConfig();
    for (const cp of await listCheckpoints(store)) {
      const unit = config ? planUnits(config, await store.listVolumes()).find((u) => u.key === cp.unit) : undefined;
      if (!unit) {
        log.warn({ unit: cp.unit, job: cp.id }, 'a checkpointed job belongs to a unit no longer configured: dropping it');
        await clearCheckpoint(store, cp.unit);
        continue;
      }
      if ((await this.pausedUntil(unit, this.o.clock.now())) !== null) continue; // resumed when the pause ends (round)
      log.info({ unit: cp.unit, job: cp.id, step: cp.step }, 'resuming a job interrupted by a restart');
      this.launch(unit, { ...cp, resumes: cp.resumes + 1 });
    }
  }

  private busy(volume: string): boolean {
    for (const r of this.running.values()) if (r.volumes.includes(volume)) return true;
    return false;
  }

  /** When `unit` should start next (ms since epoch). */
  private async dueAt(unit: Unit, config: Config, now: number): Promise<number> {
    const { store } = this.o;
    const pausedUntil = await this.pausedUntil(unit, now);
    if (pausedUntil !== null) return pausedUntil;
    if (unit.kind === 'replica') {
      const v = unit.volumes[0]!;
      const latest = await store.latestSnapshot(v.name);
      const st = await readVolumeState(store, v.name);
      return latest !== null && latest.id !== st.lastSeen ? now : Infinity;
    }
    const held = await this.heldStates(unit);
    if (held.length > 0) return Math.min(...held.map((h) => Date.parse(h.checkedAt))) + HOLD_PROBE_MS;
    let lastGood: number | null = Infinity;
    let expected = 0;
    // A push by hand to the replication peer (`appliance sync`, also forwarded into this process)
    // made a recovery point as a job does: the next job is due an RPO after the newer of the two.
    const peer = config.replication !== null && this.o.steps.replicate !== null ? config.replication.peer : null;
    for (const v of unit.volumes) {
      const st = await readVolumeState(store, v.name);
      // Replicating: the point the peer holds (lastGood moved on with local snapshots while
      // replication was off; a push to another peer is none). A point dated in the future (the
      // clock was set back since) does not put the job off.
      const own = peer === null ? st.lastGood : pushedPointAt(st, peer);
      let t = believable(own === null ? null : Date.parse(own), now);
      const base = peer === null ? undefined : await getSyncBase(store, v.name, peer);
      const pushedPoint = base === undefined ? null : await pushPoint(store, v.name, base);
      const pushed = pushedPoint === null ? null : believable(Date.parse(pushedPoint.at), now);
      if (pushed !== null) t = Math.max(t ?? -Infinity, pushed);
      lastGood = t === null || lastGood === null ? null : Math.min(lastGood, t);
      expected += expectedDurationMs(await readRates(store, v.name), v.size, config.replication !== null && this.o.steps.replicate !== null);
    }
    return nextStart(lastGood, unit.policy.rpoMs, expected, now);
  }

  /**
   * While a volume of `unit` is paused (`appliance pause`): when the last of their pauses ends
   * (Infinity: one lasts until resumed). Null when none is; a pause that has ended is cleared.
   */
  private async pausedUntil(unit: Unit, now: number): Promise<number | null> {
    let until: number | null = null;
    for (const v of unit.volumes) {
      const p = (await readVolumeState(this.o.store, v.name)).paused;
      if (!p) continue;
      const end = p.until === null ? Infinity : Date.parse(p.until);
      if (end <= now) {
        // Only that pause: one set meanwhile (a forwarded `appliance pause`) stays.
        await updateVolumeState(this.o.store, v.name, (st) => (st.paused?.at === p.at && st.paused.until === p.until ? { paused: null } : null));
        this.o.log.info({ volume: v.name, pausedBy: p.by, pausedAt: p.at }, 'pause ended: scheduled jobs resume');
        continue;
      }
      until = Math.max(until ?? 0, end);
    }
    return until;
  }

  /** The held states of a protect unit's volumes that still apply (same peer, replication on). */
  private async heldStates(unit: Unit): Promise<Array<HeldReplication & { volume: string }>> {
    const peer = this.lastConfig?.replication?.peer;
    if (unit.kind !== 'protect' || peer === undefined || this.o.steps.replicate === null) return [];
    const out: Array<HeldReplication & { volume: string }> = [];
    for (const v of unit.volumes) {
      const h = (await readVolumeState(this.o.store, v.name)).held;
      if (h !== null && h.peer === peer) out.push({ ...h, volume: v.name });
    }
    return out;
  }

  private launch(unit: Unit, checkpoint: JobCheckpoint | null): void {
    const abort = new AbortController();
    const promise = this.runJob(unit, checkpoint, abort.signal).then(
      (outcome) => {
        this.failures.delete(unit.key);
        this.o.onJobEnd?.(unit.key, outcome === 'held' ? { ok: false, held: true } : { ok: true });
      },
      (e) => {
        if (abort.signal.aborted) {
          if (!isTandemError(abort.signal.reason, 'ERR_VOLUME_PAUSED')) this.o.log.warn({ unit: unit.key }, 'job interrupted; checkpoint kept');
        } else if (isTandemError(e) && HOLD_CODES.has(e.code)) {
          // Held (replicateStep recorded it): no backoff, the next check is HOLD_PROBE_MS away.
          this.failures.delete(unit.key);
        } else {
          const count = (this.failures.get(unit.key)?.count ?? 0) + 1;
          const delay = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** (count - 1));
          this.failures.set(unit.key, { count, retryAt: this.o.clock.now() + delay });
          this.o.log.error({ unit: unit.key, err: errorInfo(e), retryInMs: delay }, 'job failed');
        }
        this.o.onJobEnd?.(unit.key, isTandemError(abort.signal.reason, 'ERR_VOLUME_PAUSED') ? { ok: false, paused: true } : { ok: false, error: e });
      },
    ).finally(() => {
      this.running.delete(unit.key);
      this.wake.abort();
    });
    this.running.set(unit.key, { promise, abort, volumes: unit.volumes.map((v) => v.name) });
  }

  private async runJob(unit: Unit, resume: JobCheckpoint | null, signal: AbortSignal): Promise<'done' | 'held'> {
    const { store, clock, log } = this.o;
    if (resume === null && (await this.stillHeld(unit, signal))) return 'held';
    const now = clock.now();
    let cp: JobCheckpoint = resume ?? {
      id: newJobId(now),
      unit: unit.key,
      kind: unit.kind,
      volumes: unit.volumes.map((v) => v.name),
      step: unit.kind === 'protect' ? 'snapshot' : 'export',
      snapshots: {},
      done: [],
      pointTime: null,
      started: new Date(now).toISOString(),
      resumes: 0,
    };
    await saveCheckpoint(store, cp);
    log.info({ unit: unit.key, job: cp.id, step: cp.step }, resume ? 'job resumed' : 'job started');
    let warning: string | undefined;
    try {
      if (cp.step === 'snapshot') {
        const r = await this.snapshotStep(unit, cp, signal);
        cp = r.cp;
        warning = r.warning;
      }
      if (cp.step === 'replicate') cp = await this.replicateStep(unit, cp, signal);
      if (cp.step === 'export') cp = await this.exportStep(unit, cp, signal);
      if (cp.step === 'retention') await this.retentionStep(unit);
    } catch (e) {
      if (!signal.aborted) {
        // A failed job starts over next time (a fresh snapshot); an aborted one resumes.
        await clearCheckpoint(store, unit.key);
        for (const v of cp.volumes) await updateVolumeState(store, v, { lastJob: { id: cp.id, ended: new Date(clock.now()).toISOString(), ok: false, error: errorInfo(e) } });
      }
      throw e;
    } finally {
      await this.o.steps.endJob?.(cp.volumes).catch(() => undefined);
    }
    for (const v of cp.volumes) {
      await updateVolumeState(store, v, { lastJob: { id: cp.id, ended: new Date(clock.now()).toISOString(), ok: true, ...(warning ? { warning } : {}) } });
    }
    await clearCheckpoint(store, unit.key);
    log.info({ unit: unit.key, job: cp.id, ...(warning ? { warning } : {}) }, 'job done');
    return 'done';
  }

  /**
   * Ask the peer about each held volume of `unit`: a volume it takes pushes of again is no
   * longer held. True while one still is (the job then does nothing).
   */
  private async stillHeld(unit: Unit, signal: AbortSignal): Promise<boolean> {
    const { store, steps, clock, log } = this.o;
    if (steps.pushRefusal === null) return false;
    let still = false;
    for (const h of await this.heldStates(unit)) {
      const { volume, ...held } = h;
      const refusal = await steps.pushRefusal(volume, held.peer, signal);
      if (refusal === null) {
        await updateVolumeState(store, volume, { held: null });
        log.info({ volume, peer: held.peer, heldSince: held.since }, 'the peer takes pushes of the volume again: replication resumes');
      } else {
        await updateVolumeState(store, volume, { held: { ...held, code: refusal.code, message: refusal.message, checkedAt: new Date(clock.now()).toISOString() } });
        still = true;
      }
    }
    return still;
  }

  private async snapshotStep(unit: Unit, cp: JobCheckpoint, signal: AbortSignal): Promise<{ cp: JobCheckpoint; warning?: string }> {
    const { store, steps, clock } = this.o;
    const pointTime = new Date(clock.now()).toISOString();
    const labels: Record<string, string> = unit.group ? { group: unit.group, groupRun: cp.id } : {};
    // The new blocks of each snapshot start travelling while it is scanned (steps.ts); they are
    // pushed, one snapshot at a time, once the unit's snapshots are taken between its hooks.
    const peer = this.lastConfig?.replication?.peer;
    const replicateTo = steps.replicate !== null && peer !== undefined ? { replicateTo: peer } : {};
    const take = async () => {
      const snaps: Record<string, string> = {};
      for (const v of unit.volumes) {
        const t0 = performance.now();
        const snap = await steps.snapshot(v.name, { labels, signal, ...replicateTo });
        const secs = Math.max(0.001, (performance.now() - t0) / 1000);
        await store.putMeta(RATES_NS, v.name, updateRates(await readRates(store, v.name), { scanBytesPerSec: snap.size / secs }, new Date()));
        snaps[v.name] = snap.id;
      }
      return snaps;
    };
    let snaps: Record<string, string>;
    let warning: string | undefined;
    try {
      snaps = await withHooks(unit.hooks, take, { env: { TANDEM_GROUP: unit.group ?? '', TANDEM_VOLUMES: unit.volumes.map((v) => v.name).join(' '), TANDEM_JOB: cp.id }, signal, ...(this.o.hookLedger ? { ledger: this.o.hookLedger } : {}) });
    } catch (e) {
      // A post hook that failed after the snapshots were taken: the snapshots stand.
      if (isTandemError(e, 'ERR_HOOK_FAILED') && e.details.snapshotTaken === true) {
        snaps = e.details.result as Record<string, string>;
        warning = e.message;
        this.o.log.warn({ unit: unit.key, err: errorInfo(e) }, 'post hook failed; the snapshots are kept');
      } else throw e;
    }
    const replicate = this.lastConfig?.replication != null && steps.replicate !== null;
    for (const [v, id] of Object.entries(snaps)) {
      await updateVolumeState(store, v, { lastSnapshot: id, ...(replicate ? {} : { lastGood: pointTime }) });
    }
    const next: JobCheckpoint = { ...cp, step: replicate ? 'replicate' : 'retention', snapshots: snaps, done: [], pointTime };
    await saveCheckpoint(store, next);
    return { cp: next, ...(warning ? { warning } : {}) };
  }

  private async replicateStep(unit: Unit, cp: JobCheckpoint, signal: AbortSignal): Promise<JobCheckpoint> {
    const { store, steps } = this.o;
    let cur = cp;
    for (const v of unit.volumes) {
      const peer = this.lastConfig?.replication?.peer;
      if (cur.done.includes(v.name) || steps.replicate === null || peer === undefined) continue;
      const id = cur.snapshots[v.name];
      const snap = id === undefined ? null : await store.getSnapshot(v.name, id);
      if (snap === null) {
        throw new TandemError('ERR_SNAPSHOT_NOT_FOUND', `snapshot ${id ?? '(none)'} of "${v.name}" taken by job ${cp.id} is gone; the next job takes a fresh one`, { details: { volume: v.name, snapshot: id } });
      }
      const t0 = performance.now();
      let r: Awaited<ReturnType<NonNullable<JobSteps['replicate']>>>;
      try {
        r = await steps.replicate(v.name, snap, peer, signal);
      } catch (e) {
        if (isTandemError(e) && HOLD_CODES.has(e.code)) await this.hold(v.name, peer, e);
        throw e;
      }
      const secs = Math.max(0.001, (performance.now() - t0) / 1000);
      // The rate of this step's own sending: what went during the scan is not in its time.
      const inStep = r.bytesSent - (r.bytesSentEarly ?? 0);
      await store.putMeta(RATES_NS, v.name, updateRates(await readRates(store, v.name), { syncBytesPerSec: inStep > 0 ? inStep / secs : undefined, changedBytes: r.bytesSent }, new Date()));
      this.o.log.info({ unit: unit.key, volume: v.name, peer, snapshot: snap.id, bytesSent: r.bytesSent, bytesSentEarly: r.bytesSentEarly ?? 0, blocksSentEarly: r.blocksSentEarly ?? 0, seconds: Number(secs.toFixed(3)) }, 'replicated');
      if (r.peerRepaired || r.peerNodesRepaired) {
        this.o.log.warn({ volume: v.name, peer, blocksRepaired: r.peerRepaired ?? 0, nodesRepaired: r.peerNodesRepaired ?? 0 }, "healed what the peer's verify found damaged, with this store's copies");
      }
      await updateVolumeState(store, v.name, { lastGood: cur.pointTime, lastReplicated: snap.id, ...(cur.pointTime ? { lastReplicatedAt: cur.pointTime } : {}), lastReplicatedTo: peer, held: null });
      cur = { ...cur, done: [...cur.done, v.name] };
      await saveCheckpoint(store, cur);
    }
    cur = { ...cur, step: 'retention', done: [] };
    await saveCheckpoint(store, cur);
    return cur;
  }

  /** Record that `peer` refuses pushes of `volume` (see the module comment). */
  private async hold(volume: string, peer: string, e: TandemError): Promise<void> {
    const { store, clock, log } = this.o;
    const now = new Date(clock.now()).toISOString();
    const before = (await readVolumeState(store, volume)).held;
    const since = before !== null && before.peer === peer ? before.since : now;
    await updateVolumeState(store, volume, { held: { peer, code: e.code, message: e.message, since, checkedAt: now } });
    log.warn({ volume, peer, err: errorInfo(e), checkEveryMs: HOLD_PROBE_MS }, 'replication held: the peer refuses pushes of the volume; no snapshot or push is scheduled until it takes them again');
  }

  private async exportStep(unit: Unit, cp: JobCheckpoint, signal: AbortSignal): Promise<JobCheckpoint> {
    const { store, steps, log } = this.o;
    const v = unit.volumes[0]!;
    const snap = await store.latestSnapshot(v.name);
    let cur: JobCheckpoint = { ...cp, snapshots: snap ? { [v.name]: snap.id } : {} };
    if (snap && unit.policy.export === 'ebs') {
      if (steps.exportEbs === null) {
        log.warn({ volume: v.name }, 'the policy asks for an EBS export but this appliance has no AWS access configured');
      } else {
        const r = await steps.exportEbs(v.name, snap, signal);
        if (r.bytesUploaded > 0 && r.seconds > 0) {
          await store.putMeta(RATES_NS, v.name, updateRates(await readRates(store, v.name), { exportBytesPerSec: r.bytesUploaded / r.seconds }, new Date()));
        }
        await updateVolumeState(store, v.name, { lastExported: snap.id });
        log.info({ volume: v.name, snapshot: snap.id, ebsSnapshotId: r.ebsSnapshotId }, 'exported to EBS');
      }
    }
    // The replica's recovery point is the time it was taken on the other side.
    if (snap) await updateVolumeState(store, v.name, { lastSeen: snap.id, lastGood: snap.created, lastSnapshot: snap.id });
    cur = { ...cur, step: 'retention' };
    await saveCheckpoint(store, cur);
    return cur;
  }

  private async retentionStep(unit: Unit): Promise<void> {
    const { store, log, clock } = this.o;
    const config = this.lastConfig;
    let deleted = 0;
    for (const v of unit.volumes) {
      const policy = config ? policyFor(config, v) : null;
      if (policy !== null && policy.retention !== null) {
        const r = await applyRetention(store, v.name, policy, undefined, clock.now());
        deleted += r.deleted.length;
        if (r.deleted.length > 0) log.info({ volume: v.name, deleted: r.deleted, kept: r.kept.length }, 'retention applied');
      }
      // The volume's EBS exports (cloud appliance) under the same policy; a failure there is
      // retried at the next job's retention and does not fail this one.
      try {
        const { retainExports } = await import('../ebs/retention.js');
        // Without a retention policy, only what an earlier run could not delete in EBS is finished.
        const e = await retainExports(store, v.name, policy?.retention ?? null, { now: clock.now() });
        if (e !== null && (e.deleted.length > 0 || e.failed.length > 0)) {
          log[e.failed.length > 0 ? 'warn' : 'info']({ volume: v.name, deleted: e.deleted, kept: e.kept.length, inImages: e.inImages, failed: e.failed }, 'retention applied to the EBS exports');
        }
      } catch (err) {
        log.warn({ volume: v.name, err: errorInfo(err) }, 'retention of the EBS exports failed; the next job tries again');
      }
    }
    if (deleted > 0) {
      const gc = await store.gc();
      // Not a failure (nothing is lost), but the space of small packs stays spread until there is room.
      if (gc.packsNotMerged.length > 0) log.warn({ ...gc }, `gc done, but left ${gc.packsNotMerged.length} small packs unmerged for lack of space (packsNotMerged: what each needs); free space on the store's disk or grow it`);
      else log.info({ ...gc }, 'gc done');
    }
  }
}
