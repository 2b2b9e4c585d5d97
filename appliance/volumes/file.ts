/**
 * Volume adapters for image files and block devices.
 *
 * - {@link openVolumeReader}: read-only; a device is never opened for writing by a snapshot.
 * - {@link openVolumeWriter}: the restore / materialize target. A new image file is created
 *   sparse at its final size (so it reads as zeros and needs no scan); an existing image must
 *   have the snapshot's size unless `force` (then it is truncated or extended); a block device
 *   cannot be resized: it must be at least as large with `force`, exactly as large without.
 *
 * Writes of whole aligned blocks bypass the page cache (O_DIRECT, direct.ts) where the
 * filesystem allows; `sync()` (fsync) covers them and the buffered ones alike.
 *
 * Sizes: a regular file's size is its stat size; a block device's size comes from
 * /sys/dev/block/MAJ:MIN/size (512-byte sectors), else `blockdev --getsize64`.
 */
import { open, stat, readFile, readdir, realpath, type FileHandle } from 'node:fs/promises';
import { constants, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { TandemError, fromSystemError } from '../../common/errors.js';
import { openDirect } from './direct.js';
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
  /** Holes of a sparse image found at open time, ascending; empty when none are known. */
  readonly holes: readonly Hole[];
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
  /**
   * Awaited once the target is found writable, just before the first change made to it: a
   * missing image created, an existing one resized. A caller that marks the volume as being
   * written (materializing) makes the mark durable there, so a crash right after leaves the mark.
   */
  readonly beforeChange?: () => Promise<void>;
}

function unreadable(path: string, why: string, cause?: unknown, details: Record<string, unknown> = {}): TandemError {
  return new TandemError('ERR_VOLUME_UNREADABLE', `cannot read volume ${path}: ${why}`, { cause, details: { path, ...details } });
}

/** Major and minor numbers of a Linux dev_t (glibc's gnu_dev_major/minor encoding). */
function devNumbers(rdev: bigint): { major: bigint; minor: bigint } {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  return { major, minor };
}

