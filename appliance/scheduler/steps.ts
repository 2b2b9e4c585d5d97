/**
 * The real job steps: snapshot through appliance/ops, push through the sync engine to the
 * configured peer, export through appliance/ebs. Kept apart from the runner so the runner can
 * be driven with any implementation of the same contract.
 */
import type { Store } from '../../store/index.js';
import type { SnapshotRecord } from '../../store/types.js';
import type { Home } from '../home.js';
import type { Config } from '../config/index.js';
import type { JobSteps } from './runner.js';
import type { Rate } from '../../sync/bwlimit.js';

/**
 * Push an existing snapshot to a peer, under the volume lock and the peer's lease, recording
 * the sync base like `appliance sync` does. Unlike `syncVolume` it does not take a snapshot of
 * its own: a group's snapshots must be the ones taken between the group's hooks.
 */
export async function pushSnapshot(home: Home, store: Store, snap: SnapshotRecord, peerName: string, opts: { bwlimit?: Rate; signal?: AbortSignal } = {}): Promise<{ bytesSent: number; upToDate: boolean; peerRepaired: number; peerNodesRepaired: number }> {
  const { getPeer, connectPeer } = await import('../peers.js');
  const { copySnapshot, heldBase } = await import('../../sync/engine.js');
  const { beginPush } = await import('../push-attempts.js');
  const { recordSyncBase } = await import('../sync-base.js');
  const peer = await getPeer(store, peerName);
  const release = home.lockVolume(snap.volume, 'sync');
  const remote = connectPeer(peer, opts.bwlimit ? { bwlimit: opts.bwlimit } : {});
  try {
    const lock = await remote.lockVolume(snap.volume, home.identity.id, { ifRoot: snap.root });
    let bytesSent = 0;
    let held = snap;
    if (lock.upToDate && lock.latest) held = lock.latest;
    else {
      // The peer's latest, when this store has it too, is the base `appliance sync` uses
      // (replicate.ts): changed blocks go as deltas of the blocks they replaced, and the engine
      // asks about nothing else: the peer lacks `snap` (the lock found its latest elsewhere).
      // After a push that stopped midway it asks about nodes too (appliance/push-attempts.ts).
      const base = await heldBase(store, lock.latest);
      const resumed = await beginPush(store, snap.volume, peer.name, snap);
      bytesSent = (await copySnapshot(store, remote, snap, { base, fresh: resumed === undefined, ...(opts.signal ? { signal: opts.signal } : {}) })).bytesSent;
    }
    await recordSyncBase(store, snap.volume, peer.name, held, 'push');
    // What the peer's verify found damaged is healed with our copies on the same connection
    // (appliance/repair.ts): one request when there is nothing to heal. A failure here is not
    // the sync's: it is tried again with the next one.
    let peerRepaired = 0;
    let peerNodesRepaired = 0;
    try {
      const { pushRepairsTo } = await import('../repair.js');
      const r = await pushRepairsTo(store, remote, peer.name);
      peerRepaired = r.blocksRepaired;
      peerNodesRepaired = r.nodesRepaired;
    } catch {
      /* an older peer without GET /v1/damage, or one that went away */
    }
    return { bytesSent, upToDate: held !== snap, peerRepaired, peerNodesRepaired };
  } finally {
    await remote.releaseVolume().catch(() => {});
    await remote.close();
    release();
  }
}

/** Job steps wired to this appliance. `config()` is the scheduler's current configuration. */
export function applianceSteps(home: Home, store: Store, config: () => Config | null): JobSteps {
  return {
    snapshot: async (volume, { labels, signal }) => {
      const { snapshotVolume } = await import('../ops.js');
      return snapshotVolume(home, store, volume, { labels, signal });
    },
    replicate: async (_volume, snap, peer, signal) => {
      // The cap of config replication.bwlimit, or of its schedule's window (followed as the push runs).
      const { replicationRate, hasSchedule } = await import('../config/bwlimit.js');
      const replication = config()?.replication;
      const bwlimit: Rate = hasSchedule(replication) ? () => replicationRate(config()?.replication, new Date()) : replicationRate(replication, new Date());
      const r = await pushSnapshot(home, store, snap, peer, { signal, bwlimit });
      return { bytesSent: r.bytesSent, peerRepaired: r.peerRepaired, peerNodesRepaired: r.peerNodesRepaired };
    },
    pushRefusal: async (volume, peerName) => {
      const { getPeer, connectPeer } = await import('../peers.js');
      const { askPushLock } = await import('../replicate.js');
      const { HOLD_CODES } = await import('./runner.js');
      const { isTandemError } = await import('../../common/errors.js');
      const remote = connectPeer(await getPeer(store, peerName));
      try {
        await askPushLock(remote, volume, home.identity.id);
        return null;
      } catch (e) {
        if (isTandemError(e) && HOLD_CODES.has(e.code)) return { code: e.code, message: e.message };
        throw e;
      } finally {
        await remote.close();
      }
    },
    exportEbs: async (_volume, snap, signal) => {
      const { exportSnapshot } = await import('../ebs/index.js');
      const r = await exportSnapshot(store, snap, { signal });
      return { ebsSnapshotId: r.ebsSnapshotId, bytesUploaded: r.bytesUploaded, seconds: r.seconds };
    },
  };
}
