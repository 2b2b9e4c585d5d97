/**
 * `appliance daemon`: the API server (peer protocol, management routes, forwarded CLI
 * commands) plus the scheduler, the breach webhook and Prometheus metrics, in one process that
 * holds the store; the scheduled verify of the whole store (./verify.ts) and the scheduled drills
 * of the recovery plans that ask for them (./drills.ts).
 *
 * Adds to the API (behind the bearer token): GET /metrics (Prometheus text) and
 * GET /v1/status[?volume=NAME] (the same document as `appliance status --json`).
 * Logs are pino JSON lines on stderr. `stop()` (the command calls it on SIGTERM/SIGINT): stop
 * scheduling, give the running job config.yaml's `shutdown.grace` (30 s by default) to finish, else abort it (its
 * checkpoint makes the next start resume it), close the server, flush and close the store,
 * remove run/server.json.
 *
 * {@link runDaemon} returns once listening, and the process lives on its handles: the CLI entry
 * module is still evaluating until a command's action returns, and forwarded commands import
 * it (appliance/cli/forward.ts), so an action that never returned would block them all.
 */
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { TandemError } from '../../common/errors.js';
import { Home } from '../home.js';
import { loadConfig, type Config } from '../config/index.js';
import { computeStatus, BreachNotifier, postWebhook } from '../status.js';
import { applianceHealth } from '../health.js';
import { createMetrics } from '../metrics.js';
import { Scheduler, errorInfo } from './runner.js';
import { realClock } from './clock.js';
import { applianceSteps } from './steps.js';
import { ScheduledVerify, verifySummary } from './verify.js';

/** How often RPO/RTO states are recomputed for the breach webhook (and peers' certificates followed). */
export const ALERT_INTERVAL_MS = 30_000;

export interface DaemonOptions {
  readonly home: string;
  readonly listen: string;
  readonly json: boolean;
  readonly out: (s: string) => void;
}

export interface RunningDaemon {
  readonly url: string;
  /** Graceful stop (see the module comment); `why` is logged. Idempotent. */
  stop(why: string): Promise<void>;
  /**
   * SIGHUP: re-read config.yaml now (an invalid one is logged and the last valid one kept) and
   * run a scheduling round with it, rather than at the next rescan (60 s).
   */
  reload(why: string): Promise<void>;
}