/** The file a loop device (by its device number) reads and writes, or null (not a loop device, or detached). */
export async function loopBackingFile(rdev: bigint): Promise<string | null> {
  const { major, minor } = devNumbers(rdev);
  const backing = await readFile(`/sys/dev/block/${major}:${minor}/loop/backing_file`, 'utf8').catch(() => null);
  return backing === null || backing.trim() === '' ? null : backing.trim();
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
 * What uses block device `path`, for ERR_VOLUME_IN_USE: the mount points of it and of its
 * partitions (/proc/self/mountinfo) and the devices stacked on it (/sys/.../holders: LVM's
 * device-mapper volumes, md RAID). Empty when nothing is found (swap, a VM, another program's
 * exclusive open): the message then names the usual suspects.
 */
async function deviceUsers(path: string): Promise<string[]> {
  const users: string[] = [];
  try {
    const { major, minor } = devNumbers((await stat(path, { bigint: true })).rdev);
    const sys = `/sys/dev/block/${major}:${minor}`;
    const devs = new Map<string, string>([[`${major}:${minor}`, path]]);
    for (const entry of await readdir(sys).catch(() => [] as string[])) {
      const dev = await readFile(`${sys}/${entry}/dev`, 'utf8').catch(() => null);
      if (dev !== null && (await stat(`${sys}/${entry}/partition`).catch(() => null))) devs.set(dev.trim(), `/dev/${entry}`);
    }
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
    for (const line of mountinfo.split('\n')) {
      const f = line.split(' ');
      const dev = f[2] === undefined ? undefined : devs.get(f[2]);
      if (dev !== undefined && f[4] !== undefined) {
        const at = f[4].replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
        users.push(`${dev} is mounted at ${at}`);
      }
    }
    for (const holder of await readdir(`${sys}/holders`).catch(() => [] as string[])) {
      const name = (await readFile(`/sys/block/${holder}/dm/name`, 'utf8').catch(() => '')).trim();
      users.push(`held by ${name ? `/dev/mapper/${name} (${holder})` : `/dev/${holder}`}`);
    }
  } catch {
    // Only the message gets poorer.
  }
  return users;
}

/**
 * Open a block device for writing exclusively (O_EXCL). Linux refuses that with EBUSY while
 * the device or one of its partitions is mounted, or is claimed by LVM, md RAID, swap or any other
 * exclusive opener: writing blocks under a mounted file system corrupts it, so the write is
 * refused (ERR_VOLUME_IN_USE) before anything is written. While the handle is open, nothing else
 * can claim the device: a mount attempted during the restore fails.
 */
async function openDeviceExclusive(path: string): Promise<FileHandle> {
  try {
    return await open(path, constants.O_RDWR | constants.O_EXCL);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EBUSY') throw e;
    const users = await deviceUsers(path);
    const what = users.length > 0 ? users.join('; ') : 'mounted, or held by LVM, RAID, swap, a VM or another program';
    throw new TandemError('ERR_VOLUME_IN_USE', `device ${path} is in use (${what}): writing under it would corrupt it; unmount it or stop what holds it, then run again; nothing was written`, { cause: e, details: { path, users } });
  }
}

/**
 * What uses image file `path`, for ERR_VOLUME_IN_USE: loop devices it backs (and where they are
 * mounted), locks on it in /proc/locks (QEMU locks the disk images of a running VM; any other
 * program that locks it is using it too), and other processes that hold it open for writing.
 * Empty when nothing is found.
 */
async function fileUsers(path: string): Promise<string[]> {
  const users = new Set<string>();
  try {
    const st = await stat(path, { bigint: true });
    for (const dev of await readdir('/sys/block').catch(() => [] as string[])) {
      if (!dev.startsWith('loop')) continue;
      const backing = await readFile(`/sys/block/${dev}/loop/backing_file`, 'utf8').catch(() => null);
      if (backing === null) continue;
      const b = await stat(backing.trim(), { bigint: true }).catch(() => null);
      if (b === null || b.ino !== st.ino || b.dev !== st.dev) continue;
      const on = await deviceUsers(`/dev/${dev}`);
      users.add(`attached as /dev/${dev}${on.length > 0 ? `, which ${on.join(', ').replace(/^\/dev\/\S+ is /, 'is ')}` : ''}`);
    }
    const { major, minor } = devNumbers(st.dev);
    for (const line of (await readFile('/proc/locks', 'utf8').catch(() => '')).split('\n')) {
      if (line.includes('->')) continue; // a waiter, not a holder
      const f = line.trim().split(/\s+/);
      const id = f[5]?.split(':');
      if (id?.length !== 3 || BigInt(`0x${id[0]}`) !== major || BigInt(`0x${id[1]}`) !== minor || id[2] !== String(st.ino)) continue;
      const pid = Number(f[4]);
      users.add(pid > 0 ? `locked by ${processName(pid)}` : 'locked by a running program (QEMU locks the disks of a running VM so)');
    }
    for (const pid of writersOf(await realpath(path))) users.add(`open for writing by ${processName(pid)}`);
  } catch {
    // Only the check gets poorer.
  }
  return [...users];
}

/** `pid 123 (qemu-system-x86)`: the program's name from /proc when it is still there. */
function processName(pid: number): string {
  try {
    return `pid ${pid} (${readFileSync(`/proc/${pid}/comm`, 'utf8').trim()})`;
  } catch {
    return `pid ${pid}`;
  }
}

/**
 * The other processes (pids) that hold file `real` (a real path) open for writing, from /proc/PID/fd
 * and the flags in /proc/PID/fdinfo (a VM, a database, any program writing it). Processes this
 * user cannot look into are not seen. Synchronous: some thousands of links are read in a few ms.
 */
function writersOf(real: string): number[] {
  const out: number[] = [];
  let pids: string[];
  try {
    pids = readdirSync('/proc').filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid);
  } catch {
    return out;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue; // gone, or another user's
    }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) !== real) continue;
        const flags = /^flags:\s*([0-7]+)/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))?.[1];
        if (flags === undefined || (parseInt(flags, 8) & 3) === 0) continue; // read-only
        out.push(Number(pid));
        break;
      } catch {
        // closed meanwhile
      }
    }
  }
  return out;
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
  else throw unreadable(path, 'not a regular file or a block device; give an image file or a device such as /dev/sdb', undefined, { notAVolume: true });
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

