/**
 * The scheduler's durable state, in the store's meta namespace `scheduler` (so it survives
 * restarts and is as crash-safe as the store):
 *
 * | key            | value |
 * | ---            | --- |
 * | `VOLUME`       | {@link VolumeState}: last good point, last snapshot/replication/export, last job, hold, pause |
 * | `#job/UNIT`    | {@link JobCheckpoint}: the job running on a unit (`volume:NAME` or `group:NAME`) and how far it got |
 *
 * Rates measured per volume live in namespace `rates` (key VOLUME, {@link Rates}).
 * Volume names cannot contain `#` or `/`, so the two kinds of keys never collide.
 */
import type { Rates } from './deadline.js';
import { DEFAULT_RATES } from './deadline.js';
import { Mutex } from '../../store/mutex.js';

export const STATE_NS = 'scheduler';
export const RATES_NS = 'rates';
export const JOB_PREFIX = '#job/';

export interface JobOutcome {
  readonly id: string;
  readonly ended: string;
  readonly ok: boolean;
  readonly error?: { readonly code: string; readonly message: string };
  /** A problem that did not fail the job (e.g. a post hook that failed after the snapshot). */
  readonly warning?: string;
}

export interface VolumeState {
  /** Time of the last good recovery point (the start of the snapshot that was replicated), ISO. */
  readonly lastGood: string | null;
  readonly lastSnapshot: string | null;
  /** Snapshot id last pushed to the peer (kept by retention: the next sync builds on it). */
  readonly lastReplicated: string | null;
  /**
   * The time of the point {@link lastReplicated} stands for (its snapshot's start), and the peer
   * it went to. `lastGood` moves on with local snapshots while replication is off in config.yaml,
   * so it does not date what the peer holds once replication is back, or what a new peer holds.
   * Absent in records of earlier releases: `lastGood` stands for it there.
   */
  readonly lastReplicatedAt?: string;
  readonly lastReplicatedTo?: string;
  /** Cloud side: the snapshot last exported to EBS, and the latest replica handled. */
  readonly lastExported: string | null;
  readonly lastSeen: string | null;
  readonly lastJob: JobOutcome | null;
  /** Set while the replication peer refuses pushes of the volume (runner.ts, "held"). */
  readonly held: HeldReplication | null;
  /** Set by `appliance pause` (appliance/pause.ts): no scheduled job for the volume until it ends. */
  readonly paused: Pause | null;
}

/** An operator's pause of a volume's scheduled jobs (appliance/pause.ts). */
export interface Pause {
  /** Who paused it (the CLI's user, as the audit log has it). */
  readonly by: string;
  /** When, and until when (null: until `appliance resume`), ISO. */
  readonly at: string;
  readonly until: string | null;
  readonly reason: string | null;
}

/**
 * A volume whose pushes the peer refuses for a reason a retry does not change (the volume runs
 * in EC2 after a failover, or another appliance is its source there): its scheduled jobs stop
 * (no snapshot, no push) until a check finds the peer takes pushes of it again.
 */
export interface HeldReplication {
  readonly peer: string;
  /** The peer's refusal: ERR_VOLUME_FAILED_OVER or ERR_VOLUME_NAME_TAKEN, and what to do. */
  readonly code: string;
  readonly message: string;
  /** First refusal and last check, ISO (scheduler clock). */
  readonly since: string;
  readonly checkedAt: string;
}

export const EMPTY_VOLUME_STATE: VolumeState = {
  lastGood: null, lastSnapshot: null, lastReplicated: null, lastExported: null, lastSeen: null, lastJob: null, held: null, paused: null,
};

export type JobStep = 'snapshot' | 'replicate' | 'export' | 'retention';

