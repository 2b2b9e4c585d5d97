/**
 * Status: per volume, is its recovery point objective met, how long would a recovery take,
 * and when was it last proven (drill)? Read-only over the store's records; `appliance status`,
 * GET /v1/status, /metrics and the breach webhook all use {@link computeStatus}.
 *
 * Sources:
 * - last local snapshot: the store; last replicated point: meta `scheduler` (the daemon's jobs)
 *   or meta `sync-base` (`appliance sync`); on the receiving appliance, the replica itself;
 * - last EBS export: meta `ebs-exports`; last drill: meta `drills`; measured failover/drill
 *   time: meta `rto`; measured rates: meta `rates`; pushes under way or stopped midway: meta
 *   `push-attempt`.
 */
import { failedOverVolumes, type FailedOver } from './recovery/state.js';
import { extraCaDispatcher } from '../common/ca.js';
import type { SnapshotRecord, VolumeRecord } from '../store/types.js';
import { policyFor, type Config } from './config/index.js';
import type { ApplianceHealth } from './health.js';
import { pushedPointAt, readRates, readVolumeState, type VolumeState } from './scheduler/index.js';
import { believable } from './scheduler/deadline.js';
import { activePause } from './pause.js';
import { PUSH_ATTEMPT_NS, type PushAttempt } from './push-attempts.js';
import { volumeLockHolder } from './locks.js';
import { SYNC_BASE_NS, pushPoint, type SyncBase } from './sync-base.js';
import type { DrillRecord, ExportRecord, RecoveryFacts, RtoRecord } from './recovery-facts.js';
import { CONFIRMED_NS } from '../sync/protocol.js';

/** AT RISK from this fraction of the objective on: time to look before it is breached. */
export const AT_RISK_FRACTION = 0.8;
/**
 * Launching an instance from EBS snapshots and booting it, until a failover or drill measured
 * it: a typical EC2 launch plus OS boot is 2-5 minutes; 5 minutes is the cautious end.
 */
export const DEFAULT_LAUNCH_MS = 5 * 60_000;
/** EBS direct API upload rate assumed until exports are measured (PutSnapshotBlock, bounded concurrency). */
export const DEFAULT_EXPORT_BYTES_PER_SEC = 50 * 1024 * 1024;

export type ObjectiveState = 'OK' | 'AT_RISK' | 'BREACHED' | 'NONE';

export interface PointInfo {
  readonly snapshot: string | null;
  /** ISO time of the recovery point. */
  readonly at: string;
}

export interface VolumeStatus {
  readonly volume: string;
  /** A volume of this machine (a device or image it reads), not a replica another appliance pushes here. */
  readonly local: boolean;
  readonly policy: string | null;
  readonly rpoMs: number | null;
  readonly rtoMs: number | null;
  readonly lastSnapshot: { readonly id: string; readonly created: string; readonly origin: string } | null;
  readonly lastReplicated: PointInfo | null;
  /** Age of the point that counts against the RPO (the replicated one when this appliance replicates). */
  readonly rpoAgeMs: number | null;
  /** OK, AT_RISK (age > 80 % of RPO), BREACHED (age > RPO, never protected, or dated in the future), NONE (no policy). */
  readonly rpoState: ObjectiveState;
  /**
   * The time of the point that counts, when it lies in the future by more than a minute
   * (scheduler/deadline.ts CLOCK_STEP_MS): the clock was set back since it was taken, or the
   * appliance that dated it runs ahead. Its age is then unknown (rpoAgeMs null, BREACHED).
   */
  readonly pointAhead?: string;
  /** The volume names a policy (`policy`) that config.yaml does not define: nothing protects it (BREACHED). */
  readonly policyMissing?: true;
  readonly lastExport: { readonly ebsSnapshotId: string; readonly tandemSnapshot: string; readonly created: string } | null;
  readonly rtoEstimateMs: number | null;
  /** How the estimate was made, for the operator. */
  readonly rtoBasis: string;
  readonly rtoState: ObjectiveState;
  readonly lastDrill: { readonly id: string; readonly at: string; readonly passed: boolean; readonly rtoSeconds: number | null } | null;
  readonly lastJob: VolumeState['lastJob'];
  /** On the cloud appliance: the failover the volume runs in until its failback (appliance/recovery/state.ts). */
  readonly failedOver: FailedOver | null;
  /** The peer refuses pushes of the volume, so the daemon schedules no job for it (scheduler/runner.ts). */
  readonly replicationHeld: VolumeState['held'];
  /** An operator paused the volume's scheduled jobs and the pause still holds (appliance/pause.ts). */
  readonly paused: VolumeState['paused'];
  /**
   * Pushes of the volume that started and have not finished, by peer (appliance/push-attempts.ts):
   * one running now, or one that stopped midway (killed, the peer lost). The next sync to that
   * peer resumes it, sending nothing the peer stored. `running`: a live process holds the
   * volume's lock for a sync (null when the caller gave no locks directory to look in).
   */
  readonly pushesUnfinished: Array<{ readonly peer: string; readonly snapshot: string; readonly since: string; readonly running: boolean | null }>;
}

