/**
 * The daemon's scheduled verify: every `verify.every` (config; default a week) it re-reads and
 * re-hashes every snapshot of the store, at most `verify.bwlimit` a second (default 100 MiB), so
 * silent corruption of the DR copy is found while a peer still holds a good one, not at failover.
 *
 * It runs beside the scheduler's jobs (store verify needs no lock they take: see
 * store/verify.ts), outside their `maxParallel`, and is aborted by `stop()`; a run cut short
 * (or failed) resumes after the last snapshot it finished, from a checkpoint written at most
 * every {@link CHECKPOINT_MS} and when it is stopped. State in the store's meta namespace
 * `verify`, key `state` ({@link VerifyState}): the first time the daemon ran (the first verify
 * is due one period later), the last run's outcome and the checkpoint of the one in progress. A run that found problems, or failed,
 * POSTs `{event: "verify_failed", ...}` to `alerts.webhook`; a failed run is retried after
 * {@link VERIFY_RETRY_MS}.
 */
import type { VerifyOptions } from '../../store/verify.js';
import type { VerifyProblem, VerifyProgress, VerifyReport } from '../../store/types.js';
import { isTandemError } from '../../common/errors.js';
import { formatDuration, type Config } from '../config/index.js';
import type { Clock } from './clock.js';
import { recordDamage, VERIFY_NS } from '../damage.js';
import type { Log } from './runner.js';

export const VERIFY_KEY = 'state';
/** Problems kept in the state and sent in the alert (the operator runs `appliance verify` for all). */
export const MAX_PROBLEMS_KEPT = 20;
/** A run that failed (an I/O error, not a problem found) is tried again after this long. */
export const VERIFY_RETRY_MS = 3_600_000;
/** How often the config is looked at again while no run is due (a shorter `every`, `off`). */
const RECHECK_MS = 60_000;

export interface VerifyRun {
  readonly started: string;
  readonly ended: string;
  /** True when every selected snapshot verified; false when problems were found or the run failed. */
  readonly ok: boolean;
  readonly snapshots: number;
  readonly blocks: number;
  readonly bytes: number;
  readonly seconds: number;
  /** Number of problems found, and the first {@link MAX_PROBLEMS_KEPT} of them. */
  readonly problems: number;
  readonly firstProblems: readonly VerifyProblem[];
  /** Why the run failed, when it did not finish. */
  readonly error?: { readonly code: string; readonly message: string };
  /** What the repair peer's copies healed of the problems found (absent: no repair tried). */
  readonly repair?: VerifyRepair;
}

export interface VerifyRepair {
  readonly peer: string;
  readonly blocksRepaired: number;
  readonly nodesRepaired: number;
  /** Problems (distinct damaged blocks and nodes) the peer could not heal. */
  readonly unrepaired: number;
  /** Why the repair stopped, when it did (the peer unreachable, say): nothing more was healed. */
  readonly error?: { readonly code: string; readonly message: string };
}

export interface VerifyState {
  /** When the daemon first ran on this store (ISO): the first verify is due one period later. */
  readonly since: string;
  /** The last run that finished (it may have found problems): the next is due one period after its end. */
  readonly last: VerifyRun | null;
  /** The last run that failed (an I/O error, say) since then, retried after {@link VERIFY_RETRY_MS}. */
  readonly failed?: VerifyRun | null;
  /** How far the run in progress got, so a run the daemon's stop cut short resumes there. */
  readonly progress?: VerifyCheckpoint | null;
}

/** A run in progress: the snapshots up to `after` (index order) are verified, with these findings. */
export interface VerifyCheckpoint {
  readonly started: string;
  readonly after: { readonly volume: string; readonly id: string };
  readonly snapshots: number;
  readonly nodes: number;
  readonly blocks: number;
  readonly bytes: number;
  /** Seconds spent before this process took the run over. */
  readonly seconds: number;
  /** The problems found so far (at most {@link MAX_CHECKPOINT_PROBLEMS}), and how many. */
  readonly problems: readonly VerifyProblem[];
  readonly problemCount: number;
}

/** Problems a checkpoint keeps (a store with more damage than this needs a resync anyway). */
const MAX_CHECKPOINT_PROBLEMS = 1000;
/** A checkpoint is written at most this often while a run goes on (and once when it is stopped). */
const CHECKPOINT_MS = 60_000;

