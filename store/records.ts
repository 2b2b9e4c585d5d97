/**
 * Validation and canonical JSON of snapshot and volume records, which come from our own code,
 * from peers and from operators: bad input is refused before anything is written.
 */
import { TandemError } from '../common/errors.js';
import { MAX_BLOCK_SIZE, parseHex } from './hash.js';
import { checkSnapshotId, checkVolumeName } from './ids.js';
import { blockCount, treeHeight } from './tree.js';
import type { SnapshotRecord, VolumeRecord } from './types.js';


/** 512 KiB: the EBS direct API block size, so EBS import/export maps blocks one to one. */
export const DEFAULT_BLOCK_SIZE = 524288;

/** Smallest block size: one disk sector. */
export const MIN_BLOCK_SIZE = 512;

export function checkBlockSize(n: unknown): number {
  if (typeof n !== 'number' || !Number.isInteger(n) || n < MIN_BLOCK_SIZE || n > MAX_BLOCK_SIZE || n % MIN_BLOCK_SIZE !== 0) {
    throw new TandemError('ERR_BLOCK_SIZE_INVALID', `block size ${n} is not supported: use a multiple of 512 bytes up to 16 MiB (default 512 KiB)`, { details: { blockSize: n } });
  }
  return n;
}

export function checkSize(n: unknown): number {
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
    throw new TandemError('ERR_BAD_REQUEST', `volume size ${n} is not a non-negative integer number of bytes`, { details: { size: n } });
  }
  return n;
}

function bad(msg: string, details: Record<string, unknown>): TandemError {
  return new TandemError('ERR_BAD_REQUEST', msg, { details });
}

function isIsoTime(s: unknown): s is string {
  return typeof s === 'string' && s.length <= 40 && !Number.isNaN(Date.parse(s));
}

function checkLabels(l: unknown): Record<string, string> | undefined {
  if (l === undefined) return undefined;
  if (typeof l !== 'object' || l === null || Array.isArray(l) || !Object.values(l).every((v) => typeof v === 'string')) {
    throw bad('snapshot labels must be an object of strings', { labels: l });
  }
  return { ...(l as Record<string, string>) };
}

/** Validate a snapshot record and return it in canonical form (fixed key order). */
export function normalizeSnapshot(r: SnapshotRecord): SnapshotRecord {
  if (typeof r !== 'object' || r === null) throw bad('a snapshot record must be an object', {});
  const id = checkSnapshotId(r.id);
  const volume = checkVolumeName(r.volume);
  const size = checkSize(r.size);
  const blockSize = checkBlockSize(r.blockSize);
  if (!parseHex(r.root)) throw bad(`snapshot ${id}: root must be 64 lowercase hex digits`, { snapshot: id, root: r.root });
  const height = treeHeight(blockCount(size, blockSize));
  if (r.height !== height) throw bad(`snapshot ${id}: height ${r.height} does not fit size ${size} with block size ${blockSize} (expected ${height})`, { snapshot: id, height: r.height });
  if (!isIsoTime(r.created)) throw bad(`snapshot ${id}: created must be an ISO-8601 time`, { snapshot: id, created: r.created });
  if (r.parent !== null && r.parent !== undefined) checkSnapshotId(r.parent);
  if (typeof r.origin !== 'string' || r.origin.length === 0 || r.origin.length > 200) throw bad(`snapshot ${id}: origin must be a short non-empty string`, { snapshot: id });
  const blocks = blockCount(size, blockSize);
  if (!Number.isInteger(r.nonZeroBlocks) || r.nonZeroBlocks < 0 || r.nonZeroBlocks > blocks) {
    throw bad(`snapshot ${id}: nonZeroBlocks must be an integer from 0 to ${blocks}`, { snapshot: id, nonZeroBlocks: r.nonZeroBlocks });
  }
  const labels = checkLabels(r.labels);
  return {
    id, volume, size, blockSize, root: r.root, height, created: r.created, parent: r.parent ?? null, origin: r.origin,
    nonZeroBlocks: r.nonZeroBlocks, ...(labels ? { labels } : {}),
  };
}

export function normalizeVolume(v: VolumeRecord): VolumeRecord {
  if (typeof v !== 'object' || v === null) throw bad('a volume record must be an object', {});
  const name = checkVolumeName(v.name);
  const blockSize = checkBlockSize(v.blockSize);
  const size = checkSize(v.size);
  if (!isIsoTime(v.created)) throw bad(`volume ${name}: created must be an ISO-8601 time`, { volume: name });
  if (v.path !== undefined && (typeof v.path !== 'string' || v.path.length === 0)) throw bad(`volume ${name}: path must be a non-empty string`, { volume: name });
  if (v.policy !== undefined && typeof v.policy !== 'string') throw bad(`volume ${name}: policy must be a string`, { volume: name });
  if (v.tags !== undefined && (!Array.isArray(v.tags) || !v.tags.every((t) => typeof t === 'string'))) throw bad(`volume ${name}: tags must be strings`, { volume: name });
  if (v.materializing !== undefined && (typeof v.materializing !== 'object' || v.materializing === null || typeof v.materializing.snapshot !== 'string' || !isIsoTime(v.materializing.since))) {
    throw bad(`volume ${name}: materializing must be { snapshot, since }`, { volume: name });
  }
  return {
    name, ...(v.path !== undefined ? { path: v.path } : {}), blockSize, size,
    ...(v.policy !== undefined ? { policy: v.policy } : {}), ...(v.tags !== undefined ? { tags: [...v.tags] } : {}),
    created: v.created, ...(v.materializing !== undefined ? { materializing: { snapshot: v.materializing.snapshot, since: v.materializing.since } } : {}),
  };
}

export function sameJson(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}
