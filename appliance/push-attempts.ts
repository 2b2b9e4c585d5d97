/**
 * Pushes under way or stopped midway, in the store's meta namespace `push-attempt` (key
 * `VOLUME@PEER`, value `{snapshot, at}`): written just before the engine of a push may put nodes
 * on the peer, removed once the peer holds the snapshot (the sync base is recorded then).
 *
 * A push whose snapshot was just taken on the base the peer holds lets the engine ask nothing
 * about its nodes (CopyOptions.fresh). After a push that stopped before its commit (killed, the
 * peer lost), the nodes it put are on the peer, and the rerun's snapshot may share most of them:
 * a push that finds the record asks about each node as usual, so none the peer stored is sent
 * twice (test/sync/kill.test.ts). Local snapshots, no-op syncs and dry runs in between put nothing
 * on the peer and keep the fast path.
 *
 * Written without fsync: a kill -9 keeps it (the OS has the write). A power loss that loses it
 * only makes the rerun send some nodes the peer has, which it takes as no-ops.
 */
import type { Store } from '../store/index.js';
import type { SnapshotRecord } from '../store/types.js';

export const PUSH_ATTEMPT_NS = 'push-attempt';

type MetaStore = Pick<Store, 'getMeta' | 'putMeta' | 'deleteMeta'>;

export interface PushAttempt {
  readonly snapshot: string;
  /** When the push's engine started, ISO. */
  readonly at: string;
}

function key(volume: string, peer: string): string {
  return `${volume}@${peer}`;
}

/**
 * Record that a push of `snap` to `peer` is about to put nodes there. Returns the earlier push
 * that stopped midway, if there was one (then the engine must ask about nodes: not `fresh`).
 */
export async function beginPush(store: MetaStore, volume: string, peer: string, snap: SnapshotRecord): Promise<PushAttempt | undefined> {
  const earlier = await store.getMeta<PushAttempt>(PUSH_ATTEMPT_NS, key(volume, peer));
  const now: PushAttempt = { snapshot: snap.id, at: new Date().toISOString() };
  await store.putMeta(PUSH_ATTEMPT_NS, key(volume, peer), now, { sync: false });
  return earlier;
}

/** The peer holds the pushed snapshot: no push of `volume` to `peer` is unfinished. */
export async function endPush(store: MetaStore, volume: string, peer: string): Promise<void> {
  await store.deleteMeta(PUSH_ATTEMPT_NS, key(volume, peer), { sync: false });
}
