/**
 * Volume adapters for image files and block devices.
 *
 * - {@link openVolumeReader}: read-only; a device is never opened for writing by a snapshot.
 * - {@link openVolumeWriter}: the restore / materialize target. A new image file is created
 *   sparse at its final size (so it reads as zeros and needs no scan); an existing image must
 *   have the snapshot's size unless `force` (then it is truncated or extended); a block device
 *   cannot be resized: it must be at least as large with `force`, exactly as large without.
 *
 * Sizes: a regular file's size is its stat size; a block device's size comes from
 * /sys/dev/block/MAJ:MIN/size (512-byte sectors), else `blockdev --getsize64`.
 */
import { open, stat, readFile, type FileHandle } from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { TandemError, fromSystemError } from '../../common/errors.js';
import type { VolumeReader, VolumeWriter } from '../../store/types.js';

/** Zero writes go out in pieces of this size so zeroing a huge range needs bounded memory. */
const ZERO_CHUNK = 4 * 1024 * 1024;

export type VolumeKind = 'file' | 'device';

export interface VolumeInfo {
  readonly path: string;
  readonly kind: VolumeKind;
  readonly size: number;
}

/** A reader that knows what it reads. */
export interface LocalVolumeReader extends VolumeReader {
  readonly path: string;
  readonly kind: VolumeKind;
}

/** A writer that knows whether its target was created just now (and so reads as all zeros). */
export interface LocalVolumeWriter extends VolumeWriter {
  readonly path: string;
  readonly kind: VolumeKind;
  /** True when the writer created the file: every byte reads as zero, no scan is needed. */
  readonly created: boolean;
}

export interface OpenWriterOptions {
  /** Resize an existing image of another size (or write onto a larger device). */
  readonly force?: boolean;
}

function unreadable(path: string, why: string, cause?: unknown): TandemError {
  return new TandemError('ERR_VOLUME_UNREADABLE', `cannot read volume ${path}: ${why}`, { cause, details: { path } });
}

/** Major and minor numbers of a Linux dev_t (glibc's gnu_dev_major/minor encoding). */
function devNumbers(rdev: bigint): { major: bigint; minor: bigint } {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  return { major, minor };
}

async function deviceSize(path: string, rdev: bigint): Promise<number> {
  const { major, minor } = devNumbers(rdev);
  try {
    const sectors = (await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim();
    // The kernel reports the size in 512-byte sectors whatever the logical block size.
    return Number(sectors) * 512;
  } catch {
    try {
      const { stdout } = await promisify(execFile)('blockdev', ['--getsize64', path]);
      return Number(stdout.trim());
    } catch (e) {
      throw unreadable(path, 'the size of the block device cannot be found (no /sys entry, blockdev failed); run as root', e);
    }
  }
}

/**
 * What a path is and how large. ERR_VOLUME_UNREADABLE for a missing path, a path that is
 * neither a regular file nor a block device; ERR_VOLUME_EMPTY for size 0.
 */
export async function inspectVolume(path: string): Promise<VolumeInfo> {
  let st;
  try {
    st = await stat(path, { bigint: true });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw unreadable(path, 'no such file or device; check the path', e);
    throw unreadable(path, `${(e as Error).message}; check the path and permissions`, e);
  }
  let info: VolumeInfo;
  if (st.isFile()) info = { path, kind: 'file', size: Number(st.size) };
  else if (st.isBlockDevice()) info = { path, kind: 'device', size: await deviceSize(path, st.rdev) };
  else throw unreadable(path, 'not a regular file or a block device; give an image file or a device such as /dev/sdb');
  if (info.size === 0) {
    throw new TandemError('ERR_VOLUME_EMPTY', `volume ${path} has size 0; give a device or image with data`, { details: { path } });
  }
  return info;
}

/** Read until `buf` is full or the end of the file. */
async function readFull(fh: FileHandle, buf: Buffer, position: number): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** Open a volume read-only. Its size is fixed at open time. */
export async function openVolumeReader(path: string): Promise<LocalVolumeReader> {
  const info = await inspectVolume(path);
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    throw unreadable(path, `${(e as NodeJS.ErrnoException).code === 'EACCES' ? 'permission denied; run as a user that can read it' : (e as Error).message}`, e);
  }
  const size = info.size;
  return {
    path,
    kind: info.kind,
    size,
    async read(buf, position) {
      const want = Math.max(0, Math.min(buf.length, size - position));
      try {
        return await readFull(fh, want === buf.length ? buf : buf.subarray(0, want), position);
      } catch (e) {
        throw fromSystemError(e, `reading ${path} at byte ${position}`);
      }
    },
    close: () => fh.close(),
  };
}