export interface JobCheckpoint {
  readonly id: string;
  readonly unit: string;
  /** protect: snapshot + replicate local volumes; replica: export + retention of received replicas. */
  readonly kind: 'protect' | 'replica';
  readonly volumes: readonly string[];
  readonly step: JobStep;
  /** Snapshot taken (protect) or handled (replica) per volume. */
  readonly snapshots: Readonly<Record<string, string>>;
  /** Volumes whose current step is done (replicate: pushed). */
  readonly done: readonly string[];
  /** The recovery point of this job (scheduler clock), ISO; null before the snapshot. */
  readonly pointTime: string | null;
  readonly started: string;
  /** Times this job was resumed after a restart. */
  readonly resumes: number;
}

/** The meta surface the scheduler uses. */
export interface MetaStore {
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
  putMeta(ns: string, key: string, value: unknown): Promise<void>;
  deleteMeta(ns: string, key: string): Promise<void>;
  listMeta<T>(ns: string): Promise<Array<[string, T]>>;
}

/**
 * When the point the daemon last pushed to `peer` was taken (ISO), or null when its last push
 * went to another peer. A record of an earlier release does not say: its `lastGood` stands for it.
 */
export function pushedPointAt(st: VolumeState, peer: string): string | null {
  if (st.lastReplicatedTo === undefined) return st.lastGood;
  return st.lastReplicatedTo === peer ? st.lastReplicatedAt ?? null : null;
}

export async function readVolumeState(store: Pick<MetaStore, 'getMeta'>, volume: string): Promise<VolumeState> {
  return { ...EMPTY_VOLUME_STATE, ...(await store.getMeta<VolumeState>(STATE_NS, volume)) };
}

/**
 * Updates of each volume's state in progress, by store: each reads the record, patches it and
 * writes it back, so two at once (a job's end and a forwarded `appliance pause`, both in the
 * daemon's process) would each write back a copy read before the other's write, and one change
 * would be lost: a pause acknowledged and gone. They run one after the other instead.
 */
const updating = new WeakMap<MetaStore, Map<string, Mutex>>();

/**
 * Patch the volume's state: `patch`, or what `patch(current)` returns (null: leave it), applied to
 * the record as it is once every earlier update of the volume in this process is written.
 */
export async function updateVolumeState(store: MetaStore, volume: string, patch: Partial<VolumeState> | ((st: VolumeState) => Partial<VolumeState> | null)): Promise<VolumeState> {
  let locks = updating.get(store);
  if (!locks) updating.set(store, (locks = new Map()));
  let lock = locks.get(volume);
  if (!lock) locks.set(volume, (lock = new Mutex()));
  return lock.run(async () => {
    const st = await readVolumeState(store, volume);
    const p = typeof patch === 'function' ? patch(st) : patch;
    if (p === null) return st;
    const next = { ...st, ...p };
    await store.putMeta(STATE_NS, volume, next);
    return next;
  });
}

/** The peer took a push of `volume` (or its failback completed): it is no longer held for `peer`. */
export async function releaseHold(store: MetaStore, volume: string, peer: string): Promise<void> {
  await updateVolumeState(store, volume, (st) => (st.held !== null && st.held.peer === peer ? { held: null } : null));
}

export async function readRates(store: Pick<MetaStore, 'getMeta'>, volume: string): Promise<Rates> {
  return (await store.getMeta<Rates>(RATES_NS, volume)) ?? DEFAULT_RATES;
}

export async function listCheckpoints(store: MetaStore): Promise<JobCheckpoint[]> {
  return (await store.listMeta<JobCheckpoint>(STATE_NS)).filter(([k]) => k.startsWith(JOB_PREFIX)).map(([, v]) => v);
}

export function saveCheckpoint(store: MetaStore, cp: JobCheckpoint): Promise<void> {
  return store.putMeta(STATE_NS, JOB_PREFIX + cp.unit, cp);
}

export function clearCheckpoint(store: MetaStore, unit: string): Promise<void> {
  return store.deleteMeta(STATE_NS, JOB_PREFIX + unit);
}
