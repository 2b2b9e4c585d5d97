/**
 * Prometheus metrics of the daemon (GET /metrics, behind the API token like every route but the
 * health check: configure the scrape job with `authorization: { credentials: <token> }`).
 *
 * The per-volume gauges carry the same numbers as `appliance status`, computed at scrape time;
 * job counters are incremented by the scheduler. Names use the `tandem_` prefix and base units
 * (seconds, bytes).
 *
 * prom-client (with @opentelemetry/api, 83 modules: a sixth of what a daemon loads) is loaded at
 * the first scrape, not when the daemon starts; jobs that end before it are counted meanwhile
 * and carried into its counter.
 */
import type { Counter, Registry } from 'prom-client';
import type { ObjectiveState, VolumeStatus } from './status.js';
import { unhealed, type VerifySummary } from './scheduler/verify.js';
import type { ApplianceHealth } from './health.js';

const STATES: readonly ObjectiveState[] = ['OK', 'AT_RISK', 'BREACHED', 'NONE'];

export interface DaemonMetrics {
  /** Count a finished job (`held`: it only found the peer still refusing the unit's pushes). */
  jobEnded(unit: string, result: 'ok' | 'failed' | 'held' | 'paused'): void;
  /** The body and content type for GET /metrics. */
  render(): Promise<{ body: string; contentType: string }>;
}

const seconds = (ms: number | null) => (ms === null ? NaN : ms / 1000);
const epoch = (iso: string | null | undefined) => (iso ? Date.parse(iso) / 1000 : NaN);

/** Metrics whose gauges are filled from `statuses()` at each scrape. */
export function createMetrics(statuses: () => Promise<readonly VolumeStatus[]>, running: () => readonly string[], verify?: () => Promise<VerifySummary>, health?: () => Promise<ApplianceHealth>): DaemonMetrics {
  let made: ReturnType<typeof registryOf> | undefined;
  /** Jobs ended before the first scrape, by unit and result (JSON of the labels). */
  const ended = new Map<string, number>();
  return {
    jobEnded: (unit, result) => {
      if (made) return made.jobs.inc({ unit, result });
      const key = JSON.stringify([unit, result]);
      ended.set(key, (ended.get(key) ?? 0) + 1);
    },
    render: async () => {
      if (!made) {
        made = registryOf(statuses, running, verify, health);
        for (const [key, n] of ended) {
          const [unit, result] = JSON.parse(key) as [string, string];
          made.jobs.inc({ unit, result }, n);
        }
        ended.clear();
      }
      await made.fill();
      return { body: await made.registry.metrics(), contentType: made.registry.contentType };
    },
  };
}