/**
 * Open a volume read-only. Its size is fixed at open time.
 *
 * A sparse image file (fewer bytes allocated than its size) gets a map of its holes when it is
 * opened (see {@link findHoles}); reads that fall entirely inside a hole are answered with
 * zeros without asking the kernel, which copies zeros far slower than memory is cleared
 * (a 64 GiB image with a few MiB of data is read in seconds instead of minutes). A write that
 * fills a hole after the open is seen as it was at the open, like any block read before a
 * concurrent write.
 */
export async function openVolumeReader(path: string, opts: { readonly holeMap?: boolean } = {}): Promise<LocalVolumeReader> {
  const info = await inspectVolume(path);
  let fh: FileHandle;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    throw unreadable(path, `${(e as NodeJS.ErrnoException).code === 'EACCES' ? 'permission denied; run as a user that can read it' : (e as Error).message}`, e);
  }
  const size = info.size;
  let holes: Hole[] = [];
  // The map costs a program's start ({@link HOLE_MAPPERS}): not for a reader that reads no range
  // whole (its size, a change list's blocks).
  if (info.kind === 'file' && opts.holeMap !== false) {
    const st = await fh.stat();
    if (st.blocks * 512 + SPARSE_SLACK < size) holes = await findHoles(path);
  }
  let hint = 0; // index of the hole the last read was in or before: reads are mostly sequential
  const inHole = (start: number, end: number): boolean => {
    if (holes.length === 0) return false;
    if (hint >= holes.length || holes[hint]!.start > start) hint = 0;
    while (hint < holes.length && holes[hint]!.end <= start) hint++;
    const h = holes[hint];
    return h !== undefined && h.start <= start && end <= h.end;
  };
  return {
    path,
    kind: info.kind,
    size,
    holes,
    async read(buf, position) {
      const want = Math.max(0, Math.min(buf.length, size - position));
      if (want > 0 && inHole(position, position + want)) {
        buf.fill(0, 0, want);
        return want;
      }
      try {
        return await readFull(fh, want === buf.length ? buf : buf.subarray(0, want), position);
      } catch (e) {
        throw fromSystemError(e, `reading ${path} at byte ${position}`);
      }
    },
    close: () => fh.close(),
  };
}

/** A range of a file with no data: [start, end). */
export interface Hole {
  readonly start: number;
  readonly end: number;
}

/** Below this many unallocated bytes a file is read as it is: a hole map would not pay. */
const SPARSE_SLACK = 64 * 1024 * 1024;
/**
 * At most this many holes are mapped (memory bound), from the start of the file: past the last
 * one mapped the file is read as it is. It was all or nothing: 101,000 holes (a file of 4 KiB
 * extents 4 KiB apart, then one hole of 256 GiB) dropped the whole map and read 256 GiB, 104 s
 * against 3.6 s at 99,000.
 */
const MAX_HOLES = 100_000;
/** Holes shorter than this are not mapped: they spare no read, and count against {@link MAX_HOLES}. The map stops after 10 x MAX_HOLES extents looked at. */
const MIN_HOLE_BYTES = 64 * 1024;
/** The hole map must come quickly; past this the file is read in full. */
const HOLE_MAP_TIMEOUT_MS = 10_000;

/**
 * The programs that map a file's holes with lseek(SEEK_DATA/SEEK_HOLE), which Node has no binding
 * for, tried in order: perl (essential on Debian, perl-base; ~13 ms a start) and python3 (350-650 ms
 * where it is a pyenv shim; the only one on some minimal systems). Each takes the path, the most
 * holes to print and the shortest hole to print, prints "start end" per hole, and exits non-zero
 * when lseek fails with anything but ENXIO (no data past that point), so a failure never reads as
 * a hole. Linux's values: SEEK_DATA 3, SEEK_HOLE 4, ENXIO 6.
 */
