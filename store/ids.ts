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
