/**
 * `appliance doctor`: everything an operator checks before trusting the appliance (after an
 * install, a change, or at 3 a.m. before a failover), in one pass, each with what to do next:
 * the configuration, the store's disk, the TLS certificate, the server, every volume's device or
 * image, every peer (reachable, certificate pinned, token taken, same protocol), the replication
 * peer, held replication, RPO state and the last scheduled verify. Read-only: it changes nothing.
 *
 * A check is `ok`, `warn` (works, but look at it) or `fail` (something the appliance needs is
 * broken); the command exits 1 when one fails.
 */
import { isTandemError } from '../common/errors.js';
import type { Store } from '../store/index.js';
import type { Config } from './config/index.js';
import type { Home } from './home.js';
import { DISK_LOW_FRACTION, type ApplianceHealth } from './health.js';
import { formatBytes } from './cli/output.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface Check {
  /** What was checked, e.g. `peer cloud`, `volume db-data`. */
  readonly check: string;
  readonly status: CheckStatus;
  readonly detail: string;
  /** What to do about a warn or fail. */
  readonly fix?: string;
}


/** Clocks further apart than this warn: RPO ages and retention buckets compare the two appliances' times. */
const CLOCK_SKEW_WARN_MS = 30_000;


/** An error as a check's detail: its code and message. */
export function failure(e: unknown): string {
  return isTandemError(e) ? `${e.code}: ${e.message}` : (e as Error)?.message ?? String(e);
}

/**
 * Each `discovery.paths` entry that cannot be searched (missing, not a directory, unreadable):
 * `appliance discover` would list no image from it and say nothing else.
 */
export async function discoveryChecks(config: Config): Promise<Check[]> {
  const { discoveryPathProblems } = await import('./discover/images.js');
  return (await discoveryPathProblems(config.discovery.paths)).map((u) => ({
    check: `discovery path ${u.path}`,
    status: 'warn' as const,
    detail: `${u.path} ${u.problem}: discover finds no image there`,
    fix: 'correct or remove the entry under discovery.paths in config.yaml (or create the directory)',
  }));
}

/**
 * The checks that need no store: configuration, certificate, server, the store's disk.
 * `config` null: it did not load (its error is `configError`).
 */
export function homeChecks(home: Home, config: Config | null, configError: unknown, server: { pid: number; url: string } | null, health: ApplianceHealth): Check[] {
  const out: Check[] = [];
  out.push(config
    ? { check: 'config', status: 'ok', detail: `${home.paths.config} is valid` }
    : { check: 'config', status: 'fail', detail: failure(configError), fix: 'fix the line named, then `appliance config check`' });
  if (health.certificateNotAfter === null) {
    out.push({ check: 'certificate', status: 'fail', detail: `${home.paths.tlsCert} cannot be read`, fix: 'make a new one with `appliance tls rotate --now`, then `appliance peer update NAME --fingerprint F` on the peer' });
  } else {
    const days = Math.floor((Date.parse(health.certificateNotAfter) - Date.now()) / 86_400_000);
    const staged = home.stagedTls();
    const stagedDetail = staged ? `; staged ${staged.fingerprint}, taken by ${home.tlsAcks(staged).length} peer(s): \`appliance tls rotate --activate\` serves it` : '';
    const detail = `fingerprint ${home.fingerprint()}, valid ${days < 0 ? `until ${health.certificateNotAfter}` : `for ${days} more days`}${stagedDetail}`;
    out.push(days < 0
      ? { check: 'certificate', status: 'fail', detail, fix: 'make a new one with `appliance tls rotate --now`, then `appliance peer update NAME --fingerprint F` on the peer' }
      : health.certificateExpiring
        ? { check: 'certificate', status: 'warn', detail, fix: '`appliance tls rotate` before it ends (the peers learn the new certificate), then `appliance tls rotate --activate`' }
        : { check: 'certificate', status: 'ok', detail });
  }
  const scheduled = config !== null && Object.keys(config.policies).length > 0;
  out.push(server
    ? { check: 'server', status: 'ok', detail: `pid ${server.pid} serves ${server.url}` }
    : { check: 'server', status: scheduled ? 'warn' : 'ok', detail: 'no `appliance daemon` or `serve` runs on this home', ...(scheduled ? { fix: 'policies are configured but nothing schedules them: start `appliance daemon` (deploy/ has a systemd unit)' } : {}) });
  const diskDetail = `${formatBytes(health.storeFreeBytes)} free of ${formatBytes(health.storeDiskBytes)} on the store's disk`;
  out.push(health.diskCritical
    ? { check: 'store disk', status: 'fail', detail: diskDetail, fix: '`appliance retention` then `appliance gc` reclaim old snapshots (gc deletes each old pack once its live records have moved, so it needs room for about one pack; ERR_DISK_FULL when even that is missing), or grow the disk or free space on it outside the store' }
    : health.diskLow
      ? { check: 'store disk', status: 'warn', detail: diskDetail, fix: `less than ${DISK_LOW_FRACTION * 100} % free: plan space, or tighten retention and run \`appliance gc\`` }
      : { check: 'store disk', status: 'ok', detail: diskDetail });
  return out;
}