const HOLE_MAPPERS: ReadonlyArray<readonly [string, string]> = [
  [
    'perl',
    [
      'my ($path, $max, $min) = @ARGV; open(my $f, "<", $path) or exit 2;',
      'my $size = -s $f; my ($pos, $n, $i) = (0, 0, 0);',
      'while ($pos < $size && $n < $max && $i < 10 * $max) {',
      '  $i++;',
      '  my $d = sysseek($f, $pos, 3);',
      '  if (!defined $d) { exit 3 unless $! + 0 == 6; $d = $size; }',
      '  $d += 0;',
      '  if ($d - $pos >= $min) { print "$pos $d\n"; $n++; }',
      '  last if $d >= $size;',
      '  $pos = sysseek($f, $d, 4); exit 3 unless defined $pos; $pos += 0;',
      '}',
    ].join('\n'),
  ],
  [
    'python3',
    [
      'import errno, os, sys',
      'fd = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(fd).st_size; pos = 0; n = 0; i = 0',
      'while pos < size and n < int(sys.argv[2]) and i < 10 * int(sys.argv[2]):',
      '    i += 1',
      '    try: d = os.lseek(fd, pos, os.SEEK_DATA)',
      '    except OSError as e:',
      '        if e.errno != errno.ENXIO: raise',
      '        d = size',
      '    if d - pos >= int(sys.argv[3]): print(pos, d); n += 1',
      '    if d >= size: break',
      '    pos = os.lseek(fd, d, os.SEEK_HOLE)',
    ].join('\n'),
  ],
];

/**
 * The holes of a file ({@link HOLE_MAPPERS}: the first that runs answers). Without either program
 * (or on any failure) the answer is "no holes known" and the file is simply read in full: slower,
 * never wrong.
 */
export async function findHoles(path: string): Promise<Hole[]> {
  for (const [program, script] of HOLE_MAPPERS) {
    let stdout: string;
    try {
      ({ stdout } = await promisify(execFile)(program, [program === 'perl' ? '-e' : '-c', script, path, String(MAX_HOLES), String(MIN_HOLE_BYTES)], {
        timeout: HOLE_MAP_TIMEOUT_MS,
        maxBuffer: MAX_HOLES * 48,
      }));
    } catch {
      continue;
    }
    const holes: Hole[] = [];
    for (const line of stdout.split('\n')) {
      const m = /^(\d+) (\d+)$/.exec(line);
      if (m) holes.push({ start: Number(m[1]), end: Number(m[2]) });
    }
    return holes;
  }
  return [];
}

/**
 * The error of a failed flush of a restore target. An EIO there has two causes: the disk failed a
 * write, or a program wrote the image through the page cache (a write, or a shared mapping)
 * while the restore wrote the same range directly. Linux cannot drop the cached pages of such a
 * range, logs "Page cache invalidation failure on direct I/O" and reports EIO at the next fsync of
 * the file (seen with a program writing the image during a failback's apply).
 */
