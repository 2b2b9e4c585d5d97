/**
 * Snapshot ids and names: validation of what becomes part of an index key.
 */
import { randomBytes } from 'node:crypto';
import { TandemError } from '../common/errors.js';

/**
 * A new time-sortable snapshot id: UTC time to the millisecond, then 6 random hex digits so two
 * appliances (or two snapshots in one millisecond) never collide, e.g. `20261125T093012.345Z-3fa9c1`.
 * Ids sort by time as plain strings, which is the order of the index keys.
 */
export function newSnapshotId(at: Date = new Date()): string {
  const iso = at.toISOString(); // 2026-11-25T09:30:12.345Z
  const compact = iso.replace(/[-:]/g, '');
  return `${compact}-${randomBytes(3).toString('hex')}`;
}

/** The time a {@link newSnapshotId} id was made from (ms since the epoch), or undefined for an id of another form. */
export function snapshotIdTime(id: string): number | undefined {
  const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})\.(\d{3})Z-/.exec(id);
  if (!m) return undefined;
  const t = Date.parse(`${m[1]}-${m[2]}-${m[3]}T${m[4]}:${m[5]}:${m[6]}.${m[7]}Z`);
  return Number.isNaN(t) ? undefined : t;
}

/**
 * How far ahead of this appliance's clock a snapshot received from a peer may be dated. The
 * latest snapshot of a volume is the one whose id sorts last: a snapshot dated ahead (a peer's
 * clock set wrong, even once) would stay the latest, and the one a restore or failover takes,
 * until this clock passed its date, whatever was replicated after it.
 */
export const MAX_SNAPSHOT_AHEAD_MS = 10 * 60_000;

/**
 * Check a snapshot record that a peer sent (pushed to this appliance, or pulled from it): its id
 * is a {@link newSnapshotId} id dated at most {@link MAX_SNAPSHOT_AHEAD_MS} after `now`.
 */
export function checkReceivedSnapshotId(id: string, now: number = Date.now()): void {
  const at = snapshotIdTime(id);
  if (at === undefined) {
    throw new TandemError('ERR_SNAPSHOT_INVALID', `snapshot id ${JSON.stringify(id)} is not a time-based id (e.g. 20261125T093012.345Z-3fa9c1, as appliances make them): snapshots are ordered by their ids, so one of another form is refused; nothing was committed`, { details: { snapshot: id } });
  }
  if (at > now + MAX_SNAPSHOT_AHEAD_MS) {
    const minutes = Math.round((at - now) / 60_000);
    throw new TandemError('ERR_SNAPSHOT_INVALID', `snapshot ${id} is dated ${new Date(at).toISOString()}, ${minutes} min ahead of this appliance's clock (${new Date(now).toISOString()}); it would stay the volume's latest until then. The clock of the appliance that took it is ahead, or this one is behind: set both by NTP (\`appliance doctor\` shows the difference), take a new snapshot there, and rerun; nothing was committed`, { details: { snapshot: id, aheadMs: at - now } });
  }
}

/** Volume names and snapshot ids: printable, no separators used in specs, keys or URLs. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$/;

export function isValidVolumeName(s: unknown): s is string {
  return typeof s === 'string' && NAME.test(s);
}

export function isValidSnapshotId(s: unknown): s is string {
  return typeof s === 'string' && NAME.test(s);
}

export function checkVolumeName(s: unknown): string {
  if (!isValidVolumeName(s)) {
    throw new TandemError('ERR_BAD_REQUEST', `invalid volume name ${JSON.stringify(s)}: use 1-128 letters, digits and . _ : + - (starting with a letter or digit)`, { details: { volume: s } });
  }
  return s;
}

export function checkSnapshotId(s: unknown): string {
  if (!isValidSnapshotId(s)) {
    throw new TandemError('ERR_BAD_REQUEST', `invalid snapshot id ${JSON.stringify(s)}: use 1-128 letters, digits and . _ : + -`, { details: { snapshot: s } });
  }
  return s;
}
