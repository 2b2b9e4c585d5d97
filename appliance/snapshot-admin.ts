/**
 * An operator's hand on single snapshots: hold one (retention, `snapshots --delete` and
 * `volume remove` leave it alone until it is released), and delete chosen ones.
 *
 * Holds live in meta namespace `holds`, key `VOL@ID`, value {@link SnapshotHold}; retention
 * treats them as pins (policy/apply.ts). A hold is this appliance's: the other appliance keeps
 * its own copy by its own retention, so hold the snapshot there too when it matters (the
 * last clean point before ransomware, an audit point).
 *
 * Deleting is all or nothing over the ids given: each is checked first (exists, not held, not
 * pinned by a transfer that builds on it, not the newest), then each record is deleted. A crash
 * part-way leaves the rest to delete on a rerun (an id already gone is reported as such). Space
 * comes back at `appliance gc`.
 */
import { TandemError } from '../common/errors.js';
import type { SnapshotRecord, Store } from '../store/index.js';
import type { Home } from './home.js';
import { snapshotPins } from './policy/index.js';

export const HOLDS_NS = 'holds';

export interface SnapshotHold {
  readonly snapshot: string;
  readonly reason: string;
  /** When it was held, ISO. */
  readonly at: string;
}

/** Longest hold reason: it is shown in listings, not a document store. */
export const MAX_REASON_LENGTH = 200;

const holdKey = (volume: string, id: string) => `${volume}@${id}`;

async function requireSnapshot(store: Store, volume: string, id: string): Promise<SnapshotRecord> {
  if (!(await store.getVolume(volume))) {
    throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${volume}"; see \`appliance volume list\``, { details: { volume } });
  }
  const snap = await store.getSnapshot(volume, id);
  if (!snap) throw new TandemError('ERR_SNAPSHOT_NOT_FOUND', `volume ${volume} has no snapshot ${id}; see \`appliance snapshots ${volume}\``, { details: { volume, snapshot: id } });
  return snap;
}

/** The holds of `volume`, by snapshot id. */
export async function listHolds(store: Pick<Store, 'listMeta'>, volume: string): Promise<Map<string, SnapshotHold>> {
  const out = new Map<string, SnapshotHold>();
  for (const [key, h] of await store.listMeta<SnapshotHold>(HOLDS_NS)) {
    if (key.startsWith(`${volume}@`)) out.set(h.snapshot, h);
  }
  return out;
}

/** Hold snapshot `id` of `volume` (again: the reason is replaced). */
export async function holdSnapshot(store: Store, volume: string, id: string, reason: string): Promise<SnapshotHold> {
  if (reason.length > MAX_REASON_LENGTH || /[\u0000-\u001f]/.test(reason)) {
    throw new TandemError('ERR_USAGE', `--reason must be one line of at most ${MAX_REASON_LENGTH} characters`);
  }
  await requireSnapshot(store, volume, id);
  const hold: SnapshotHold = { snapshot: id, reason, at: new Date().toISOString() };
  await store.putMeta(HOLDS_NS, holdKey(volume, id), hold);
  return hold;
}

/** Release the hold on snapshot `id` of `volume`; false when it was not held. */
export async function releaseSnapshot(store: Store, volume: string, id: string): Promise<boolean> {
  const held = (await store.getMeta<SnapshotHold>(HOLDS_NS, holdKey(volume, id))) !== undefined;
  if (!held) {
    await requireSnapshot(store, volume, id);
    return false;
  }
  await store.deleteMeta(HOLDS_NS, holdKey(volume, id));
  return true;
}

/**
 * For `volume remove`: refuse a volume that has held snapshots (ERR_SNAPSHOT_HELD), unless
 * `force`, which forgets its holds.
 */
export async function releaseHoldsOfRemoved(store: Store, volume: string, force: boolean): Promise<void> {
  const holds = [...(await listHolds(store, volume)).values()];
  if (holds.length === 0) return;
  if (!force) {
    throw new TandemError(
      'ERR_SNAPSHOT_HELD',
      `volume ${volume} has ${holds.length} held snapshot(s) (${holds.map((h) => h.snapshot + (h.reason ? ` "${h.reason}"` : '')).join(', ')}); nothing was removed. Release them with \`appliance snapshots ${volume} --release ID\` first, or remove the volume with its holds with \`appliance volume remove ${volume} --force\``,
      { details: { volume, held: holds.map((h) => h.snapshot) } },
    );
  }
  for (const h of holds) await store.deleteMeta(HOLDS_NS, holdKey(volume, h.snapshot));
}

export interface DeleteResult {
  readonly volume: string;
  readonly deleted: string[];
}

/**
 * Delete snapshots `ids` of `volume` under the volume lock. Refused, with nothing deleted, when
 * one is missing (ERR_SNAPSHOT_NOT_FOUND), held (ERR_SNAPSHOT_HELD, even with `force`), or, unless
 * `force`, the newest (the latest recovery point) or one a transfer builds on (ERR_SNAPSHOT_IN_USE:
 * deleting a base makes the next sync compare whole trees and the next EBS export upload every
 * block).
 */
export async function deleteSnapshots(home: Home, store: Store, volume: string, ids: readonly string[], opts: { force?: boolean } = {}): Promise<DeleteResult> {
  const release = home.lockVolume(volume, 'snapshots --delete');
  try {
    const unique = [...new Set(ids)];
    for (const id of unique) await requireSnapshot(store, volume, id);
    const holds = await listHolds(store, volume);
    const held = unique.filter((id) => holds.has(id));
    if (held.length > 0) {
      throw new TandemError(
        'ERR_SNAPSHOT_HELD',
        `${held.map((id) => `${volume}@${id}${holds.get(id)!.reason ? ` ("${holds.get(id)!.reason}")` : ''}`).join(', ')} ${held.length === 1 ? 'is' : 'are'} held; nothing was deleted. Release a hold with \`appliance snapshots ${volume} --release ID\` first`,
        { details: { volume, held } },
      );
    }
    if (opts.force !== true) {
      const pins = await snapshotPins(store, volume);
      const newest = (await store.latestSnapshot(volume))?.id;
      const inUse = unique.flatMap((id) => {
        const why = [...(id === newest ? ['the newest snapshot (the latest recovery point)'] : []), ...(pins.get(id) ?? [])];
        return why.length > 0 ? [{ id, why }] : [];
      });
      if (inUse.length > 0) {
        throw new TandemError(
          'ERR_SNAPSHOT_IN_USE',
          `${inUse.map((u) => `${volume}@${u.id} is ${u.why.join(' and ')}`).join('; ')}; nothing was deleted. Add --force to delete anyway (a deleted base costs the next transfer its increment: a sync then compares whole trees, an EBS export uploads every block)`,
          { details: { volume, inUse: inUse.map((u) => ({ snapshot: u.id, why: u.why })) } },
        );
      }
    }
    await store.deleteSnapshots(volume, unique); // all or none, also under a crash
    return { volume, deleted: unique };
  } finally {
    release();
  }
}