export function flushError(e: unknown, path: string, wroteDirectly: boolean): TandemError {
  if (!wroteDirectly || (e as NodeJS.ErrnoException | undefined)?.code !== 'EIO') return fromSystemError(e, `flushing ${path}`);
  return new TandemError(
    'ERR_IO',
    `flushing ${path}: EIO: the disk failed a write, or a program wrote the image while it was being written (\`dmesg\` then says "Page cache invalidation failure on direct I/O"). Stop anything that uses it and check \`dmesg\`, then rerun: what was written is not verified`,
    { cause: e, details: { path } },
  );
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
    else if (cause?.code === 'ENOENT') existing = null;
    else if ((e as TandemError).details?.notAVolume === true) {
      // Not a file or a device (a directory, a socket): there is nothing to write onto.
      throw new TandemError('ERR_VOLUME_UNREADABLE', `cannot write a volume to ${path}: not a regular file or a block device; give the path of an image file (created if absent) or a device such as /dev/sdb`, { details: { path } });
    } else throw e;
  }
  let fh: FileHandle;
  let created = false;
  const kind: VolumeKind = existing?.kind ?? 'file';
  try {
    if (existing === null) {
      await opts.beforeChange?.();
      fh = await open(path, 'wx+', 0o600);
      created = true;
      await fh.truncate(size); // sparse: reads as zeros, allocates nothing
    } else if (existing.kind === 'device') {
      // Opened first: a device in use is refused as such, whatever its size.
      fh = await openDeviceExclusive(path);
      // O_EXCL keeps out mounts and exclusive holders only: a VM or a program writing the raw
      // device holds it open without it, and is refused as it is for an image file.
      const writers = writersOf(await realpath(path));
      if (writers.length > 0) {
        await fh.close();
        const users = writers.map((pid) => `open for writing by ${processName(pid)}`);
        throw new TandemError('ERR_VOLUME_IN_USE', `${path} is in use (${users.join('; ')}): writing under it would corrupt it; stop the VM or program, then run again; nothing was written`, { details: { path, users } });
      }
      if (existing.size < size || (existing.size > size && !opts.force)) {
        await fh.close();
        throw new TandemError(
          'ERR_VOLUME_SIZE_MISMATCH',
          existing.size < size
            ? `device ${path} holds ${existing.size} bytes but the snapshot needs ${size}; a block device cannot be resized, use a larger one`
            : `device ${path} holds ${existing.size} bytes, the snapshot ${size}; pass --force to write the snapshot onto its first ${size} bytes`,
          { details: { path, size: existing.size, expected: size } },
        );
      }
    } else {
      // An image that a running VM, a loop device or another program uses would be corrupted
      // under it: refused as a device in use is.
      const users = await fileUsers(path);
      if (users.length > 0) {
        throw new TandemError('ERR_VOLUME_IN_USE', `${path} is in use (${users.join('; ')}): writing under it would corrupt it; stop the VM or program, or detach the loop device (\`losetup -d\`), then run again; nothing was written`, { details: { path, users } });
      }
      // An empty image holds nothing a resize could lose (a failback killed as it created it).
      if (existing.size !== size && existing.size !== 0 && !opts.force) {
        throw new TandemError(
          'ERR_VOLUME_SIZE_MISMATCH',
          `${path} holds ${existing.size} bytes but the snapshot has ${size}; pass --force to resize it, or restore to a new path`,
          { details: { path, size: existing.size, expected: size } },
        );
      }
      fh = await open(path, 'r+');
      if (existing.size !== size) {
        try {
          await opts.beforeChange?.();
        } catch (e) {
          await fh.close();
          throw e;
        }
        await fh.truncate(size);
        created = existing.size === 0; // an empty image made larger reads as zeros, as a new one
      }
    }
  } catch (e) {
    throw fromSystemError(e, `opening ${path} for writing`);
  }
  // An existing sparse image: its holes, which a restore onto it need not read (materialize).
  let holes: Hole[] = [];
  if (!created && kind === 'file') {
    const st = await fh.stat();
    if (st.blocks * 512 + SPARSE_SLACK < size) holes = await findHoles(path);
  }
  // Whole blocks go to the disk directly (direct.ts); the rest through the page cache.
  const direct = await openDirect(path);
  /** Bytes written through the page cache since the last writeback or sync. */
  let cached = 0;
  const write = async (buf: Buffer, position: number): Promise<void> => {
    if (position < 0 || position + buf.length > size) {
      throw new TandemError('ERR_INTERNAL', `write of ${buf.length} bytes at ${position} is outside ${path} (${size} bytes)`);
    }
    try {
      let done = 0;
      if (direct) {
        done = await direct.write(buf, position);
        if (done < buf.length && direct.overlaps(position + done, buf.length - done)) await direct.settle();
      }
      while (done < buf.length) {
        const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
        done += bytesWritten;
        cached += bytesWritten;
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
    holes,
    async read(buf, position) {
      const want = Math.max(0, Math.min(buf.length, size - position));
      if (direct?.overlaps(position, want)) await direct.settle().catch(() => undefined); // a failed write is thrown by the next write or sync
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
    async writeback() {
      if (cached === 0) return; // everything went directly
      cached = 0;
      try {
        await fh.datasync();
      } catch (e) {
        throw flushError(e, path, direct !== null);
      }
    },
    async sync() {
      cached = 0;
      try {
        await direct?.settle();
        await fh.sync();
      } catch (e) {
        throw flushError(e, path, direct !== null);
      }
    },
    async close() {
      // What is staged goes to the disk first (after a failure, the blocks before it are written);
      // a write failing now was thrown by sync() already, or an earlier error is on its way.
      await direct?.close().catch(() => undefined);
      await fh.close();
    },
  };
}