function registryOf(statuses: () => Promise<readonly VolumeStatus[]>, running: () => readonly string[], verify?: () => Promise<VerifySummary>, health?: () => Promise<ApplianceHealth>): { registry: Registry; jobs: Counter; fill(): Promise<void> } {
  const { Counter, Gauge, Registry } = require('prom-client') as typeof import('prom-client');
  const registry = new Registry();
  const labelNames = ['volume', 'policy'] as const;
  const g = (name: string, help: string, extra: readonly string[] = []) =>
    new Gauge({ name, help, labelNames: [...labelNames, ...extra], registers: [registry] });
  const rpoAge = g('tandem_rpo_age_seconds', 'Age of the recovery point that counts against the RPO (NaN: none yet)');
  const rpo = g('tandem_rpo_objective_seconds', 'RPO of the volume policy');
  const rpoState = g('tandem_rpo_state', '1 for the current RPO state of the volume (OK, AT_RISK, BREACHED, NONE)', ['state']);
  const rtoEst = g('tandem_rto_estimate_seconds', 'Estimated recovery time (launch + pending export)');
  const rto = g('tandem_rto_objective_seconds', 'RTO of the volume policy (NaN: none)');
  const rtoState = g('tandem_rto_state', '1 for the current RTO state of the volume', ['state']);
  const lastSnap = g('tandem_last_snapshot_timestamp_seconds', 'Creation time of the newest local snapshot');
  const lastRepl = g('tandem_last_replicated_timestamp_seconds', 'Time of the last replicated recovery point');
  const lastExport = g('tandem_last_ebs_export_timestamp_seconds', 'Completion time of the last EBS export');
  const drillPassed = g('tandem_last_drill_passed', '1 when the last drill involving the volume passed, 0 when it failed');
  const paused = g('tandem_replication_paused', '1 while an operator paused the volume\'s scheduled jobs (`appliance pause`)');
  const held = g('tandem_replication_held', '1 while the peer refuses pushes of the volume (failed over there, or another source): no job is scheduled for it');
  const unfinished = g('tandem_push_unfinished_since_timestamp_seconds', 'Start of a push of the volume to the peer that has not finished; state: running (a live process holds the volume for it), stopped (midway: the next sync resumes it) or unknown; absent when none', ['peer', 'state']);
  const jobRunning = new Gauge({ name: 'tandem_jobs_running', help: 'Scheduler jobs running now', registers: [registry], collect() { this.set(running().length); } });
  const jobs = new Counter({ name: 'tandem_jobs_total', help: 'Scheduler jobs finished, by result', labelNames: ['unit', 'result'], registers: [registry] });
  void jobRunning;
  const plain = (name: string, help: string) => new Gauge({ name, help, registers: [registry] });
  const verifyLast = plain('tandem_verify_last_timestamp_seconds', 'End of the last finished scheduled verify of the store (NaN: none yet)');
  const verifyProblems = plain('tandem_verify_problems', 'Problems the last finished scheduled verify found');
  const verifyUnhealed = plain('tandem_verify_unhealed', 'Damage the last finished scheduled verify left after healing from its repair peer (0: the store is intact)');
  const verifyFailed = plain('tandem_verify_failed', '1 when the last scheduled verify attempt failed to finish (an I/O error), else 0');
  const verifyRunning = plain('tandem_verify_running', '1 while a scheduled verify runs');
  const storeFree = plain('tandem_store_free_bytes', "Free space on the store's disk (for this user)");
  const storeDisk = plain('tandem_store_disk_bytes', "Size of the store's disk");
  const certEnd = plain('tandem_certificate_expiry_timestamp_seconds', "End of the TLS certificate's validity (NaN: unreadable)");

  const fillHealth = async () => {
    if (!health) return;
    const h = await health();
    storeFree.set(h.storeFreeBytes);
    storeDisk.set(h.storeDiskBytes);
    certEnd.set(epoch(h.certificateNotAfter));
  };

  const fillVerify = async () => {
    if (!verify) return;
    const v = await verify();
    verifyLast.set(epoch(v.last?.ended));
    verifyProblems.set(v.last ? v.last.problems : NaN);
    verifyUnhealed.set(v.last ? unhealed(v.last) : NaN);
    verifyFailed.set(v.failed ? 1 : 0);
    verifyRunning.set(v.running ? 1 : 0);
  };

  const fill = async () => {
    await fillVerify();
    await fillHealth();
    for (const m of [rpoAge, rpo, rpoState, rtoEst, rto, rtoState, lastSnap, lastRepl, lastExport, drillPassed, held, paused, unfinished]) m.reset();
    for (const s of await statuses()) {
      const l = { volume: s.volume, policy: s.policy ?? '' };
      rpoAge.set(l, seconds(s.rpoAgeMs));
      rpo.set(l, seconds(s.rpoMs));
      rtoEst.set(l, seconds(s.rtoEstimateMs));
      rto.set(l, seconds(s.rtoMs));
      for (const st of STATES) {
        rpoState.set({ ...l, state: st }, s.rpoState === st ? 1 : 0);
        rtoState.set({ ...l, state: st }, s.rtoState === st ? 1 : 0);
      }
      lastSnap.set(l, epoch(s.lastSnapshot?.created));
      lastRepl.set(l, epoch(s.lastReplicated?.at));
      lastExport.set(l, epoch(s.lastExport?.created));
      if (s.lastDrill) drillPassed.set(l, s.lastDrill.passed ? 1 : 0);
      held.set(l, s.replicationHeld ? 1 : 0);
      paused.set(l, s.paused ? 1 : 0);
      for (const u of s.pushesUnfinished) unfinished.set({ ...l, peer: u.peer, state: u.running === null ? 'unknown' : u.running ? 'running' : 'stopped' }, epoch(u.since));
    }
  };

  return { registry, jobs, fill };
}
