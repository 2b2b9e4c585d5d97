/**
 * `appliance failback VOL [--peer NAME] [--terminate] [--force] [--no-keep] [--bwlimit RATE]` (on-prem): bring the changes made in EC2
 * after a failover home. Steps (appliance/recovery/failback.ts):
 *
 * 1. ask the cloud appliance to snapshot the EC2 volume and import it incrementally
 *    (POST /v1/recovery/failback/prepare),
 * 2. `sync VOL --reverse --apply`: pull that snapshot, rescan the local volume, write only the
 *    differing blocks, verify the written tree, record the common base,
 * 3. tell the cloud appliance the volume is home (POST /v1/recovery/failback/complete), which
 *    terminates the failover instances with --terminate.
 *
 * Replication then resumes incrementally from the applied snapshot.
 */
import type { Command } from 'commander';
import { run, currentIO, formatBytes, parseSize } from '../output.js';

export const order = 62;

interface Opts { peer?: string; terminate?: boolean; force?: boolean; keep?: boolean; bwlimit?: string }

export function define(program: Command): void {
  program.command('failback <volume>')
    .description('after a failover: import the EC2 volume incrementally on the cloud appliance, pull and apply only the changed blocks here, verify, resume replication')
    .option('--peer <name>', 'the cloud appliance (default: config `replication.peer`)')
    .option('--terminate', 'the last failback: stop the failover instance before its snapshot (so every write made in EC2 comes home), terminate it once the volume is home')
    .option('--force', 'the EC2 volume was resized: resize the local image to it (a larger device gets it on its first bytes)')
    .option('--no-keep', 'do not snapshot what the on-prem volume holds before writing over it')
    .option('--bwlimit <rate>', "cap the pulled blocks at RATE bytes per second, e.g. 10MiB; 0: no cap (default: config.yaml's replication cap)")
    .action(run(async (g, cmd, [volume]) => {
      const o = cmd.opts() as Opts;
      const optionCap = o.bwlimit === undefined ? undefined : parseSize(o.bwlimit);
      const vol = volume as string;
      const { Home } = await import('../../home.js');
      const { TandemError } = await import('../../../common/errors.js');
      const { loadConfig } = await import('../../config/index.js');
      const { getPeer, connectPeer } = await import('../../peers.js');
      const { syncVolume, configuredCap, describeCap } = await import('../../replicate.js');
      const io = currentIO();
      const home = Home.load(g.home);
      const peerName = o.peer ?? (await loadConfig(home)).replication?.peer;
      if (!peerName) throw new TandemError('ERR_USAGE', 'which appliance ran the failover? pass --peer NAME or set `replication.peer` in config.yaml');
      // The pull crosses the same WAN as replication: its cap applies unless --bwlimit says otherwise.
      const cap = optionCap === undefined ? await configuredCap(home, peerName) : null;
      const bwlimit = cap?.rate ?? optionCap ?? 0;
      if (cap) io.err(`failback: ${describeCap(cap, formatBytes)}\n`);
      const store = await home.openStore();
      try {
        const peer = await getPeer(store, peerName);
        const remote = connectPeer(peer);
        let prepare: any;
        try {
          // --terminate: the last failback. The instance is stopped before its snapshot, or the
          // writes it makes after the snapshot would be lost with it.
          io.err(`failback: ${peerName} ${o.terminate ? 'stops the instance of' : 'snapshots the EC2 volume of'} ${vol}${o.terminate ? ' (so that its snapshot holds every write), snapshots its EC2 volume' : ''} and imports the changes\n`);
          prepare = await remote.request('POST', '/v1/recovery/failback/prepare', { volume: vol, ...(o.terminate ? { stop: true } : {}) }, false);
          if (prepare.stopped) io.err(`failback: ${prepare.stopped} is stopped; should this failback fail, rerun it, or start the instance again to keep running in EC2\n`);
          io.err(`failback: ${prepare.blocksFetched} changed block(s) read from EBS into snapshot ${prepare.snapshot.id}\n`);
        } finally {
          await remote.close();
        }
        io.err(`failback: pulling and applying ${prepare.snapshot.id} onto the local volume\n`);
        const sync = await syncVolume(home, store, vol, peerName, { reverse: true, apply: true, ...(bwlimit !== 0 ? { bwlimit } : {}), ...(o.force === true ? { force: true } : {}), ...(o.keep === false ? { keep: false } : {}), onNotice: (m) => io.err(`failback: ${m}\n`) });
        if (sync.snapshot !== prepare.snapshot.id) {
          throw new TandemError('ERR_PEER_PROTOCOL', `the peer's latest snapshot of ${vol} is ${sync.snapshot}, not the failback snapshot ${prepare.snapshot.id}; something replicated to it meanwhile: rerun \`appliance failback ${vol}\``);
        }
        const remote2 = connectPeer(peer);
        let complete: any;
        try {
          complete = await remote2.request('POST', '/v1/recovery/failback/complete', { volume: vol, snapshot: prepare.snapshot.id, terminate: o.terminate === true }, false);
        } finally {
          await remote2.close();
        }
        // The cloud takes pushes of the volume again: the daemon's replication of it resumes.
        const { releaseHold } = await import('../../scheduler/state.js');
        await releaseHold(store, vol, peerName);
        const a = sync.applied;
        const text = [
          `failback of ${vol} from ${peerName}: done, verified`,
          `  EC2 snapshot ${prepare.ec2SnapshotId} of ${prepare.ec2VolumeId}: ${prepare.blocksFetched} changed block(s) (${formatBytes(prepare.bytesFetched)}) read from EBS`,
          `  pulled ${sync.blocksSent} block(s) (${formatBytes(sync.bytesSent)}); wrote ${a?.blocksWritten ?? 0} block(s) (${formatBytes(a?.bytesWritten ?? 0)}) of ${a?.blocksCompared ?? 0} compared`,
          ...(a?.keptAs ? [`  what the on-prem volume held before is kept as snapshot ${vol}@${a.keptAs}`] : []),
          complete.terminated.length ? `  terminated ${complete.terminated.join(', ')}` : o.terminate ? `  ${prepare.instanceId} is stopped; it is terminated with the failback of the last of its server's disks` : `  ${prepare.instanceId} left running: what it writes from now on stays in EC2 (a last failback passes --terminate: the instance is stopped before its snapshot, then terminated); terminate it in EC2 once it is not needed`,
          ...((complete.ebsSnapshotsDeleted ?? []).length > 0 ? [`  deleted the EBS snapshots the failbacks took of the EC2 volumes, now imported: ${complete.ebsSnapshotsDeleted.join(', ')}`] : []),
          ...((complete.ebsSnapshotsLeft ?? []) as Array<{ ebsSnapshotId: string; error: string }>).map((l) => `  could not delete EBS snapshot ${l.ebsSnapshotId} on the cloud appliance: ${l.error}; its next \`appliance retention\` tries again`),
          `  replication resumes incrementally from ${prepare.snapshot.id}`,
        ].join('\n');
        return { json: { volume: vol, peer: peerName, prepare, sync, complete }, text };
      } finally {
        await store.close();
      }
    }));
}