/** The store surface status reads. */
export interface StatusStore {
  listVolumes(): Promise<VolumeRecord[]>;
  latestSnapshot(volume: string): Promise<SnapshotRecord | null>;
  getSnapshot(volume: string, id: string): Promise<SnapshotRecord | null>;
  diffSnapshots(base: SnapshotRecord | null, target: SnapshotRecord): AsyncIterable<{ index: number; hash: Buffer }>;
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
  listMeta<T>(ns: string): Promise<Array<[string, T]>>;
}

export function objectiveState(valueMs: number | null, objectiveMs: number | null): ObjectiveState {
  if (objectiveMs === null) return 'NONE';
  if (valueMs === null || valueMs > objectiveMs) return 'BREACHED';
  return valueMs > AT_RISK_FRACTION * objectiveMs ? 'AT_RISK' : 'OK';
}


/** The records of a meta namespace keyed `VOLUME@PEER` (sync-base, push-attempt) that are `volume`'s, as [peer, record]. */
function ofVolume<T>(entries: ReadonlyArray<[string, T]>, volume: string): Array<[string, T]> {
  return entries.filter(([k]) => k.startsWith(`${volume}@`)).map(([k, r]) => [k.slice(volume.length + 1), r]);
}

/**
 * Status of every volume (or only `only`), at time `now`. With `locksDir` (the home's, Home.paths),
 * an unfinished push is told apart as running or stopped by the volume's lock.
 */
