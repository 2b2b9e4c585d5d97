/**
 * The real job steps: snapshot through appliance/ops, push through the sync engine to the
 * configured peer, export through appliance/ebs. Kept apart from the runner so the runner can
 * be driven with any implementation of the same contract.
 *
 * A job's snapshots and their pushes overlap as in `appliance sync` (sync/early.ts): when the
 * runner says a snapshot goes to a peer (`replicateTo`), the snapshot step connects to the peer
 * and sends the new blocks while the volume is scanned, and the replicate step that pushes that
 * snapshot takes over the connection and what the peer is known to hold ({@link EarlyPush}). The
 * runner's `endJob` closes those of a job that ends before its pushes.
 */
import type { Store } from '../../store/index.js';
import type { SnapshotRecord } from '../../store/types.js';
import type { Home } from '../home.js';
import type { Config } from '../config/index.js';
import type { JobSteps } from './runner.js';
import type { Rate } from '../../sync/bwlimit.js';
import type { RemotePeer } from '../../api/client.js';
import type { EarlySender } from '../../sync/early.js';

/**
 * Early sending of a job's snapshot to the replication peer, started by its snapshot step: the
 * connection (opened while the volume is scanned) and the sender, which the replicate step ends
 * under the peer's lease before its engine runs.
 */
export interface EarlyPush {
  readonly peer: string;
  readonly remote: RemotePeer;
  readonly sender: EarlySender;
}

/**
 * Connect to `peerName` and start early sending into it. Null when the peer is not known here:
 * the snapshot goes on, and the replicate step reports what is wrong.
 */
async function startEarlyPush(store: Store, peerName: string, bwlimit: Rate): Promise<EarlyPush | null> {
  const { getPeer, connectPeer } = await import('../peers.js');
  const { EarlySender } = await import('../../sync/early.js');
  let remote: RemotePeer;
  try {
    remote = connectPeer(await getPeer(store, peerName), bwlimit ? { bwlimit } : {});
  } catch {
    return null;
  }
  // Failures stop early sending only (the peer refusing, gone): the push meets them itself.
  remote.warmUp();
  return { peer: peerName, remote, sender: new EarlySender(store, remote) };
}

/** Give an early push up: its streams stop after the frame in flight, its connection closes. */
async function endEarlyPush(e: EarlyPush): Promise<void> {
  await e.sender.finish(false);
  await e.remote.close().catch(() => undefined);
}

/**
 * Push an existing snapshot to a peer, under the volume lock and the peer's lease, recording
 * the sync base like `appliance sync` does. Unlike `syncVolume` it does not take a snapshot of
 * its own: a group's snapshots must be the ones taken between the group's hooks.
 */
export async function pushSnapshot(
  home: Home,
  store: Store,
  snap: SnapshotRecord,
  peerName: string,
  opts: { bwlimit?: Rate; signal?: AbortSignal; early?: EarlyPush } = {},
): Promise<{ bytesSent: number; bytesSentEarly: number; blocksSentEarly: number; upToDate: boolean; peerRepaired: number; peerNodesRepaired: number }> {
  const { getPeer, connectPeer } = await import('../peers.js');
  const { pushTaken } = await import('../replicate.js');
  const { recordSyncBase } = await import('../sync-base.js');
  const early = opts.early;
  let release: (() => void) | undefined;
  let remote: RemotePeer | undefined;
  try {
    const peer = await getPeer(store, peerName);
    release = home.lockVolume(snap.volume, 'sync');
    remote = early?.remote ?? connectPeer(peer, opts.bwlimit ? { bwlimit: opts.bwlimit } : {});
    // As `appliance sync` pushes once its scan is over: the lease, early sending's tail, the engine.
    const { lock, held, copy } = await pushTaken(home, store, remote, snap, peer.name, { early: early?.sender ?? null, ...(opts.signal ? { signal: opts.signal } : {}) });
    const bytesSent = copy?.bytesSent ?? 0;
    const { checkRecoveryFacts } = await import('../recovery-facts.js');
    await recordSyncBase(store, snap.volume, peer.name, held, 'push', snap, checkRecoveryFacts(lock.recovery));
    // What the peer's verify found damaged is healed with our copies on the same connection
    // (appliance/repair.ts). The lock answer says whether there is any (`damaged`): no request
    // when there is none; a peer that does not say is asked. A failure here is not the sync's:
    // it is tried again with the next one.
    let peerRepaired = 0;
    let peerNodesRepaired = 0;
    if (lock.damaged !== 0) {
      try {
        const { pushRepairsTo } = await import('../repair.js');
        const r = await pushRepairsTo(store, remote, peer.name);
        peerRepaired = r.blocksRepaired;
        peerNodesRepaired = r.nodesRepaired;
      } catch {
        /* an older peer without GET /v1/damage, or one that went away */
      }
    }
    const bytesSentEarly = early?.sender.bytes ?? 0;
    return { bytesSent: bytesSent + bytesSentEarly, bytesSentEarly, blocksSentEarly: early?.sender.blocks ?? 0, upToDate: held !== snap, peerRepaired, peerNodesRepaired };
  } finally {
    if (early) await early.sender.finish(false); // given up if the push failed first
    await remote?.releaseVolume().catch(() => {});
    await (remote ?? early?.remote)?.close();
    release?.();
  }
}