/**
 * Open (or create) a restore target of exactly `size` bytes. See the module comment for the
 * rules on existing files and devices; ERR_VOLUME_SIZE_MISMATCH when they are not met.
 */
export async function openVolumeWriter(path: string, size: number, opts: OpenWriterOptions = {}): Promise<LocalVolumeWriter> {
  if (!Number.isSafeInteger(size) || size <= 0) {
    throw new TandemError('ERR_BAD_REQUEST', `cannot create a volume of ${size} bytes`);
  }
  let existing: VolumeInfo | null = null;
  try {
    existing = await inspectVolume(path);
  } catch (e) {
    const cause = (e as TandemError).cause as NodeJS.ErrnoException | undefined;
    if ((e as TandemError).code === 'ERR_VOLUME_EMPTY') existing = { path, kind: 'file', size: 0 };
    else if (cause?.code !== 'ENOENT') throw e;
  }
  let fh: FileHandle;
  let created = false;
  const kind: VolumeKind = existing?.kind ?? 'file';
  try {
    if (existing === null) {
      fh = await open(path, 'wx+', 0o600);
      created = true;
      await fh.truncate(size); // sparse: reads as zeros, allocates nothing
    } else if (existing.kind === 'device') {
      if (existing.size < size || (existing.size > size && !opts.force)) {
        throw new TandemError(
          'ERR_VOLUME_SIZE_MISMATCH',
          existing.size < size
            ? `device ${path} holds ${existing.size} bytes but the snapshot needs ${size}; a block device cannot be resized, use a larger one`
            : `device ${path} holds ${existing.size} bytes, the snapshot ${size}; pass --force to write the snapshot onto its first ${size} bytes`,
          { details: { path, size: existing.size, expected: size } },
        );
      }
      fh = await open(path, 'r+');
    } else {
      if (existing.size !== size && !opts.force) {
        throw new TandemError(
          'ERR_VOLUME_SIZE_MISMATCH',
          `${path} holds ${existing.size} bytes but the snapshot has ${size}; pass --force to resize it, or restore to a new path`,
          { details: { path, size: existing.size, expected: size } },
        );
      }
      fh = await open(path, 'r+');
      if (existing.size !== size) await fh.truncate(size);
    }
  } catch (e) {
    throw fromSystemError(e, `opening ${path} for writing`);
  }
  const write = async (buf: Buffer, position: number): Promise<void> => {
    if (position < 0 || position + buf.length > size) {
      throw new TandemError('ERR_INTERNAL', `write of ${buf.length} bytes at ${position} is outside ${path} (${size} bytes)`);
    }
    try {
      let done = 0;
      while (done < buf.length) {
        const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw fromSystemError(e, `writing ${path} at byte ${position}`);
    }
  };
  return {
    path,
    kind,
    size,
    created,
    async read(buf, position) {
      const want = Math.max(0, Math.min(buf.length, size - position));
      try {
        return await readFull(fh, want === buf.length ? buf : buf.subarray(0, want), position);
      } catch (e) {
        throw fromSystemError(e, `reading ${path} at byte ${position}`);
      }
    },
    write,
    async zero(position, length) {
      // Node cannot punch holes (no fallocate binding): data already there is overwritten with
      // zeros, so the range reads as zeros but stays allocated. A range never written in a
      // freshly created file is a hole already: materialize skips zero blocks there.
      const end = Math.min(size, position + length);
      if (end <= position) return;
      const zeros = Buffer.alloc(Math.min(ZERO_CHUNK, end - position));
      for (let p = position; p < end; p += zeros.length) {
        const n = Math.min(zeros.length, end - p);
        await write(n === zeros.length ? zeros : zeros.subarray(0, n), p);
      }
    },
    async sync() {
      try {
        await fh.sync();
      } catch (e) {
        throw fromSystemError(e, `flushing ${path}`);
      }
    },
    close: () => fh.close(),
  };
}
