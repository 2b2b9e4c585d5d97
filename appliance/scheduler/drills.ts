/**
 * Scheduled drills (the cloud appliance's daemon): a recovery plan with `drill.every` (config.yaml
 * `recovery.PLAN.drill`) is drilled that often, so the DR copy is proven to come back (and its
 * `drill.check` to pass) without anyone remembering to. A drill touches neither production nor
 * replication (appliance/recovery/launch.ts), so it runs beside the scheduler's jobs.
 *
 * - Due: when the plan's newest drill (meta `drills`, by hand or scheduled, passed or not) is
 *   `every` old; a plan never drilled, once each of its volumes has an EBS export (a drill never
 *   exports). One drill at a time; the plans are looked at every {@link DRILL_RECHECK_MS}.
 * - A drill that fails (its checks, or before it launched anything: no export at the point, the
 *   EC2 API refusing) POSTs `{event: "drill_failed", ...}` to `alerts.webhook`. One that failed
 *   before it recorded a report is tried again after {@link DRILL_RETRY_MS}, not every minute.
 * - `stop()` aborts the running drill, which tears down what it launched (bounded by the
 *   caller's wait; a drill cut short is torn down at the next start, launch.ts).
 */
import { isTandemError } from '../../common/errors.js';
import { parseDuration, type Config } from '../config/index.js';
import type { Clock } from './clock.js';
import { errorInfo, type Log } from './runner.js';

/** How often the plans are looked at while no drill is due (a changed config is seen that soon). */
export const DRILL_RECHECK_MS = 60_000;
/** A scheduled drill that failed before it recorded a report is tried again after this long. */
export const DRILL_RETRY_MS = 3_600_000;

/** The drill report launch.ts keeps in meta `drills` (the parts read here). */
export interface DrillReport {
  readonly id: string;
  readonly at: string;
  readonly volumes: readonly string[];
  readonly plans?: readonly string[];
  readonly passed: boolean;
  readonly checks?: ReadonlyArray<{ readonly name: string; readonly ok: boolean; readonly detail: string }>;
  readonly error?: string | null;
}

export interface DrillAlert {
  readonly event: 'drill_failed';
  readonly appliance: string;
  readonly plan: string;
  readonly at: string;
  /** The drill's run id, when it got as far as recording one. */
  readonly run: string | null;
  readonly error: string;
  readonly checks: ReadonlyArray<{ readonly name: string; readonly ok: boolean; readonly detail: string }>;
}

export interface ScheduledDrillsStore {
  listMeta<T>(ns: string): Promise<Array<[string, T]>>;
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
}

export interface ScheduledDrillsOptions {
  readonly store: ScheduledDrillsStore;
  readonly appliance: string;
  /** The configuration in force (the daemon re-reads config.yaml). */
  readonly config: () => Config;
  readonly clock: Clock;
  readonly log: Log;
  /** Drill one plan (appliance/recovery recover, mode drill); resolves with its run, or throws. */
  readonly drill: (plan: string, signal: AbortSignal) => Promise<{ readonly id: string; readonly checks: DrillReport['checks'] }>;
  /** Deliver an alert (best effort; errors are the callee's to log). */
  readonly alert: (a: DrillAlert) => Promise<void>;
}

/** The plans with `drill.every`, and how often. */
export function scheduledPlans(config: Config): Array<{ plan: string; everyMs: number; volumes: string[] }> {
  const out = [];
  for (const [plan, raw] of Object.entries(config.recovery ?? {})) {
    if (raw.drill?.every === undefined) continue;
    out.push({ plan, everyMs: parseDuration(raw.drill.every), volumes: [raw.rootVolume.volume, ...(raw.dataVolumes ?? []).map((d) => d.volume)] });
  }
  return out;
}

/** The newest drill of `plan` (reports from before `plans` was recorded: one that covered all its volumes). */
export function newestDrillOf(reports: readonly DrillReport[], plan: string, volumes: readonly string[]): DrillReport | null {
  let newest: DrillReport | null = null;
  for (const r of reports) {
    const of = r.plans !== undefined ? r.plans.includes(plan) : volumes.every((v) => r.volumes.includes(v));
    if (of && (newest === null || r.at > newest.at)) newest = r;
  }
  return newest;
}

export class ScheduledDrills {
  private readonly o: ScheduledDrillsOptions;
  private readonly stopping = new AbortController();
  private loop: Promise<void> | null = null;
  /** Plans whose last scheduled attempt failed before it recorded a report: when it was. */
  private readonly failedEarly = new Map<string, number>();

  constructor(o: ScheduledDrillsOptions) {
    this.o = o;
  }

  start(): void {
    this.loop ??= this.run();
  }

  /** Stop looking, abort a running drill (it tears down), and wait for it. */
  async stop(): Promise<void> {
    this.stopping.abort();
    await this.loop;
  }

  /** When `plan` is due next (ms since the epoch), or null while it cannot be drilled yet. */
  async dueAt(plan: { plan: string; everyMs: number; volumes: string[] }): Promise<number | null> {
    const reports = (await this.o.store.listMeta<DrillReport>('drills')).map(([, r]) => r);
    const newest = newestDrillOf(reports, plan.plan, plan.volumes);
    const early = this.failedEarly.get(plan.plan);
    const retry = early === undefined ? -Infinity : early + Math.min(DRILL_RETRY_MS, plan.everyMs);
    if (newest !== null) return Math.max(Date.parse(newest.at) + plan.everyMs, retry);
    for (const v of plan.volumes) {
      const exports = await this.o.store.getMeta<unknown[]>('ebs-exports', v);
      if (!exports || exports.length === 0) return null;
    }
    return Math.max(this.o.clock.now(), retry);
  }

  private async run(): Promise<void> {
    const { clock, log } = this.o;
    const signal = this.stopping.signal;
    while (!signal.aborted) {
      let next = clock.now() + DRILL_RECHECK_MS;
      try {
        for (const plan of scheduledPlans(this.o.config())) {
          if (signal.aborted) break;
          const due = await this.dueAt(plan);
          if (due === null) continue;
          if (due > clock.now()) {
            next = Math.min(next, due);
            continue;
          }
          await this.drillNow(plan.plan, signal);
        }
      } catch (e) {
        log.error({ err: errorInfo(e) }, 'scheduled drills: could not look at the plans');
      }
      await clock.sleep(Math.max(0, next - clock.now()), signal);
    }
  }

  private async drillNow(plan: string, signal: AbortSignal): Promise<void> {
    const { log, clock } = this.o;
    log.info({ plan }, 'scheduled drill started');
    try {
      const run = await this.o.drill(plan, signal);
      this.failedEarly.delete(plan);
      log.info({ plan, run: run.id }, 'scheduled drill passed and was torn down');
    } catch (e) {
      if (signal.aborted) {
        log.warn({ plan, err: errorInfo(e) }, 'scheduled drill stopped: the daemon is stopping');
        return;
      }
      const details = isTandemError(e) ? (e.details as { run?: string; report?: DrillReport }) : {};
      const run = details.run ?? null;
      if (run === null) this.failedEarly.set(plan, clock.now());
      else this.failedEarly.delete(plan);
      const message = e instanceof Error ? e.message : String(e);
      log.error({ plan, run, err: errorInfo(e) }, 'scheduled drill failed');
      await this.o.alert({ event: 'drill_failed', appliance: this.o.appliance, plan, at: new Date(clock.now()).toISOString(), run, error: message, checks: details.report?.checks ?? [] });
    }
  }
}