export async function computeStatus(store: StatusStore, config: Config, now: number, only?: string, locksDir?: string): Promise<VolumeStatus[]> {
  const volumes = (await store.listVolumes()).filter((v) => only === undefined || v.name === only);
  const drills = (await store.listMeta<DrillRecord>('drills')).map(([, d]) => d).sort((a, b) => (a.at < b.at ? 1 : -1));
  const bases = await store.listMeta<SyncBase>(SYNC_BASE_NS);
  const attempts = await store.listMeta<PushAttempt>(PUSH_ATTEMPT_NS);
  const inEc2 = await failedOverVolumes(store);
  const out: VolumeStatus[] = [];
  for (const v of volumes) {
    const policy = policyFor(config, v);
    // Given a policy (volume add --policy) that config.yaml no longer defines (renamed, removed):
    // the volume is not protected, which is not the same as never having asked to be.
    const policyMissing = policy === null && v.policy !== undefined;
    const st = await readVolumeState(store, v.name);
    const latest = await store.latestSnapshot(v.name);
    const replicates = config.replication !== null && v.path !== undefined;
    // The recovery point that counts: what the other site has (or, without replication, what this one has).
    let replicated: PointInfo | null = null;
    if (v.path === undefined) {
      // A replica: its latest, dated by the newest point its source confirmed it holds (a push
      // that found it up to date: the volume did not change), else by when it was taken.
      const confirmed = latest ? await store.getMeta<{ root: string; at: string }>(CONFIRMED_NS, v.name) : undefined;
      const at = latest && confirmed?.root === latest.root && confirmed.at > latest.created ? confirmed.at : latest?.created;
      replicated = latest ? { snapshot: latest.id, at: at! } : null;
    } else {
      // The newer of the daemon's last good push and the newest sync base of a push: a sync by
      // hand (`appliance sync`, which records only its base) after the daemon's last job counts.
      // With replication configured, only pushes to its peer count: a push to a lab or a second
      // site is no recovery point at the DR site.
      const points: PointInfo[] = [];
      const toPeer = (peer: string) => config.replication === null || peer === config.replication.peer;
      const pushes = ofVolume(bases, v.name).filter(([peer, b]) => b.direction === 'push' && toPeer(peer)).map(([, b]) => b);
      // The daemon's point is its push to the replication peer of its time: counted while that peer
      // holds a base of the volume (a peer named in config.yaml since has none).
      // Dated by its own push's time (lastGood moves on with local snapshots while replication is
      // off), and only when it went to the replication peer of now (records of earlier releases
      // do not say: then while that peer holds a base).
      const daemonAt = config.replication === null ? st.lastReplicatedAt ?? st.lastGood : pushedPointAt(st, config.replication.peer);
      const counts = st.lastReplicatedTo !== undefined || config.replication === null || pushes.length > 0;
      if (st.lastReplicated !== null && daemonAt !== null && counts) points.push({ snapshot: st.lastReplicated, at: daemonAt });
      const newest = pushes.sort((a, b) => (a.at < b.at ? 1 : -1))[0];
      const pushed = newest ? await pushPoint(store, v.name, newest) : null;
      if (pushed) points.push(pushed);
      // The newest point dated no later than now: one dated ahead (the clock was set back since
      // it was taken) does not hide a later push dated right (the daemon's own time of it).
      const sorted = points.sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
      replicated = sorted.find((p) => believable(Date.parse(p.at), now) !== null) ?? sorted[0] ?? null;
    }
    const point = replicates || v.path === undefined ? replicated?.at ?? null : st.lastGood ?? latest?.created ?? null;
    // A point dated past now (the clock was set back since): its age is unknown, counted as breached.
    const pointAhead = point !== null && believable(Date.parse(point), now) === null;
    const rpoAgeMs = point === null || pointAhead ? null : Math.max(0, now - Date.parse(point));
    // A replicated volume recovers at the DR site: its exports, drills and measured rates are the
    // replication peer's, as its last lock answer to a push said (appliance/recovery-facts.ts).
    const dr = replicates ? drFacts(bases, v.name, config.replication!.peer) : null;
    const exports = (await store.getMeta<ExportRecord[]>('ebs-exports', v.name)) ?? [];
    const lastExport = dr ? dr.facts.lastExport : exports.length > 0 ? exports[exports.length - 1]! : null;
    // The point a failover would take there: the replicated snapshot (when this store has it).
    const recovered = dr && replicated?.snapshot ? (await store.getSnapshot(v.name, replicated.snapshot)) ?? latest : latest;
    // Nothing at the DR site yet: nothing to fail over, whatever this appliance holds.
    const rto = replicates && replicated === null ? { ms: null, basis: 'no recovery point at the DR site yet: nothing to fail over' } : await estimateRto(store, v, recovered, lastExport, dr);
    const drill = drills.find((d) => Array.isArray(d.volumes) && d.volumes.includes(v.name)) ?? dr?.facts.lastDrill;
    out.push({
      volume: v.name,
      local: v.path !== undefined,
      policy: policy?.name ?? v.policy ?? null,
      rpoMs: policy?.rpoMs ?? null,
      rtoMs: policy?.rtoMs ?? null,
      lastSnapshot: latest ? { id: latest.id, created: latest.created, origin: latest.origin } : null,
      lastReplicated: replicated,
      rpoAgeMs,
      rpoState: policyMissing ? 'BREACHED' : policy === null ? 'NONE' : objectiveState(rpoAgeMs, policy.rpoMs),
      ...(pointAhead ? { pointAhead: point } : {}),
      ...(policyMissing ? { policyMissing: true } : {}),
      lastExport: lastExport ? { ebsSnapshotId: lastExport.ebsSnapshotId, tandemSnapshot: lastExport.tandemSnapshot, created: lastExport.created } : null,
      rtoEstimateMs: rto.ms,
      rtoBasis: rto.basis,
      rtoState: policy === null ? 'NONE' : objectiveState(rto.ms, policy.rtoMs),
      lastDrill: drill ? { id: drill.id, at: drill.at, passed: drill.passed === true, rtoSeconds: drill.rtoSeconds ?? null } : null,
      lastJob: st.lastJob,
      failedOver: inEc2.get(v.name) ?? null,
      replicationHeld: replicates ? st.held : null,
      paused: activePause(st.paused, now),
      pushesUnfinished: ofVolume(attempts, v.name).map(([peer, a]) => ({
        peer,
        snapshot: a.snapshot,
        since: a.at,
        running: locksDir === undefined ? null : volumeLockHolder(locksDir, v.name)?.op === 'sync',
      })),
    });
  }
  return out;
}