export interface VerifyAlert {
  readonly event: 'verify_failed';
  readonly appliance: string;
  readonly at: string;
  readonly run: VerifyRun;
}

export interface ScheduledVerifyStore {
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
  putMeta(ns: string, key: string, value: unknown): Promise<void>;
  verify(filter: undefined, opts: VerifyOptions): Promise<VerifyReport>;
}

export interface ScheduledVerifyOptions {
  readonly store: ScheduledVerifyStore;
  /** The configuration in force (the daemon re-reads config.yaml). */
  readonly config: () => Config;
  readonly clock: Clock;
  readonly log: Log;
  /** Deliver an alert (best effort; errors are the callee's to log). */
  readonly alert: (a: VerifyAlert) => Promise<void>;
  /** Heal what a run found with the copies of peer `peer` (appliance/repair.ts healProblems). */
  readonly heal: (peer: string, problems: readonly VerifyProblem[]) => Promise<Omit<VerifyRepair, 'peer' | 'error'>>;
}

export async function readVerifyState(store: Pick<ScheduledVerifyStore, 'getMeta'>): Promise<VerifyState | null> {
  return (await store.getMeta<VerifyState>(VERIFY_NS, VERIFY_KEY)) ?? null;
}

/** When the next run is due (ms since the epoch), or null when scheduled verify is off. */
export function verifyDueAt(state: VerifyState, config: Config): number | null {
  if (config.verify.everyMs === null) return null;
  return Date.parse(state.last?.ended ?? state.since) + config.verify.everyMs;
}

/** What status reports of the scheduled verify (appliance status, GET /v1/status). */
export interface VerifySummary {
  /** Null when `verify.every` is `off`. */
  readonly every: string | null;
  readonly last: VerifyRun | null;
  readonly failed: VerifyRun | null;
  /** When the next run is due (ISO; null: off, or the daemon never ran on this store). */
  readonly nextDue: string | null;
  /** The running verify's progress (the daemon only). */
  readonly running: VerifyProgress | null;
}

/** Damage a finished run left: 0 when its repair healed everything, else the distinct damaged hashes left (the problems, without a repair). */
export function unhealed(run: VerifyRun): number {
  if (run.problems === 0) return 0;
  if (!run.repair) return run.problems;
  return run.repair.unrepaired;
}