export async function runDaemon(opts: DaemonOptions): Promise<RunningDaemon> {
  const log = pino({ name: 'tandem', base: { pid: process.pid } }, pino.destination(2));
  const home = Home.load(opts.home);
  // Validate the config before binding anything: a daemon with a broken config is an error.
  let config: Config = await loadConfig(home);
  const scheduler: { current: Scheduler | null } = { current: null };
  const verifier: { current: ScheduledVerify | null } = { current: null };
  let metrics!: ReturnType<typeof createMetrics>;
  const { startServed } = await import('../../api/serve.js');
  const served = await startServed(home, opts.listen, {
    logger: { level: 'warn', stream: process.stderr },
    // What a daemon (or a command) killed between a snapshot's hooks froze is thawed before any job runs.
    onOwedPost: (o) => {
      if (o.outcome === 'restarted') log.warn({ post: o.post, since: o.since }, 'post hook owed by an interrupted snapshot dropped: the machine restarted since');
      else log.warn({ post: o.post, since: o.since, exitCode: o.run?.exitCode ?? null, output: o.run?.output }, 'ran the post hook an interrupted snapshot owed');
    },
    routes: (store) => {
      const summary = () => verifySummary(store, config, verifier.current?.running ?? null);
      metrics = createMetrics(async () => computeStatus(store, config, Date.now(), undefined, home.paths.locks), () => scheduler.current?.runningUnits() ?? [], summary, () => applianceHealth(home));
      return (app: FastifyInstance) => {
        app.get('/metrics', async (_req, reply) => {
          const m = await metrics.render();
          return reply.type(m.contentType).send(m.body);
        });
        app.get<{ Querystring: { volume?: string } }>('/v1/status', async (req) => {
          const volumes = await computeStatus(store, config, Date.now(), req.query.volume, home.paths.locks);
          // As `appliance status VOL`: a volume asked for by name that is not here is an error (a
          // monitor polling a misspelt or removed volume must not read an empty, healthy answer).
          if (req.query.volume !== undefined && volumes.length === 0) {
            throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${req.query.volume}" on this appliance; \`appliance volume list\` shows the volumes`, { details: { volume: req.query.volume } });
          }
          return { appliance: home.identity.name, at: new Date().toISOString(), running: scheduler.current?.runningUnits() ?? [], volumes, verify: await summary(), health: await applianceHealth(home) };
        });
      };
    },
  });
  const store = served.store;

  const { hookLedger } = await import('../ops.js');

  const sched = new Scheduler({
    store,
    clock: realClock,
    log,
    hookLedger: hookLedger(home),
    steps: applianceSteps(home, store, () => config),
    loadConfig: async () => (config = await loadConfig(home)),
    onJobEnd: (unit, o) => metrics.jobEnded(unit, o.ok ? 'ok' : o.held ? 'held' : o.paused ? 'paused' : 'failed'),
  });
  scheduler.current = sched;
  sched.start();

  const verify = new ScheduledVerify({
    store,
    config: () => config,
    clock: realClock,
    log,
    alert: async (a) => {
      const webhook = config.alerts.webhook;
      const error = webhook === null ? null : await postWebhook(webhook, a);
      if (error) log.error({}, `${error} (verify_failed)`);
      else if (webhook !== null) log.warn({ event: a.event }, 'verify alert sent');
    },
    heal: async (peer, problems) => {
      const { healProblems } = await import('../repair.js');
      const r = await healProblems(store, peer, problems);
      // Healed here: nothing left for the peer to push.
      const left = new Set(r.unrepaired.map((u) => u.hash));
      const { clearDamage } = await import('../damage.js');
      await clearDamage(store, [...new Set(problems.map((p) => p.hash))].filter((h) => !left.has(h)));
      return { blocksRepaired: r.blocksRepaired, nodesRepaired: r.nodesRepaired, unrepaired: r.unrepaired.length };
    },
  });
  verifier.current = verify;
  verify.start();

  // Scheduled drills (recovery.PLAN.drill.every, cloud appliance): the AWS SDK is loaded only
  // when a drill runs.
  const { ScheduledDrills } = await import('./drills.js');
  const drills = new ScheduledDrills({
    store,
    appliance: home.identity.name,
    config: () => config,
    clock: realClock,
    log,
    drill: async (plan, signal) => {
      const { recover } = await import('../recovery/index.js');
      return recover(home, store, { mode: 'drill', plan, signal }, (line) => log.info({ plan }, `drill: ${line}`));
    },
    alert: async (a) => {
      const webhook = config.alerts.webhook;
      const error = webhook === null ? null : await postWebhook(webhook, a);
      if (error) log.error({}, `${error} (drill_failed)`);
      else if (webhook !== null) log.warn({ event: a.event, plan: a.plan }, 'drill alert sent');
    },
  });
  drills.start();

  // A drill interrupted with this appliance (killed, the machine restarted) may have left
  // instances running in the drill subnet: they are torn down now rather than at the next drill.
  // The AWS SDK is loaded only when there is one (an on-prem appliance never has one).
  void (async () => {
    const { interruptedDrills } = await import('../recovery/state.js');
    if ((await interruptedDrills(store)).length === 0) return;
    const { tearDownInterrupted } = await import('../recovery/index.js');
    for (const run of await tearDownInterrupted(home, store, (line) => log.warn({}, line))) log.warn({ run: run.id }, 'interrupted drill torn down');
  })().catch((e: unknown) => log.error({ err: String(e) }, 'interrupted drills not torn down'));

  // A peer's certificate rotation (`appliance tls rotate` there) is followed so that it breaks no
  // sync (appliance/peers.ts followCertificate). An unreachable peer is the replication's news.
  // Apart from the checks above: a peer that does not answer takes seconds of retries, and a
  // stop does not wait for it (the process exits; a pin half-followed is followed next time).
  let following: Promise<void> | null = null;
  let stopping: Promise<void> | null = null;
  const followPeerCertificates = () => {
    if (following || stopping) return;
    following = (async () => {
      const { listPeers, followCertificate } = await import('../peers.js');
      for (const peer of await listPeers(store)) {
        if (stopping) return;
        try {
          const r = await followCertificate(store, peer, home.identity);
          if (r.change !== 'none') log.warn({ peer: peer.name, certificate: r.change, fingerprint: r.peer.fingerprint, nextFingerprint: r.peer.nextFingerprint ?? null }, 'peer certificate pins changed');
        } catch (e) {
          log.debug({ peer: peer.name, err: String(e) }, 'peer certificate not checked');
        }
      }
    })().catch((e: unknown) => log.error({ err: String(e) }, 'peer certificates not followed')).finally(() => { following = null; });
  };

  const notifier = new BreachNotifier(home.identity.name);
  let checking: Promise<void> | null = null;
  const checkBreaches = () => {
    if (checking) return; // a slow webhook must not pile up checks
    checking = (async () => {
      const r = await notifier.check(await computeStatus(store, config, Date.now(), undefined, home.paths.locks), config.alerts.webhook, Date.now());
      for (const a of r.sent) log.warn({ volume: a.volume, event: a.event }, 'breach alert sent');
      for (const e of r.errors) log.error({}, e);
      const health = await applianceHealth(home);
      const h = await notifier.checkHealth(health, config.alerts.webhook, Date.now());
      for (const a of h.sent) log.warn({ event: a.event, storeFreeBytes: health.storeFreeBytes, certificateNotAfter: health.certificateNotAfter }, 'appliance alert sent');
      for (const e of h.errors) log.error({}, e);
    })().catch((e: unknown) => log.error({ err: String(e) }, 'status check failed')).finally(() => { checking = null; });
  };
  const alerts = setInterval(() => { checkBreaches(); followPeerCertificates(); }, ALERT_INTERVAL_MS);
  checkBreaches();
  followPeerCertificates();

  opts.out(served.announcement(opts.json, 'daemon listening on'));
  log.info({ url: served.url }, 'daemon started');

  const stop = (why: string): Promise<void> => {
    stopping ??= (async () => {
      log.info({ signal: why }, 'stopping: no new jobs; waiting for the running one');
      clearInterval(alerts);
      await checking;
      // A drill stopped midway tears down; past the grace the next start tears it down (launch.ts).
      // Commands forwarded from CLIs get the same grace as the jobs, and their owed post hooks run.
      // The config as last read (at the start or the last SIGHUP) says how long.
      const graceMs = config.shutdown.graceMs;
      await Promise.all([sched.stop(graceMs), verify.stop(), served.stopForwarding(graceMs), Promise.race([drills.stop(), new Promise((r) => setTimeout(r, graceMs).unref())])]);
      await served.close(graceMs);
      log.info({}, 'daemon stopped');
      log.flush();
    })();
    return stopping;
  };
  const reload = async (why: string): Promise<void> => {
    if (stopping) return;
    try {
      config = await loadConfig(home);
      log.info({ signal: why }, 'config.yaml re-read');
    } catch (e) {
      log.error({ signal: why, err: errorInfo(e) }, 'config.yaml is invalid: keeping the last valid configuration');
    }
    sched.wakeUp();
  };
  return { url: served.url, stop, reload };
}