/**
 * RTO estimate: a failover launches instances from the volume's EBS snapshot (EBS volumes are
 * usable while they load lazily), so it is the launch time (measured by the last failover or
 * drill, else {@link DEFAULT_LAUNCH_MS}) plus, when the newest recovery point is not yet
 * exported, the time to export what changed since (measured export rate, else the default).
 */
async function estimateRto(store: StatusStore, v: VolumeRecord, latest: SnapshotRecord | null, lastExport: ExportRecord | null, dr: DrFacts | null = null): Promise<{ ms: number | null; basis: string }> {
  if (latest === null && lastExport === null) return { ms: null, basis: 'no recovery point yet' };
  const local = await store.getMeta<RtoRecord>('rto', v.name);
  const measured = dr ? (dr.facts.launchSeconds !== null ? { rtoSeconds: dr.facts.launchSeconds, at: dr.facts.launchMeasuredAt! } : null) : local?.rtoSeconds != null ? { rtoSeconds: local.rtoSeconds, at: local.at } : null;
  const launchMs = measured ? measured.rtoSeconds * 1000 : DEFAULT_LAUNCH_MS;
  const launchBasis = (measured ? `launch ${measured.rtoSeconds}s measured ${measured.at}` : `launch ${DEFAULT_LAUNCH_MS / 1000}s (default until a drill measures it)`) + (dr ? ` (as ${dr.peer} reported at ${dr.at})` : '');
  const exported = lastExport === null ? null : await store.getSnapshot(v.name, lastExport.tandemSnapshot);
  // Exported already: that snapshot, or one of the same tree (on-prem, the snapshot a push took of
  // an unchanged volume: the DR site holds and exported its tree under the earlier id).
  const pending = latest !== null && (lastExport === null || (lastExport.tandemSnapshot !== latest.id && exported?.root !== latest.root));
  if (!pending) return { ms: launchMs, basis: `${launchBasis}; newest point already exported` };
  const rates = await readRates(store, v.name);
  const measuredRate = dr ? dr.facts.exportBytesPerSec : rates.exportBytesPerSec ?? null;
  const exportRate = measuredRate ?? DEFAULT_EXPORT_BYTES_PER_SEC;
  // First export uploads every non-zero block; later ones what changed since the last export
  // (the tree diff of the two snapshots: what the next export uploads; where the exported one is
  // gone, every non-zero block).
  let bytes = latest!.nonZeroBlocks * latest!.blockSize;
  if (exported !== null && exported.blockSize === latest!.blockSize) bytes = (await changedSince(store, exported, latest!)) * latest!.blockSize;
  const exportMs = Math.ceil((bytes / exportRate) * 1000);
  return { ms: launchMs + exportMs, basis: `${launchBasis} + export of ${bytes} bytes at ${Math.round(exportRate / 1048576)} MiB/s${measuredRate !== null ? ' (measured)' : ' (default)'}` };
}

/** The replication peer's {@link RecoveryFacts} of a volume, from the newest push's sync base that carries them. */
interface DrFacts { readonly peer: string; readonly at: string; readonly facts: RecoveryFacts }

function drFacts(bases: ReadonlyArray<[string, SyncBase]>, volume: string, peer: string): DrFacts | null {
  const base = ofVolume(bases, volume).find(([p, b]) => p === peer && b.direction === 'push' && b.recovery !== undefined)?.[1];
  return base?.recovery ? { peer, at: base.at, facts: base.recovery } : null;
}

/**
 * Blocks of `latest` that differ from `exported`, by volume for the last pair asked: snapshots
 * never change, and status runs every daemon round and every /metrics scrape, so the tree diff is
 * walked once per new snapshot or export, not each time.
 */
const changedCounts = new Map<string, { exported: string; latest: string; changed: number }>();
async function changedSince(store: StatusStore, exported: SnapshotRecord, latest: SnapshotRecord): Promise<number> {
  const known = changedCounts.get(latest.volume);
  if (known?.exported === exported.id && known.latest === latest.id) return known.changed;
  let changed = 0;
  for await (const _ of store.diffSnapshots(exported, latest)) changed++;
  changedCounts.set(latest.volume, { exported: exported.id, latest: latest.id, changed });
  return changed;
}

export interface BreachAlert {
  readonly event: 'rpo_breached' | 'rto_breached' | 'replication_held' | 'replication_paused';
  readonly appliance: string;
  readonly volume: string;
  readonly policy: string | null;
  readonly at: string;
  readonly status: VolumeStatus;
}