/** One line for `appliance status`, e.g. `store verified 2d ago: ok (...); next in 5d`. */
export function verifyLine(v: VerifySummary, now: number, formatAge: (iso: string | undefined, now: number) => string, formatBytes: (n: number) => string): string {
  const l = v.last;
  const p = l?.firstProblems[0];
  const schedule = v.every === null
    ? 'scheduled verify is off (config verify.every)'
    : v.nextDue === null
      ? `the daemon verifies it every ${v.every} once started`
      : Date.parse(v.nextDue) > now ? `next in ${formatDuration(Date.parse(v.nextDue) - now)}` : 'next due now';
  const parts = [
    !l ? 'store verify: none yet'
      : l.ok ? `store verified ${formatAge(l.ended, now)}: ok (${l.snapshots} snapshots, ${l.blocks} blocks, ${formatBytes(l.bytes)} in ${formatDuration(l.seconds * 1000)})`
        : `store verify ${formatAge(l.ended, now)}: ${l.problems} PROBLEMS${p ? `, e.g. ${p.code} ${p.kind} of ${p.volume}@${p.snapshot} block ${p.blockIndex}` : ''}; ${
          unhealed(l) === 0 ? `all healed with copies from ${l.repair!.peer}`
            : `${l.repair ? `${l.repair.peer} could not heal ${unhealed(l)}${l.repair.error ? ` (${l.repair.error.code})` : ''}; ` : ''}heal them with \`appliance repair --peer NAME\` here, or \`appliance repair --peer THIS --push\` on the appliance that replicates here (its daemon pushes them after each scheduled sync)`}`,
    v.running ? `running now: ${v.running.blocksDone}/${v.running.blocksTotal} blocks` : schedule,
  ];
  if (v.failed) parts.push(`the last attempt FAILED ${formatAge(v.failed.ended, now)} (${v.failed.error?.code}: ${v.failed.error?.message}), retried hourly`);
  return parts.join('; ');
}

export async function verifySummary(store: Pick<ScheduledVerifyStore, 'getMeta'>, config: Config, running: VerifyProgress | null = null): Promise<VerifySummary> {
  const state = await readVerifyState(store);
  const due = state ? verifyDueAt(state, config) : null;
  return {
    every: config.verify.everyMs === null ? null : formatDuration(config.verify.everyMs),
    last: state?.last ?? null,
    failed: state?.failed ?? null,
    nextDue: due === null ? null : new Date(due).toISOString(),
    running,
  };
}

export class ScheduledVerify {
  private readonly abort = new AbortController();
  private loopDone: Promise<void> | null = null;
  private current: VerifyProgress | null = null;
  private retryAt = -Infinity;

  constructor(private readonly o: ScheduledVerifyOptions) {}

  start(): void {
    this.loopDone ??= this.loop();
  }

  /** The running verify's progress, or null when none runs. */
  get running(): VerifyProgress | null {
    return this.current;
  }

  /** Stop: abort a running verify (the next start resumes it) and wait for the loop to end. */
  async stop(): Promise<void> {
    this.abort.abort(new Error('the daemon is stopping'));
    await this.loopDone;
  }

  private async loop(): Promise<void> {
    const { store, clock, log } = this.o;
    while (!this.abort.signal.aborted) {
      let sleepMs = RECHECK_MS;
      try {
        let state = await readVerifyState(store);
        if (!state) {
          state = { since: new Date(clock.now()).toISOString(), last: null };
          await store.putMeta(VERIFY_NS, VERIFY_KEY, state);
        }
        const due = verifyDueAt(state, this.o.config());
        const at = due === null ? null : Math.max(due, this.retryAt);
        if (at !== null && at <= clock.now()) {
          await this.runOnce(state);
          continue; // the next one is due a period after this one's end
        }
        if (at !== null) sleepMs = Math.min(RECHECK_MS, at - clock.now());
      } catch (e) {
        if (this.abort.signal.aborted) break;
        log.error({ err: { code: (e as { code?: string }).code ?? 'ERR_INTERNAL', message: (e as Error).message } }, 'scheduled verify: could not read or record its state');
      }
      await clock.sleep(sleepMs, this.abort.signal);
    }
  }

  /** Heal with the repair peer's copies; a failure is recorded, not thrown (the run's findings stand). */
  private async heal(peer: string, problems: readonly VerifyProblem[]): Promise<VerifyRepair> {
    try {
      return { peer, ...(await this.o.heal(peer, problems)) };
    } catch (e) {
      const error = isTandemError(e) ? { code: e.code, message: e.message } : { code: 'ERR_INTERNAL', message: (e as Error)?.message ?? String(e) };
      const distinct = new Set(problems.map((p) => p.hash)).size;
      return { peer, blocksRepaired: 0, nodesRepaired: 0, unrepaired: distinct, error };
    }
  }

  private async runOnce(state: VerifyState): Promise<void> {
    const { store, clock, log } = this.o;
    const config = this.o.config();
    const cp = state.progress ?? null;
    const t0 = clock.now();
    const started = cp ? Date.parse(cp.started) : t0;
    if (cp) log.info({ after: `${cp.after.volume}@${cp.after.id}`, snapshotsDone: cp.snapshots }, 'scheduled verify resumed where the daemon stopped it');
    else log.info({ bytesPerSecond: config.verify.bytesPerSecond }, 'scheduled verify started');
    this.current = { blocksDone: 0, blocksTotal: 0, bytesRead: 0, problems: 0 };
    /** What this run and the one it resumes found, up to the last snapshot walked. */
    const merged = (r: VerifyReport, after: VerifyCheckpoint['after']): VerifyCheckpoint => ({
      started: new Date(started).toISOString(), after,
      snapshots: (cp?.snapshots ?? 0) + r.snapshots, nodes: (cp?.nodes ?? 0) + r.nodes, blocks: (cp?.blocks ?? 0) + r.blocks, bytes: (cp?.bytes ?? 0) + r.bytes,
      seconds: (cp?.seconds ?? 0) + (clock.now() - t0) / 1000,
      problems: [...(cp?.problems ?? []), ...r.problems].slice(0, MAX_CHECKPOINT_PROBLEMS), problemCount: (cp?.problemCount ?? 0) + r.problems.length,
    });
    let latest: VerifyCheckpoint | null = cp;
    let saved = clock.now();
    const checkpoint = async (c: VerifyCheckpoint) => store.putMeta(VERIFY_NS, VERIFY_KEY, { ...state, progress: c } satisfies VerifyState);
    let run: VerifyRun;
    try {
      const r = await store.verify(undefined, {
        signal: this.abort.signal,
        bytesPerSecond: config.verify.bytesPerSecond,
        onProgress: (p) => (this.current = p),
        ...(cp ? { after: cp.after } : {}),
        onSnapshot: async (snap, soFar) => {
          latest = merged(soFar, { volume: snap.volume, id: snap.id });
          if (clock.now() - saved < CHECKPOINT_MS) return;
          saved = clock.now();
          await checkpoint(latest);
        },
      });
      const ended = clock.now();
      const all = merged(r, latest?.after ?? { volume: '', id: '' });
      const problems = [...(cp?.problems ?? []), ...r.problems];
      await recordDamage(store, { snapshots: all.snapshots, nodes: all.nodes, blocks: all.blocks, bytes: all.bytes, problems }, true);
      const repair = problems.length > 0 && config.verify.repairPeer !== null ? await this.heal(config.verify.repairPeer, problems) : undefined;
      run = {
        started: new Date(started).toISOString(), ended: new Date(ended).toISOString(), ok: all.problemCount === 0,
        snapshots: all.snapshots, blocks: all.blocks, bytes: all.bytes, seconds: all.seconds,
        problems: all.problemCount, firstProblems: problems.slice(0, MAX_PROBLEMS_KEPT),
        ...(repair ? { repair } : {}),
      };
      this.retryAt = -Infinity;
    } catch (e) {
      if (this.abort.signal.aborted) {
        // Where it got to is kept: the next start resumes after the last snapshot walked.
        if (latest) await checkpoint(latest).catch(() => undefined);
        log.warn({ snapshotsDone: latest?.snapshots ?? 0 }, 'scheduled verify stopped with the daemon; the next start resumes it');
        return;
      }
      const error = isTandemError(e) ? { code: e.code, message: e.message } : { code: 'ERR_INTERNAL', message: (e as Error)?.message ?? String(e) };
      const p = this.current;
      run = {
        started: new Date(started).toISOString(), ended: new Date(clock.now()).toISOString(), ok: false,
        snapshots: 0, blocks: p?.blocksDone ?? 0, bytes: p?.bytesRead ?? 0, seconds: (clock.now() - t0) / 1000,
        problems: 0, firstProblems: [], error,
      };
      this.retryAt = clock.now() + VERIFY_RETRY_MS;
    } finally {
      this.current = null;
    }
    // A finished run, found problems or not, starts the next period; a failed one is retried.
    const next: VerifyState = run.error ? { ...state, failed: run, progress: latest } : { since: state.since, last: run, failed: null, progress: null };
    await store.putMeta(VERIFY_NS, VERIFY_KEY, next);
    if (run.ok) {
      log.info({ snapshots: run.snapshots, blocks: run.blocks, bytes: run.bytes, seconds: run.seconds, resumedAfter: cp ? `${cp.after.volume}@${cp.after.id}` : null, bytesThisProcess: run.bytes - (cp?.bytes ?? 0) }, 'scheduled verify passed');
      return;
    }
    const healed = run.repair && !run.repair.error && run.repair.unrepaired === 0;
    log.error({ problems: run.problems, firstProblems: run.firstProblems.slice(0, 3), err: run.error, repair: run.repair }, run.error
      ? `scheduled verify failed (${run.error.code}); retried in ${VERIFY_RETRY_MS / 60_000} min`
      : healed ? `scheduled verify found ${run.problems} problems; all healed with copies from ${run.repair!.peer} (the disk under the store may be failing)`
        : `scheduled verify found ${run.problems} problems${run.repair ? `; ${run.repair.peer} could not heal them all` : ''}: \`appliance repair --peer NAME\` heals them from a peer that holds good copies`);
    await this.o.alert({ event: 'verify_failed', appliance: config.appliance.name, at: run.ended, run });
  }
}
