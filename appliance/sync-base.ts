/**
 * The sync base: the snapshot of a volume that this appliance and a peer both hold, recorded
 * after each sync in the store's meta namespace `sync-base` under the key `VOLUME@PEER`
 * ({snapshot, root, direction, at, point?}). The next sync in either direction is incremental
 * from it, and retention never deletes it (appliance/policy/apply.ts).
 *
 * One module for the record's namespace, key and shape: `appliance sync` (replicate.ts), the
 * daemon's pushes (scheduler/steps.ts) and status (status.ts) all go through it.
 */
import type { Store } from '../store/index.js';
import type { SnapshotRecord } from '../store/types.js';
import { PUSH_ATTEMPT_NS, endPush } from './push-attempts.js';
import type { RecoveryFacts } from './recovery-facts.js';

export const SYNC_BASE_NS = 'sync-base';

export interface SyncBase {
  readonly snapshot: string;
  readonly root: string;
  readonly direction: 'push' | 'pull';
  readonly at: string;
  /**
   * A push that found the peer up to date (its latest has the tree of the snapshot the push took
   * here, under another id): that local snapshot, whose time is the recovery point the peer
   * holds. Absent when it is `snapshot` itself, and in records of earlier versions.
   */
  readonly point?: { readonly id: string; readonly created: string };
  /**
   * After a push: what a recovery of the volume at the peer would take, as its lock answer said
   * (appliance/recovery-facts.ts); absent after a pull, from a peer that does not say, and in
   * records of earlier versions.
   */
  readonly recovery?: RecoveryFacts;
}

type MetaStore = Pick<Store, 'getMeta' | 'putMeta' | 'deleteMeta'>;

/** The meta key of `volume`'s records about `peer` (the sync base's, a push attempt's). */
export function syncBaseKey(volume: string, peer: string): string {
  return `${volume}@${peer}`;
}

export async function getSyncBase(store: Pick<Store, 'getMeta'>, volume: string, peer: string): Promise<SyncBase | undefined> {
  return store.getMeta<SyncBase>(SYNC_BASE_NS, syncBaseKey(volume, peer));
}

/**
 * Record `snap` as the sync base of `volume` with `peer` (a synced write). After a push the peer
 * holds the snapshot: no push of the volume to it is unfinished any more (push-attempts.ts).
 * `taken`: the snapshot the push took here, when the peer was up to date with it (`snap` is then
 * the peer's, of the same tree): recorded as the base's {@link SyncBase.point}. `recovery`: what
 * the peer's lock answer said of a recovery there ({@link SyncBase.recovery}).
 */
export async function recordSyncBase(
  store: MetaStore,
  volume: string,
  peer: string,
  snap: Pick<SnapshotRecord, 'id' | 'root'>,
  direction: 'push' | 'pull',
  taken?: Pick<SnapshotRecord, 'id' | 'root' | 'created'>,
  recovery?: RecoveryFacts | null,
): Promise<void> {
  // Not a pin (policy/apply.ts PIN_FIELD): retention may delete that snapshot; its time stays true.
  const point = taken && taken.id !== snap.id && taken.root === snap.root ? { point: { id: taken.id, created: taken.created } } : {};
  const base: SyncBase = { snapshot: snap.id, root: snap.root, direction, at: new Date().toISOString(), ...point, ...(recovery ? { recovery } : {}) };
  await store.putMeta(SYNC_BASE_NS, syncBaseKey(volume, peer), base);
  if (direction === 'push') await endPush(store, volume, peer);
}

/**
 * The recovery point a push's base stands for: the snapshot the peer holds of `volume`, at the
 * time it was taken here (the local snapshot the push found the peer up to date with, when it
 * did). Null for a pull's base. `status` counts it, and so does the daemon's scheduler: a push
 * by hand (`appliance sync`) to the replication peer meets the RPO as a scheduled one does.
 */
export async function pushPoint(store: Pick<Store, 'getSnapshot'>, volume: string, base: SyncBase): Promise<{ snapshot: string; at: string } | null> {
  if (base.direction !== 'push') return null;
  if (base.point) return { snapshot: base.point.id, at: base.point.created };
  const snap = await store.getSnapshot(volume, base.snapshot);
  return { snapshot: base.snapshot, at: snap?.created ?? base.at };
}

/**
 * Delete the records keyed `VOL@PEER` (sync bases, unfinished pushes) whose volume and peer
 * `matches` accepts: what `peer remove` and `volume remove` leave behind would name snapshots
 * and copies that are gone.
 */
export async function forgetSyncRecords(store: Pick<Store, 'listMeta' | 'deleteMeta'>, matches: (volume: string, peer: string) => boolean): Promise<void> {
  for (const [ns, key] of await syncRecordKeys(store, matches)) await store.deleteMeta(ns, key);
}

/** The [namespace, key] of the sync bases and push attempts whose VOL@PEER `matches`. */
export async function syncRecordKeys(store: Pick<Store, 'listMeta'>, matches: (volume: string, peer: string) => boolean): Promise<Array<readonly [string, string]>> {
  const out: Array<readonly [string, string]> = [];
  for (const ns of [SYNC_BASE_NS, PUSH_ATTEMPT_NS]) {
    for (const [key] of await store.listMeta<unknown>(ns)) {
      const at = key.indexOf('@');
      if (at > 0 && matches(key.slice(0, at), key.slice(at + 1))) out.push([ns, key]);
    }
  }
  return out;
}