/** An alert about the appliance itself (appliance/health.ts). */
export interface HealthAlert {
  readonly event: 'disk_low' | 'certificate_expiring';
  readonly appliance: string;
  readonly at: string;
  readonly health: ApplianceHealth;
}

/**
 * Tracks states between rounds and POSTs the webhook when a volume's RPO or RTO state
 * becomes BREACHED, when the peer starts refusing its pushes (`replication_held`: the alert's
 * status says why and what to do), and when an operator pauses its scheduled jobs
 * (`replication_paused`: who, until when, why), once per transition (per pause), not on every
 * round. Delivery
 * is best effort with a timeout; failures are returned for the log, never thrown.
 */
export class BreachNotifier {
  private readonly last = new Map<string, string>();

  constructor(private readonly appliance: string, private readonly timeoutMs = 10_000) {}

  /** The appliance's own health: POST each new `disk_low` or `certificate_expiring`, like {@link check}. */
  async checkHealth(health: ApplianceHealth, webhook: string | null, now: number): Promise<{ sent: HealthAlert[]; errors: string[] }> {
    const fresh: HealthAlert[] = [];
    for (const [event, on] of [['disk_low', health.diskLow], ['certificate_expiring', health.certificateExpiring]] as const) {
      const before = this.last.get(event);
      this.last.set(event, on ? 'ON' : 'OFF');
      if (on && before !== 'ON') fresh.push({ event, appliance: this.appliance, at: new Date(now).toISOString(), health });
    }
    return this.post(fresh, webhook, (a) => a.event);
  }

  /** Compare with the previous round; POST each new breach. Returns the alerts sent and errors. */
  async check(statuses: readonly VolumeStatus[], webhook: string | null, now: number): Promise<{ sent: BreachAlert[]; errors: string[] }> {
    const fresh: BreachAlert[] = [];
    for (const s of statuses) {
      const held = s.replicationHeld ? 'HELD' : 'NONE';
      for (const [event, state, alertOn] of [['rpo_breached', s.rpoState, 'BREACHED'], ['rto_breached', s.rtoState, 'BREACHED'], ['replication_held', held, 'HELD']] as const) {
        const key = `${event}:${s.volume}`;
        const before = this.last.get(key);
        this.last.set(key, state);
        if (state === alertOn && before !== alertOn) {
          fresh.push({ event, appliance: this.appliance, volume: s.volume, policy: s.policy, at: new Date(now).toISOString(), status: s });
        }
      }
      // Each pause once (a new pause of a paused volume is told too: its end or reason changed).
      const pausedKey = `replication_paused:${s.volume}`;
      const pause = s.paused ? `${s.paused.at} ${s.paused.until}` : 'NONE';
      if (pause !== 'NONE' && this.last.get(pausedKey) !== pause) {
        fresh.push({ event: 'replication_paused', appliance: this.appliance, volume: s.volume, policy: s.policy, at: new Date(now).toISOString(), status: s });
      }
      this.last.set(pausedKey, pause);
    }
    return this.post(fresh, webhook, (a) => `${a.event} of ${a.volume}`);
  }

  private async post<A>(fresh: A[], webhook: string | null, label: (a: A) => string): Promise<{ sent: A[]; errors: string[] }> {
    const errors: string[] = [];
    if (webhook === null || fresh.length === 0) return { sent: [], errors };
    const sent: A[] = [];
    for (const alert of fresh) {
      const error = await postWebhook(webhook, alert, this.timeoutMs);
      if (error) errors.push(`${error} (${label(alert)})`);
      else sent.push(alert);
    }
    return { sent, errors };
  }
}

/** POST `body` as JSON to the alert webhook: null when delivered, else what went wrong (for the log). */
export async function postWebhook(webhook: string, body: unknown, timeoutMs = 10_000): Promise<string | null> {
  // Loaded only to send: undici takes 120-170 ms to load, and `appliance status` needs none of it.
  const { fetch } = await import('undici');
  const dispatcher = await extraCaDispatcher();
  try {
    const res = await fetch(webhook, { dispatcher, method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal: AbortSignal.timeout(timeoutMs) });
    await res.body?.cancel();
    return res.ok ? null : `webhook ${webhook} answered ${res.status}`;
  } catch (e) {
    return `webhook ${webhook} failed: ${(e as Error).message}`;
  }
}