/** Job steps wired to this appliance. `config()` is the scheduler's current configuration. */
export function applianceSteps(home: Home, store: Store, config: () => Config | null): JobSteps {
  /** The cap of config replication.bwlimit, or of its schedule's window (followed as the push runs). */
  const replicationCap = async (): Promise<Rate> => {
    const { replicationRate, hasSchedule } = await import('../config/bwlimit.js');
    const replication = config()?.replication;
    return hasSchedule(replication) ? () => replicationRate(config()?.replication, new Date()) : replicationRate(replication, new Date());
  };
  /**
   * Early pushes their snapshot steps started, by volume, until the replicate step of that
   * snapshot takes one over, or its job ends without (stopped, failed: `endJob`).
   */
  const earlyPushes = new Map<string, { push: EarlyPush; snapshot: string }>();
  const takeEarly = (volume: string) => {
    const e = earlyPushes.get(volume);
    earlyPushes.delete(volume);
    return e;
  };
  return {
    snapshot: async (volume, { labels, signal, replicateTo }) => {
      const { snapshotVolume } = await import('../ops.js');
      const stale = takeEarly(volume);
      if (stale) await endEarlyPush(stale.push);
      // The early pushes still streaming (a group's volumes scanned before this one) go on from
      // the packs: one pool of copies at a time.
      if (replicateTo !== undefined) for (const e of earlyPushes.values()) e.push.sender.stopCopying();
      const early = replicateTo === undefined ? null : await startEarlyPush(store, replicateTo, await replicationCap());
      const sender = early?.sender;
      let snap: SnapshotRecord;
      try {
        snap = await snapshotVolume(home, store, volume, {
          labels,
          signal,
          ...(sender ? { onNewBlocks: (h, direct, replaced, views, kept, patches) => sender.add(h, direct, replaced, views, kept, patches), keepViewsUntil: sender.done, onScanned: () => sender.scanned() } : {}),
        });
      } catch (e) {
        if (early) await endEarlyPush(early);
        throw e;
      }
      if (early) earlyPushes.set(volume, { push: early, snapshot: snap.id });
      return snap;
    },
    endJob: async (volumes) => {
      for (const v of volumes) {
        const left = takeEarly(v);
        if (left) await endEarlyPush(left.push);
      }
    },
    replicate: async (volume, snap, peer, signal) => {
      const e = takeEarly(volume);
      const early = e && e.snapshot === snap.id && e.push.peer === peer ? e.push : undefined;
      if (e && !early) await endEarlyPush(e.push); // for another snapshot or peer
      const r = await pushSnapshot(home, store, snap, peer, { signal, bwlimit: await replicationCap(), ...(early ? { early } : {}) });
      return { bytesSent: r.bytesSent, bytesSentEarly: r.bytesSentEarly, blocksSentEarly: r.blocksSentEarly, peerRepaired: r.peerRepaired, peerNodesRepaired: r.peerNodesRepaired };
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
      const r = await exportSnapshot(store, snap, { signal, appliance: home.identity.name });
      return { ebsSnapshotId: r.ebsSnapshotId, bytesUploaded: r.bytesUploaded, seconds: r.seconds };
    },
  };
}
