/**
 * Volume operations shared by the CLI, the API server and the scheduler: register and remove
 * volumes, snapshot a local volume, restore a snapshot onto a path.
 *
 * Locking: {@link snapshotVolume} and {@link restoreVolume} take the per-volume lock
 * (appliance/locks.ts) themselves. A CLI process, which must also open the store (one process
 * at a time), takes the lock first and calls the `...Locked` variants, so that a second
 * snapshot of the same volume fails with ERR_VOLUME_LOCKED rather than ERR_STORE_BUSY.
 */
import { rename, rm, open, statfs, readFile, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { existsSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { CONFIRMED_NS } from '../sync/protocol.js';
import { TandemError, diskFullError, fromSystemError, isTandemError } from '../common/errors.js';
import type { Home } from './home.js';
import { SOURCES_NS } from './sources.js';
import { JOB_PREFIX, RATES_NS, STATE_NS } from './scheduler/state.js';
import { syncRecordKeys } from './sync-base.js';
import type { BlockRanges, Hash, NewBlocksListener, Store, SnapshotRecord, VolumeRecord, ScanProgress } from '../store/index.js';
import { inspectVolume, loopBackingFile, openVolumeReader, openVolumeWriter, readChangedBlocksFile } from './volumes/index.js';
import { materialize, type MaterializeProgress, type MaterializeResult } from '../sync/materialize.js';

/** Volume names end up in file names, URLs and EBS tags: keep them to a safe alphabet. */
export const VOLUME_NAME = /^[A-Za-z0-9._-]{1,64}$/;
/** The EBS direct API block size; also a good read size for disks. */
export const DEFAULT_VOLUME_BLOCK_SIZE = 512 * 1024;
/** Below 4 KiB the tree and index outgrow the data; above 16 MiB one changed byte costs too much. */
export const MIN_BLOCK_SIZE = 4 * 1024;
export const MAX_BLOCK_SIZE = 16 * 1024 * 1024;
/** Suffix of the file a restore to a new path writes before renaming it into place. */
export const PARTIAL_SUFFIX = '.tandem-partial';

/**
 * What a path is on the disk: the same device under another node, or the same file under another
 * name (symlink, hard link), gets the same string; so does a loop device and the image file it
 * reads and writes (`losetup`). Null when it does not exist.
 */
async function fileIdentity(path: string): Promise<string | null> {
  try {
    const st = await stat(path, { bigint: true });
    if (!st.isBlockDevice()) return `file ${st.dev}:${st.ino}`;
    const backing = await loopBackingFile(st.rdev);
    const b = backing === null ? null : await stat(backing, { bigint: true }).catch(() => null);
    return b !== null ? `file ${b.dev}:${b.ino}` : `device ${st.rdev}`;
  } catch {
    return null;
  }
}

/**
 * The registered volume whose device or image `path` is: the same path, or the same block
 * device or file reached through another name (/dev/disk/by-id/..., a symlink, a hard link).
 */
export async function volumeAtPath(store: Store, path: string): Promise<VolumeRecord | undefined> {
  const abs = resolve(path);
  const id = await fileIdentity(abs);
  for (const v of await store.listVolumes()) {
    if (v.path === undefined) continue;
    if (resolve(v.path) === abs) return v;
    if (id !== null && (await fileIdentity(v.path)) === id) return v;
  }
  return undefined;
}

export function checkVolumeName(name: string): void {
  if (!VOLUME_NAME.test(name) || name === '.' || name === '..') {
    throw new TandemError('ERR_BAD_REQUEST', `volume name "${name}" is not valid; use 1 to 64 letters, digits, '.', '_' or '-'`, { details: { volume: name } });
  }
}

export function checkBlockSize(blockSize: number): void {
  if (!Number.isSafeInteger(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new TandemError('ERR_BLOCK_SIZE_INVALID', `block size ${blockSize} is not supported; use a power of two from 4KiB to 16MiB (default 512KiB, the EBS block size)`, {
      details: { blockSize },
    });
  }
}

async function requireVolume(store: Store, name: string): Promise<VolumeRecord> {
  const vol = await store.getVolume(name);
  if (!vol) {
    throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${name}"; see \`appliance volume list\`, or register it with \`appliance volume add ${name} --path PATH\``, {
      details: { volume: name },
    });
  }
  return vol;
}

export interface AddVolumeOptions {
  readonly name: string;
  readonly path: string;
  readonly blockSize?: number;
  readonly policy?: string;
  readonly tags?: readonly string[];
}

/**
 * Register a local device or image file. Checks everything before writing anything: the name,
 * the block size, that the path is readable (its size is recorded), that the name is free.
 *
 * A name that exists only as replicas (snapshots pulled from or pushed by a peer, no path: an
 * on-prem appliance rebuilt after a disaster that pulled its volumes back, say) is not free but
 * adoptable: the path is attached to it and its snapshots stay, so `sync --reverse --apply`
 * can write the latest onto it and replication resumes incrementally. Its block size is kept
 * (`blockSize` must be absent or equal). The path may not exist yet, if its directory does: an
 * image the apply (or a restore) then creates; until then the volume cannot be snapshotted.
 */
export async function addVolume(store: Store, opts: AddVolumeOptions): Promise<VolumeRecord> {
  checkVolumeName(opts.name);
  const existing = await store.getVolume(opts.name);
  if (existing?.path !== undefined) {
    throw new TandemError('ERR_VOLUME_EXISTS', `volume "${opts.name}" is already registered (${existing.path}); pick another name or \`appliance volume remove ${opts.name}\` first`, {
      details: { volume: opts.name, path: existing.path },
    });
  }
  if (existing && opts.blockSize !== undefined && opts.blockSize !== existing.blockSize) {
    throw new TandemError('ERR_USAGE', `volume "${opts.name}" exists as a replica with blocks of ${existing.blockSize} bytes, which its snapshots keep; omit --block-size to attach ${opts.path} to it`, {
      details: { volume: opts.name, blockSize: existing.blockSize },
    });
  }
  const blockSize = existing?.blockSize ?? opts.blockSize ?? DEFAULT_VOLUME_BLOCK_SIZE;
  checkBlockSize(blockSize);
  const path = resolve(opts.path);
  // Two volumes on one disk would each snapshot and replicate it, and a restore or failback of
  // one would overwrite the other's data under it.
  const other = await volumeAtPath(store, path);
  const restoring = await interruptedRestore(store, path);
  if (restoring !== undefined) {
    throw new TandemError('ERR_VOLUME_MATERIALIZING', `${path} is partly written: a restore of ${restoring.volume}@${restoring.snapshot} onto it started ${restoring.since} and did not complete; protecting it now would snapshot a mix of two disks. Rerun \`appliance restore ${restoring.volume}@${restoring.snapshot} --to ${path}\` (it writes only what still differs), then add it`, {
      details: { ...restoring },
    });
  }
  if (other !== undefined && other.name !== opts.name) {
    throw new TandemError('ERR_VOLUME_EXISTS', `${path} is already protected as volume "${other.name}" (${other.path}); give another path, or \`appliance volume remove ${other.name}\` first`, {
      details: { volume: other.name, path: other.path },
    });
  }
  let size: number;
  if (existing && !existsSync(path)) {
    if (!existsSync(dirname(path))) {
      throw new TandemError('ERR_VOLUME_UNREADABLE', `cannot attach ${path} to volume "${opts.name}": directory ${dirname(path)} does not exist; create it or choose another path`, { details: { path } });
    }
    size = existing.size; // the image does not exist yet: the apply creates it at the snapshot's size
  } else {
    size = (await inspectVolume(path)).size;
    // Opening proves the appliance can read it (stat alone does not check permissions).
    const reader = await openVolumeReader(path, { holeMap: false });
    await reader.close();
  }
  const record: VolumeRecord = {
    ...(existing ?? {}),
    name: opts.name,
    path,
    blockSize,
    size,
    ...(opts.policy !== undefined ? { policy: opts.policy } : {}),
    ...(opts.tags !== undefined && opts.tags.length > 0 ? { tags: [...opts.tags] } : {}),
    created: existing?.created ?? new Date().toISOString(),
  };
  await store.putVolume(record);
  return record;
}

/**
 * Unregister a volume and delete its snapshots (their space comes back at `appliance gc`).
 * Takes the volume lock so it cannot pull a volume from under a running snapshot or restore.
 */
export async function removeVolume(home: Home, store: Store, name: string, opts: { force?: boolean } = {}): Promise<VolumeRecord> {
  const vol = await requireVolume(store, name);
  const release = home.lockVolume(name, 'remove');
  try {
    // Held snapshots stay unless the operator says so (appliance/snapshot-admin.ts).
    const { releaseHoldsOfRemoved } = await import('./snapshot-admin.js');
    await releaseHoldsOfRemoved(store, name, opts.force === true);
    // With the volume and its snapshots, in one batch (all or none under a crash):
    await store.removeVolume(name, [
      // a volume received from a peer: the next push of that name may come from any appliance;
      [SOURCES_NS, name],
      [CONFIRMED_NS, name],
      // the scheduler's state of it (points, hold, pause, measured rates, a checkpointed job) was
      // about what is gone: a volume added again under the name starts afresh, not paused;
      [STATE_NS, name],
      [RATES_NS, name],
      [STATE_NS, `${JOB_PREFIX}volume:${name}`],
      // its sync bases and unfinished pushes (keys VOL@PEER) name snapshots that are gone: status
      // would count a volume added again under the name as replicated when that sync was.
      ...(await syncRecordKeys(store, (volume) => volume === name)),
    ]);
  } finally {
    release();
  }
  return vol;
}

export interface SnapshotVolumeOptions {
  /** Read only the blocks listed in this file (appliance/volumes/README.md). */
  readonly changedBlocksFile?: string;
  readonly onProgress?: (p: ScanProgress) => void;
  /** Told the hashes of blocks new to the store as the scan appends them (see SnapshotOptions). */
  readonly onNewBlocks?: NewBlocksListener;
  /** Until when onNewBlocks' `views` may be read (see SnapshotOptions). */
  readonly keepViewsUntil?: Promise<unknown>;
  /** Told when every block is read and appended, before the flush and commit (see SnapshotOptions). */
  readonly onScanned?: () => void;
  readonly labels?: Record<string, string>;
  readonly signal?: AbortSignal;
  /** Told when the snapshot cannot do what was asked and does something safe instead. */
  readonly onNotice?: (message: string) => void;
}

/** Snapshot a registered local volume, taking its lock. */
export async function snapshotVolume(home: Home, store: Store, name: string, opts: SnapshotVolumeOptions = {}): Promise<SnapshotRecord> {
  await requireVolume(store, name);
  const release = home.lockVolume(name, 'snapshot');
  try {
    return await snapshotVolumeLocked(store, name, opts);
  } finally {
    release();
  }
}

/**
 * {@link snapshotVolumeLocked} between the pre/post hooks config.yaml gives the volume (its
 * group's `hooks`, e.g. fsfreeze): what an operator's `appliance snapshot` and `appliance sync`
 * run, so a manual snapshot is as consistent as a scheduled one. A failing pre hook aborts with
 * ERR_HOOK_FAILED and no snapshot; the post hook always runs. (The scheduler runs a group's
 * hooks once around all of the group's volumes itself, and calls snapshotVolumeLocked.)
 */
export async function snapshotVolumeHooked(home: Home, store: Store, name: string, opts: SnapshotVolumeOptions = {}): Promise<SnapshotRecord> {
  // Loading the config modules (YAML parser, schema compiler) costs ~200 ms, as much as a whole
  // no-op sync: a config that names no `hooks:` key at all cannot give the volume any, so only
  // such a file is loaded and validated in full.
  const text = await readFile(home.paths.config, 'utf8').catch(() => '');
  if (!/\bhooks\s*:/.test(text)) return snapshotVolumeLocked(store, name, opts);
  const { loadConfig, hooksForVolume } = await import('./config/index.js');
  const { withHooks, runOwedPostHooks } = await import('./hooks.js');
  // A snapshot killed between its hooks (kill -9) left its post hook owed: the thaw comes first.
  const ledger = hookLedger(home);
  for (const o of await runOwedPostHooks(ledger)) {
    opts.onNotice?.(o.outcome === 'restarted'
      ? `the post hook \`${o.post}\` owed by a snapshot interrupted at ${o.since} was dropped: the machine restarted since`
      : `ran the post hook \`${o.post}\` that a snapshot interrupted at ${o.since} owed: exited ${o.run?.exitCode ?? o.run?.signal}`);
  }
  const hooks = hooksForVolume(await loadConfig(home), name);
  // A signal that runs the post hook early stops the scan before it commits (hooks.ts).
  return withHooks(hooks, (thawing) => snapshotVolumeLocked(store, name, { ...opts, signal: opts.signal ? AbortSignal.any([opts.signal, thawing]) : thawing }), {
    ledger,
    env: { TANDEM_VOLUME: name, TANDEM_VOLUMES: name },
    ...(opts.onNotice ? { onHook: (r) => opts.onNotice!(`${r.phase} hook \`${r.command}\` exited ${r.exitCode ?? r.signal} in ${r.durationMs} ms`) } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
}

/** Where the post hooks owed by snapshots between their hooks are kept (hooks.ts runOwedPostHooks). */
export function hookLedger(home: Home): string {
  return join(home.paths.run, 'hooks');
}

/**
 * Snapshot a registered local volume; the caller holds its lock. A full scan reuses the
 * parent's unchanged subtrees; with a changed-blocks file only the listed blocks are read.
 * Falls back to a full scan (and says so through `onNotice`) when there is no parent or the
 * volume changed size since the last snapshot. The size found is recorded on the volume.
 * Crash-safe: the snapshot is committed last by the store, or not at all.
 */
export async function snapshotVolumeLocked(store: Store, name: string, opts: SnapshotVolumeOptions = {}): Promise<SnapshotRecord> {
  let vol = await requireVolume(store, name);
  if (vol.materializing) {
    throw new TandemError(
      'ERR_VOLUME_MATERIALIZING',
      `volume "${name}" is being written with snapshot ${vol.materializing.snapshot} since ${vol.materializing.since}; finish that restore (rerun it) before snapshotting`,
      { details: { volume: name, ...vol.materializing } },
    );
  }
  if (vol.path === undefined) {
    throw new TandemError('ERR_VOLUME_UNREADABLE', `volume "${name}" has no local path on this appliance (it only holds replicas); restore it to a path instead`, {
      details: { volume: name },
    });
  }
  // A change list reads only its blocks: no hole map, unless the snapshot reads the whole volume after all (below).
  let reader = await openVolumeReader(vol.path, { holeMap: opts.changedBlocksFile === undefined });
  try {
    let parent = await store.latestSnapshot(name);
    if (reader.size !== vol.size) {
      vol = { ...vol, size: reader.size };
      await store.putVolume(vol);
    }
    if (parent && (parent.size !== reader.size || parent.blockSize !== vol.blockSize)) {
      opts.onNotice?.(`volume "${name}" changed size (${parent.size} -> ${reader.size} bytes): reading it all`);
      parent = null;
    }
    let changedBlocks: BlockRanges | undefined;
    if (opts.changedBlocksFile !== undefined) {
      // Parse first: a malformed file must change nothing.
      const listed = await readChangedBlocksFile(opts.changedBlocksFile, reader.size, vol.blockSize);
      if (parent) changedBlocks = listed;
      else opts.onNotice?.(`volume "${name}" has no snapshot to apply changed blocks to: reading it all`);
    }
    const common = {
      volume: name,
      blockSize: vol.blockSize,
      ...(opts.labels ? { labels: opts.labels } : {}),
      ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
      ...(opts.onNewBlocks ? { onNewBlocks: opts.onNewBlocks } : {}),
      ...(opts.keepViewsUntil ? { keepViewsUntil: opts.keepViewsUntil } : {}),
      ...(opts.onScanned ? { onScanned: opts.onScanned } : {}),
      ...(opts.onNotice ? { onNotice: opts.onNotice } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    };
    if (changedBlocks !== undefined) return await store.scanVolume(reader, { ...common, parent, changedBlocks, origin: 'changed-blocks' });
    if (opts.changedBlocksFile !== undefined) {
      const whole = await openVolumeReader(reader.path);
      await reader.close();
      reader = whole;
    }
    // A sparse image's holes (reader.holes) are not read: the scan takes them as zero blocks.
    return await store.scanVolume(reader, { ...common, parent, origin: 'scan' });
  } finally {
    await reader.close();
  }
}

export interface RestoreOptions {
  /**
   * Resize an existing image of another size, or write onto a larger device; and write onto
   * another registered volume's device or image (its lock is then taken through `lockVolume`).
   */
  readonly force?: boolean;
  /** Takes another volume's lock (Home.lockVolume): needed to restore onto its path with `force`. */
  readonly lockVolume?: (volume: string, op: string) => () => void;
  readonly onProgress?: (p: MaterializeProgress) => void;
  readonly signal?: AbortSignal;
}

export interface RestoreResult extends MaterializeResult {
  readonly snapshot: SnapshotRecord;
  readonly path: string;
  /** True when PATH did not exist and was written from scratch. */
  readonly created: boolean;
}

/** Split "VOL" / "VOL@SNAP". */
export function parseSnapshotSpec(spec: string): { volume: string; snapshot?: string } {
  const at = spec.indexOf('@');
  const volume = at < 0 ? spec : spec.slice(0, at);
  const snapshot = at < 0 ? undefined : spec.slice(at + 1);
  if (volume === '' || snapshot === '') {
    throw new TandemError('ERR_USAGE', `"${spec}" is not a snapshot; write VOL for the latest or VOL@SNAPSHOT_ID (see \`appliance snapshots VOL\`)`);
  }
  return snapshot === undefined ? { volume } : { volume, snapshot };
}

/** Restore `spec` (VOL or VOL@SNAP) onto `to`, taking the volume's lock. */
export async function restoreVolume(home: Home, store: Store, spec: string, to: string, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const { volume } = parseSnapshotSpec(spec);
  const release = home.lockVolume(volume, 'restore');
  try {
    return await restoreVolumeLocked(store, spec, to, { lockVolume: (v, op) => home.lockVolume(v, op), ...opts });
  } finally {
    release();
  }
}

/**
 * Write a snapshot onto `to`; the caller holds the volume's lock.
 *
 * - `to` absent: the image is written to `to.tandem-partial` (sparse: zero blocks are holes)
 *   and renamed to `to` only once complete and fsync'd, so a failed or killed restore never
 *   leaves a half-written file under the final name.
 * - `to` present (same size, or any size with `force`): it is read and hashed, and only the
 *   differing blocks are written in place. On a failure (e.g. a corrupt block in the store,
 *   ERR_BLOCK_CORRUPT) the blocks before the failing one are written, the rest are as they were.
 * - `to` is the volume's own registered path: the volume is marked materializing for the
 *   duration (no snapshot or sync from it); a failed restore leaves the mark, and a rerun clears it.
 * - `to` is another registered volume's device or image: refused with ERR_VOLUME_IN_USE (a typo
 *   would overwrite a protected volume), unless `force`; then that volume's lock is taken too and
 *   it is marked materializing the same way.
 */
export async function restoreVolumeLocked(store: Store, spec: string, to: string, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const snap = await store.resolveSnapshot(spec);
  const path = resolve(to);
  // The volume whose device or image `to` is, if any: it is marked while it is written.
  let vol = (await volumeAtPath(store, path)) ?? null;
  let releaseOther: (() => void) | null = null;
  if (vol !== null && vol.name !== snap.volume) {
    if (!opts.force || !opts.lockVolume) {
      throw new TandemError('ERR_VOLUME_IN_USE', `${path} is the ${vol.path === path ? 'path' : `path (as ${vol.path})`} of volume "${vol.name}": restoring ${snap.volume}@${snap.id} onto it would replace ${vol.name}'s data; nothing was written. Restore to another path, or pass --force to overwrite ${vol.name} (its snapshots are kept)`, {
        details: { path, volume: vol.name },
      });
    }
    releaseOther = opts.lockVolume(vol.name, 'restore');
    // Read again under its lock: a job that held it may have changed the record.
    vol = await store.getVolume(vol.name);
  }
  try {
    return await restoreOnto(store, snap, path, vol, opts);
  } finally {
    releaseOther?.();
  }
}

/**
 * Mark `vol` as being written with `snapshot` (materializing: no snapshot or sync of it until the
 * mark is cleared), once however often it is called: given to openVolumeWriter as `beforeChange`
 * and called again before the first write, so the mark is durable before the volume changes.
 */
export function materializingMark(store: Store, vol: VolumeRecord, snapshot: string): () => Promise<void> {
  let marked = false;
  return async () => {
    if (marked) return;
    await store.putVolume({ ...vol, materializing: { snapshot, since: new Date().toISOString() } });
    marked = true;
  };
}

/**
 * Meta namespace of restores writing in place onto an existing image or device that is no
 * volume's: keyed by the SHA-256 of the path (meta keys are at most 512 characters), the value an
 * {@link InterruptedRestore}. Written (synced) before the first byte of the target changes and
 * deleted when a restore onto that path completes, so one that is left names a target that a
 * killed or failed restore left partly written: doctor says so, and `volume add` refuses to
 * protect it until a restore onto it completes.
 */
export const RESTORING_NS = 'restoring';

/** A restore in place that has not completed (see {@link RESTORING_NS}). */
export interface InterruptedRestore {
  readonly path: string;
  readonly volume: string;
  readonly snapshot: string;
  readonly since: string;
}

function restoringKey(path: string): string {
  return createHash('sha256').update(path).digest('hex');
}

/** The restore in place onto `path` that has not completed, if any. */
export async function interruptedRestore(store: Pick<Store, 'getMeta'>, path: string): Promise<InterruptedRestore | undefined> {
  return store.getMeta<InterruptedRestore>(RESTORING_NS, restoringKey(resolve(path)));
}

/** {@link restoreVolumeLocked} once the target is known: `vol` is the volume whose path it is, if any. */
async function restoreOnto(store: Store, snap: SnapshotRecord, path: string, vol: VolumeRecord | null, opts: RestoreOptions): Promise<RestoreResult> {
  const ownPath = vol !== null;
  const exists = existsSync(path);
  const target = exists ? path : path + PARTIAL_SUFFIX;
  if (!exists) {
    if (!existsSync(dirname(path))) {
      throw new TandemError('ERR_VOLUME_UNREADABLE', `cannot restore to ${path}: directory ${dirname(path)} does not exist; create it or choose another path`, { details: { path } });
    }
    // A partial file is only ever left by an earlier failed restore to the same path.
    await rm(target, { force: true });
  }
  // The volume is marked before its image changes: before it is created or resized (beforeChange), else
  // before the first block is written. A restore killed at any point after leaves the mark.
  // An existing image or device that is no volume's is written in place too: the mark is a meta record.
  const restoring: InterruptedRestore = { path, volume: snap.volume, snapshot: snap.id, since: new Date().toISOString() };
  let pathMarked = false;
  const mark = vol
    ? materializingMark(store, vol, snap.id)
    : exists
      ? async () => {
          if (pathMarked) return;
          await store.putMeta(RESTORING_NS, restoringKey(path), restoring);
          pathMarked = true;
        }
      : async () => undefined;
  const writer = await openVolumeWriter(target, snap.size, { ...(opts.force ? { force: true } : {}), beforeChange: mark });
  let ok = false;
  try {
    await mark();
    const result = await materialize(store, snap, writer, {
      assumeZero: writer.created,
      ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    await writer.close();
    if (!exists) {
      try {
        await rename(target, path);
        await fsyncDir(dirname(path));
      } catch (e) {
        throw fromSystemError(e, `renaming ${target} to ${path}`);
      }
    }
    if (ownPath && vol) {
      const { materializing: _done, ...rest } = vol;
      await store.putVolume(rest);
    }
    // Complete: the record of this restore, or of an earlier one onto the path that did not finish.
    if (pathMarked || (exists && (await interruptedRestore(store, path)) !== undefined)) await store.deleteMeta(RESTORING_NS, restoringKey(path));
    ok = true;
    return { ...result, snapshot: snap, path, created: !exists };
  } catch (e) {
    if (isTandemError(e, 'ERR_BLOCK_CORRUPT') || isTandemError(e, 'ERR_BLOCK_MISSING') || isTandemError(e, 'ERR_STORE_CORRUPT')) {
      const where = exists
        ? `${path} is partly restored: the blocks before block ${String(e.details.index ?? '?')} hold the snapshot, the rest are as they were`
        : `nothing was written to ${path}`;
      throw new TandemError(e.code, `${e.message}; ${where}. Heal the store with good copies from the paired appliance (\`appliance repair --peer NAME\`) or restore another snapshot`, { cause: e, details: e.details });
    }
    if (isTandemError(e, 'ERR_DISK_FULL')) {
      const where = exists ? `${path} is partly restored; rerun once there is space (it writes only what still differs)` : `nothing was left at ${path}`;
      throw new TandemError('ERR_DISK_FULL', `no space left on the disk of ${path} for ${snap.volume}@${snap.id} (${snap.size} bytes, fewer where it has zero blocks); ${where}. Free space there or restore to another disk`, { cause: e, details: { path } });
    }
    throw e;
  } finally {
    if (!ok) {
      await writer.close().catch(() => undefined);
      if (!exists) await rm(target, { force: true }).catch(() => undefined);
    }
  }
}

/** Make a rename durable: fsync the directory holding the entry. */
async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Run `fn` with the home at `homeDir` and its store open, closing the store afterwards.
 * With `lock`, the volume lock is taken before the store is opened (see the module comment)
 * and released after it is closed.
 */
export async function withHomeStore<T>(
  homeDir: string,
  fn: (home: Home, store: Store) => Promise<T>,
  lock?: { readonly volume: string; readonly op: string },
): Promise<T> {
  const { Home } = await import('./home.js');
  const home = Home.load(homeDir);
  if (lock) checkVolumeName(lock.volume);
  const release = lock ? home.lockVolume(lock.volume, lock.op) : () => undefined;
  try {
    const store = await home.openStore();
    try {
      return await fn(home, store);
    } finally {
      await store.close().catch(() => undefined);
    }
  } catch (e) {
    throw diskFullError(e, `the disk of the store ${home.paths.store}`, 'free space or move the store, then rerun (nothing was committed)') ?? (await lowSpaceError(e, home.paths.store)) ?? e;
  } finally {
    release();
  }
}

/** After an I/O failure, a store disk with less free space than this is taken as full. */
const LOW_SPACE_BYTES = 32 * 1024 * 1024;

/**
 * A full disk also shows as a short write (the kernel accepts part of a write, then nothing):
 * an I/O failure while the store's disk has almost no free space is reported as ERR_DISK_FULL.
 */
async function lowSpaceError(e: unknown, storeDir: string): Promise<TandemError | undefined> {
  if (e instanceof TandemError && e.code !== 'ERR_IO' && e.code !== 'ERR_INTERNAL') return undefined;
  try {
    const st = await statfs(storeDir);
    if (st.bavail * st.bsize >= LOW_SPACE_BYTES) return undefined;
  } catch {
    return undefined;
  }
  return new TandemError('ERR_DISK_FULL', `the store's disk is full (${storeDir}): ${(e as Error)?.message ?? String(e)}; free space or move the store, then rerun (nothing was committed)`, { cause: e });
}

