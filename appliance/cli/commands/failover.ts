/**
 * `appliance failover` and `appliance drill` (cloud appliance): launch recovery plans in EC2
 * from EBS exports. The steps are in appliance/recovery/launch.ts. `failover VOL --end` gives an
 * active failover up without a failback (appliance/recovery/failback.ts endFailover).
 */
import type { Command } from 'commander';
import { run, currentIO, type GlobalOptions } from '../output.js';

export const order = 60;

interface Opts { group?: string; plan?: string; point?: string; keep?: string; end?: boolean; terminate?: boolean }

function selector(volume: string | undefined, o: Opts) {
  return { volume, group: o.group, plan: o.plan };
}

/** `failover VOL --end [--terminate]`: give the failover up without a failback (appliance/recovery/failback.ts endFailover). */
async function end(g: GlobalOptions, volume: string | undefined, o: Opts) {
  const { Home } = await import('../../home.js');
  const { TandemError } = await import('../../../common/errors.js');
  if (volume === undefined || o.group !== undefined || o.plan !== undefined || o.point !== undefined) {
    throw new TandemError('ERR_USAGE', '--end takes the volume whose failover to end: `appliance failover VOL --end [--terminate]` (no --group, --plan or --point)');
  }
  const { end: endFailover } = await import('../../recovery/index.js');
  const home = Home.load(g.home);
  const store = await home.openStore();
  try {
    const r = await endFailover(store, volume, o.terminate === true);
    const text = [
      `failover ${r.run} ended without failback: ${r.volumes.join(', ')} take pushes again; their changes made in EC2 are not brought home`,
      r.terminated.length ? `  terminated ${r.terminated.join(', ')}` : '  its instances are left running (pass --terminate to stop them)',
    ].join('\n');
    return { json: r, text };
  } finally {
    await store.close();
  }
}

async function execute(g: GlobalOptions, mode: 'failover' | 'drill', volume: string | undefined, o: Opts) {
  const { Home } = await import('../../home.js');
  const { TandemError } = await import('../../../common/errors.js');
  if (o.terminate) throw new TandemError('ERR_USAGE', '--terminate goes with `failover VOL --end` (a failback terminates with `appliance failback VOL --terminate`)');
  const { recover, parsePoint } = await import('../../recovery/index.js');
  let keepMinutes: number | undefined;
  if (o.keep !== undefined) {
    keepMinutes = Number(o.keep);
    if (!Number.isInteger(keepMinutes) || keepMinutes < 0 || keepMinutes > 7 * 24 * 60) {
      throw new TandemError('ERR_USAGE', `--keep "${o.keep}" is not a number of minutes between 0 and 10080`);
    }
  }
  const home = Home.load(g.home);
  const store = await home.openStore();
  const io = currentIO();
  // Ctrl-C (or SIGTERM) ends a drill now, --keep or not: it is torn down before the command
  // exits. A second one exits at once and leaves the teardown to the next drill or the daemon.
  // Not in a server running a forwarded drill: its signals are its own.
  const stop = new AbortController();
  const onSignal = (signal: NodeJS.Signals) => {
    if (stop.signal.aborted) process.exit(130);
    stop.abort();
    io.err(`drill: ${signal}: ending the drill now; its instances are being torn down (${signal} again leaves them to the next drill)\n`);
  };
  const own = mode === 'drill' && !io.forwarded;
  if (own) {
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  }
  try {
    const r = await recover(home, store, { mode, ...selector(volume, o), point: parsePoint(o.point), keepMinutes, signal: stop.signal }, (line) => io.err(`${mode}: ${line}\n`));
    const lines = [`${mode} ${r.id}: ${r.status}${r.rtoSeconds !== null ? `, every instance running after ${r.rtoSeconds} s (measured RTO)` : ''}`];
    for (const p of r.points) lines.push(`  ${p.volume}: point ${p.pointTime} from ${p.ebsSnapshotId}${p.exportedNow ? ' (exported now)' : ''}`);
    for (const s of r.servers) {
      lines.push(`  ${s.plan}: ${s.instanceId} ${s.state} in ${s.subnetId ?? '-'} ip ${s.privateIp ?? '-'} (image ${s.imageId})`);
    }
    for (const c of r.checks) lines.push(`  check ${c.ok ? 'ok  ' : 'FAIL'} ${c.name}: ${c.detail}`);
    if (r.tornDown) lines.push(`  torn down at ${r.tornDown}`);
    return { json: r, text: lines.join('\n') };
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await store.close();
  }
}

export function define(program: Command): void {
  const common = (c: Command) => c
    .option('--group <group>', 'every plan that involves a volume of this group (config `groups`)')
    .option('--plan <plan>', 'one recovery plan by name (config `recovery`)')
    .option('--point <time>', 'recover from the newest export at or before this ISO time (default: the newest data)');
  common(program.command('failover [volume]')
    .description('launch the recovery plans of VOLUME (or --group/--plan) in EC2 from EBS snapshots; prints the measured RTO; --end gives an active failover up'))
    .option('--end', "end VOLUME's active failover without a failback: pushes from on-prem are taken again, the EC2 changes are not brought home")
    .option('--terminate', 'with --end: terminate the failover instances')
    .action(run(async (g, cmd, [volume]) => {
      const o = cmd.opts() as Opts;
      return o.end ? end(g, volume as string | undefined, o) : execute(g, 'failover', volume as string | undefined, o);
    }));
  common(program.command('drill [volume]')
    .description('launch a copy in the isolated drill subnet from a point in time, check it, tear it down; production and replication are untouched'))
    .option('--keep <minutes>', 'keep the drill instances this many minutes before teardown')
    .action(run(async (g, cmd, [volume]) => execute(g, 'drill', volume as string | undefined, cmd.opts() as Opts)));
}
