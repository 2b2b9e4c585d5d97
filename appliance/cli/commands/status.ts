/**
 * `appliance status [VOL] [--json]`: per volume, RPO compliance (age of the last replicated
 * point against the policy: OK / AT_RISK / BREACHED), the last snapshot, EBS export and drill,
 * and the estimated RTO against the policy. Read-only. Exit 0 even when something is breached
 * (the state is the answer); exit 1 only when the status cannot be computed.
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 80;

export function define(program: Command): void {
  program
    .command('status [volume]')
    .description('RPO compliance, last replicated point, last export and drill, estimated RTO, per volume')
    .action(run(async (g, _cmd, args) => {
      const only = args[0] as string | undefined;
      const { withHomeStore } = await import('../../ops.js');
      const { loadConfig, formatDuration } = await import('../../config/index.js');
      const { computeStatus } = await import('../../status.js');
      const { formatTable, formatAge } = await import('../table.js');
      const { formatBytes } = await import('../output.js');
      const { verifySummary, verifyLine } = await import('../../scheduler/verify.js');
      const { TandemError } = await import('../../../common/errors.js');
      return withHomeStore(g.home, async (home, store) => {
        const config = await loadConfig(home);
        const now = Date.now();
        const volumes = await computeStatus(store, config, now, only, home.paths.locks);
        if (only !== undefined && volumes.length === 0) {
          throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${only}" on this appliance; \`appliance volume list\` shows the volumes`, { details: { volume: only } });
        }
        const dur = (ms: number | null) => (ms === null ? '-' : formatDuration(ms));
        const state = (s: string) => s.replace('_', ' ');
        const rows = volumes.map((v) => [
          v.volume,
          v.policy ?? '-',
          formatAge(v.lastSnapshot?.created, now),
          formatAge(v.lastReplicated?.at, now),
          v.rpoState === 'NONE' ? '-' : `${state(v.rpoState)} (${dur(v.rpoAgeMs)}/${dur(v.rpoMs)})`,
          v.lastExport ? formatAge(v.lastExport.created, now) : 'never',
          v.rtoState === 'NONE' ? dur(v.rtoEstimateMs) : `${state(v.rtoState)} (${dur(v.rtoEstimateMs)}/${dur(v.rtoMs)})`,
          v.lastDrill ? `${v.lastDrill.passed ? 'passed' : 'FAILED'} ${formatAge(v.lastDrill.at, now)}` : 'never',
          v.lastJob ? (v.lastJob.ok ? 'ok' : `FAILED: ${v.lastJob.error?.code ?? ''}`) : '-',
        ]);
        const table = volumes.length === 0
          ? 'no volumes; register one with `appliance volume add NAME --path PATH`'
          : formatTable(['VOLUME', 'POLICY', 'SNAPSHOT', 'REPLICATED', 'RPO (age/objective)', 'EBS EXPORT', 'RTO (estimate/objective)', 'DRILL', 'LAST JOB'], rows);
        const verify = await verifySummary(store, config);
        const failedOver = volumes.flatMap((v) => v.failedOver
          ? [`${v.volume} runs in EC2 since ${v.failedOver.since} (failover ${v.failedOver.run}, instance ${v.failedOver.instanceId}): pushes of it are refused until \`appliance failback ${v.volume}\` on-prem, or \`appliance failover ${v.volume} --end\` here`]
          : []);
        // A failover that came up in part (appliance/recovery/launch.ts): what did not, and how to bring it up.
        const { RUNS_NS } = await import('../../recovery/state.js');
        const active = (await store.listMeta<{ id: string; mode: string; status: string; failedPlans?: string[]; error: string | null; servers: Array<{ plan: string }> }>(RUNS_NS))
          .map(([, r]) => r)
          .filter((r) => r.mode === 'failover' && r.status === 'active');
        const up = new Set(active.flatMap((r) => r.servers.map((x) => x.plan)));
        const partial = active.flatMap((r) => {
          // A plan brought up since by another failover is no longer missing.
          const missing = (r.failedPlans ?? []).filter((p) => !up.has(p));
          return missing.length === 0 ? [] : [`failover ${r.id} came up in part: ${missing.join(', ')} did not (${r.error ?? 'see the run'}); ${missing.map((p) => `\`appliance failover --plan ${p}\``).join(', ')} brings ${missing.length === 1 ? 'it' : 'them'} up`];
        });
        const held = volumes.flatMap((v) => v.replicationHeld
          ? [`${v.volume}: replication to ${v.replicationHeld.peer} held since ${v.replicationHeld.since} (${v.replicationHeld.code}; asked again every minute, last ${formatAge(v.replicationHeld.checkedAt, now)}): ${v.replicationHeld.message}`]
          : []);
        const paused = volumes.flatMap((v) => v.paused
          ? [`${v.volume}: scheduled jobs paused by ${v.paused.by} ${formatAge(v.paused.at, now)}${v.paused.until ? `, until ${v.paused.until}` : ', until `appliance resume ' + v.volume + '`'}${v.paused.reason ? `: ${v.paused.reason}` : ''}`]
          : []);
        const unfinished = volumes.flatMap((v) => v.pushesUnfinished.map((u) => u.running
          ? `${v.volume}: a push to ${u.peer} (snapshot ${u.snapshot}) runs, started ${formatAge(u.since, now)}`
          : `${v.volume}: a push to ${u.peer} (snapshot ${u.snapshot}) started ${formatAge(u.since, now)} and stopped midway: \`appliance sync ${v.volume} --peer ${u.peer}\` resumes it, sending nothing the peer stored`));
        const { applianceHealth } = await import('../../health.js');
        const health = await applianceHealth(home, now);
        const healthLines = [
          ...(health.diskLow ? [`the store's disk is low: ${formatBytes(health.storeFreeBytes)} free of ${formatBytes(health.storeDiskBytes)}; \`appliance doctor\` says what to do`] : []),
          ...(health.certificateExpiring ? [`the TLS certificate ends ${health.certificateNotAfter ?? '(unreadable)'}: \`appliance tls rotate\`, then \`appliance peer update NAME --fingerprint F\` on the peer`] : []),
        ];
        // Why replication may be slow now: the cap config.yaml puts on it (appliance/config/bwlimit.ts).
        const { replicationRate, hasSchedule } = await import('../../config/bwlimit.js');
        const r = config.replication;
        const replication = r === null ? null : { peer: r.peer, capNow: replicationRate(r, new Date(now)), scheduled: hasSchedule(r) };
        const capLine = replication && (replication.scheduled || replication.capNow > 0)
          ? [`replication to ${replication.peer}: ${replication.capNow === 0 ? 'not capped now' : `capped at ${formatBytes(replication.capNow)}/s now`} (config.yaml replication.${replication.scheduled ? 'schedule' : 'bwlimit'})`]
          : [];
        const missing = volumes.flatMap((v) => v.policyMissing
          ? [`${v.volume}: its policy "${v.policy}" is not defined in config.yaml (renamed or removed?): no job protects it. Define it again, or give the volume another one`]
          : v.policy === null && v.local
            ? [`${v.volume}: no policy: no job snapshots or replicates it. Give it one (\`appliance volume add ${v.volume} --policy NAME\` when adding, or an \`assign\` rule in config.yaml)`]
            : []);
        const ahead = volumes.flatMap((v) => v.pointAhead
          ? [`${v.volume}: its recovery point is dated ${v.pointAhead}, later than this appliance's clock (${new Date(now).toISOString()}): the clock was set back since, or the appliance that dated it runs ahead (\`appliance doctor\` compares the two). Its age is unknown, so the RPO counts as breached; the daemon runs the next job now`]
          : []);
        const text = [table, ...missing, ...ahead, ...failedOver, ...partial, ...held, ...paused, ...unfinished, ...capLine, ...healthLines, ...(only === undefined ? [verifyLine(verify, now, formatAge, formatBytes)] : [])].join('\n');
        return { json: { appliance: home.identity.name, at: new Date(now).toISOString(), volumes, replication, verify, health }, text };
      });
    }));
}