/** The checks that read the store: volumes, peers, replication, status and verify. */
export async function storeChecks(store: Store, config: Config | null): Promise<Check[]> {
  const out: Check[] = [];
  if (store.indexFailure) {
    out.push({ check: 'store index', status: 'fail', detail: `a write failed at ${store.indexFailure.at}: ${store.indexFailure.message}; the index takes no write until it is reopened, which the appliance tries (every minute at most) once the disk takes a synced write again`, fix: 'check the disk (`dmesg`) and free space on it; if this stays after that, restart the appliance (`systemctl restart tandem`, or stop and start `appliance serve`/`daemon`)' });
  }
  const { openVolumeReader } = await import('./volumes/index.js');
  for (const v of await store.listVolumes()) {
    if (v.path === undefined) {
      out.push({ check: `volume ${v.name}`, status: 'ok', detail: `a replica (${formatBytes(v.size)}), no device or image here` });
      continue;
    }
    try {
      const r = await openVolumeReader(v.path, { holeMap: false });
      const actual = r.size;
      await r.close();
      out.push(actual === v.size
        ? { check: `volume ${v.name}`, status: 'ok', detail: `${v.path}, ${formatBytes(actual)}, readable` }
        : { check: `volume ${v.name}`, status: 'warn', detail: `${v.path} is ${formatBytes(actual)} now, ${formatBytes(v.size)} at its last snapshot`, fix: 'expected after a resize: the next snapshot records the new size' });
    } catch (e) {
      out.push({ check: `volume ${v.name}`, status: 'fail', detail: failure(e), fix: `attach the device or image again, or point the volume at it: \`appliance volume remove ${v.name}\` keeps nothing, so prefer fixing the path` });
    }
  }

  const { listPeers, contactPeer } = await import('./peers.js');
  const { PROTOCOL_VERSION } = await import('../sync/protocol.js');
  const peers = await listPeers(store);
  for (const p of peers) {
    const t0 = performance.now();
    try {
      const remote = await contactPeer(p);
      const ms = Math.round(performance.now() - t0);
      const skew = remote.clockSkewMs === null ? '' : `, clock ${remote.clockSkewMs >= 0 ? '+' : ''}${(remote.clockSkewMs / 1000).toFixed(1)} s from ours`;
      const staged = p.nextFingerprint ? ` (and the certificate it staged, ${p.nextFingerprint}, taken too)` : '';
      const detail = `${p.url}: appliance "${remote.name}", certificate pinned${staged}, token taken, ${ms} ms${skew}`;
      out.push(remote.clockSkewMs !== null && Math.abs(remote.clockSkewMs) > CLOCK_SKEW_WARN_MS
        ? { check: `peer ${p.name}`, status: 'warn', detail, fix: 'the clocks differ: a replica\'s age against its RPO and retention\'s buckets compare times across the appliances; run NTP (chrony, systemd-timesyncd) on both' }
        : { check: `peer ${p.name}`, status: 'ok', detail });
    } catch (e) {
      const code = isTandemError(e) ? e.code : '';
      const fix = code === 'ERR_UNAUTHORIZED'
        ? `it refused our token: \`appliance token show\` there, then \`appliance peer update ${p.name} --token T\` here`
        : code === 'ERR_PEER_FINGERPRINT'
          ? `its certificate changed: \`appliance tls show\` there, then \`appliance peer update ${p.name} --fingerprint F\` here`
          : code === 'ERR_PEER_PROTOCOL'
            ? `it speaks another protocol than ${PROTOCOL_VERSION}: run the same Tandem version on both appliances`
            : `check that its server runs and that ${p.url} is reachable from here (firewall, DNS); \`appliance peer update ${p.name} --url URL\` if it moved`;
      out.push({ check: `peer ${p.name}`, status: 'fail', detail: failure(e), fix });
    }
  }
  const replicationPeer = config?.replication?.peer;
  if (replicationPeer !== undefined) {
    out.push(peers.some((p) => p.name === replicationPeer)
      ? { check: 'replication', status: 'ok', detail: `to peer ${replicationPeer}` }
      : { check: 'replication', status: 'fail', detail: `config replication.peer is "${replicationPeer}", which is no peer of this appliance`, fix: `pair with it (\`appliance peer add ${replicationPeer} ...\`) or fix replication.peer in config.yaml` });
  }

  if (config !== null) {
    const { computeStatus } = await import('./status.js');
    for (const s of await computeStatus(store, config, Date.now())) {
      if (s.local && s.policy === null) {
        out.push({ check: `policy of ${s.volume}`, status: 'warn', detail: 'no policy: no job snapshots or replicates it', fix: `give it one: an \`assign\` rule in config.yaml that matches it, or \`appliance volume remove ${s.volume}\` and add it again with --policy NAME` });
      }
      if (s.paused) {
        out.push({ check: `scheduled jobs of ${s.volume}`, status: 'warn', detail: `paused by ${s.paused.by} since ${s.paused.at}${s.paused.until ? ` until ${s.paused.until}` : ', until resumed'}${s.paused.reason ? ` (${s.paused.reason})` : ''}; the RPO keeps counting`, fix: `\`appliance resume ${s.volume}\` once the reason is gone` });
      }
      if (s.replicationHeld) {
        out.push({ check: `replication of ${s.volume}`, status: 'warn', detail: `held since ${s.replicationHeld.since}: ${s.replicationHeld.code}`, fix: s.replicationHeld.message });
      } else if (s.rpoState === 'BREACHED') {
        out.push({ check: `RPO of ${s.volume}`, status: 'warn', detail: s.lastReplicated ? `the last replicated point is from ${s.lastReplicated.at}, older than the policy's RPO` : 'never replicated', fix: s.lastJob && !s.lastJob.ok ? `the last job failed: ${s.lastJob.error?.code ?? ''} ${s.lastJob.error?.message ?? ''}` : 'see `appliance status`; the daemon replicates before the RPO when it runs' });
      }
    }
    const { RESTORING_NS } = await import('./ops.js');
    for (const [, r] of await store.listMeta<import('./ops.js').InterruptedRestore>(RESTORING_NS)) {
      out.push({ check: `restore onto ${r.path}`, status: 'warn', detail: `a restore of ${r.volume}@${r.snapshot} started ${r.since} did not complete: ${r.path} is partly written (some blocks of the snapshot, the rest as they were)`, fix: `rerun \`appliance restore ${r.volume}@${r.snapshot} --to ${r.path}\` (it writes only what still differs), or restore another snapshot onto it` });
    }
    const { interruptedDrills, unfinishedDrillText } = await import('./recovery/state.js');
    for (const run of await interruptedDrills(store)) {
      out.push({ check: `drill ${run.id}`, status: 'warn', detail: `${unfinishedDrillText(run).replace(/^was /, '')} (started ${run.started}): its instances may still run in the drill subnet and cost money`, fix: 'the next `appliance drill`, or `appliance daemon` when it starts, terminates them and deregisters their images' });
    }
    // Scheduled drills (recovery.PLAN.drill.every): the last one failed, or none for two periods.
    const { scheduledPlans, newestDrillOf } = await import('./scheduler/drills.js');
    const reports = (await store.listMeta<import('./scheduler/drills.js').DrillReport>('drills')).map(([, r]) => r);
    for (const plan of config ? scheduledPlans(config) : []) {
      const last = newestDrillOf(reports, plan.plan, plan.volumes);
      if (last !== null && !last.passed) {
        out.push({ check: `drill of ${plan.plan}`, status: 'warn', detail: `the last drill (${last.id}, ${last.at}) failed${last.error ? `: ${last.error}` : `: ${(last.checks ?? []).filter((c) => !c.ok).map((c) => `${c.name}: ${c.detail}`).join('; ')}`}`, fix: `fix what failed, then \`appliance drill --plan ${plan.plan}\` to prove it; until then a failover of it may not come back` });
      } else if (last === null || Date.parse(last.at) + 2 * plan.everyMs < Date.now()) {
        out.push({ check: `drill of ${plan.plan}`, status: 'warn', detail: last === null ? 'never drilled, though config.yaml asks for it' : `last drilled ${last.at}, more than twice drill.every ago`, fix: 'the daemon drills it once each of its volumes has an EBS export; is `appliance daemon` running here?' });
      }
    }
    for (const [volume, left] of await store.listMeta<Array<{ ebsSnapshotId: string }>>('ebs-deleting')) {
      if (left.length === 0) continue;
      out.push({ check: `EBS exports of ${volume}`, status: 'warn', detail: `retention took ${left.map((e) => e.ebsSnapshotId).join(', ')} out of the recovery points, but could not delete ${left.length === 1 ? 'it' : 'them'} in EBS yet: ${left.length === 1 ? 'it is' : 'they are'} still billed`, fix: '`appliance retention ' + volume + '` tries again and says why it fails (an image that maps the snapshot, or the IAM policy lacking ec2:DeleteSnapshot); the daemon retries after each job' });
    }
    const { verifySummary, unhealed } = await import('./scheduler/verify.js');
    const v = await verifySummary(store, config);
    if (v.last && unhealed(v.last) > 0) {
      out.push({ check: 'verify', status: 'fail', detail: `the last scheduled verify (${v.last.ended}) left ${unhealed(v.last)} damaged block(s) or node(s) unhealed`, fix: '`appliance verify` names them; `appliance repair --peer NAME` heals them from the peer' });
    } else if (v.last) {
      out.push({ check: 'verify', status: 'ok', detail: `the last scheduled verify (${v.last.ended}) left nothing damaged` });
    }
  }
  return out;
}

/** Post hooks that snapshots killed between their hooks still owe (hooks.ts runOwedPostHooks): what they froze may be frozen still. */
export async function hookChecks(home: Home): Promise<Check[]> {
  const { runOwedPostHooks } = await import('./hooks.js');
  const { hookLedger } = await import('./ops.js');
  return (await runOwedPostHooks(hookLedger(home), true)).filter((o) => o.outcome === 'ran').map((o) => ({
    check: 'snapshot hooks',
    status: 'fail',
    detail: `a snapshot interrupted at ${o.since} did not run its post hook \`${o.post}\`: what its pre hook froze may still be frozen`,
    fix: 'run it by hand now; else the next `appliance snapshot` or `sync` of a volume with hooks, or the daemon when it starts, runs it',
  }));
}
