/**
 * Per-volume locks: one snapshot, sync or materialize per volume at a time, across every
 * process that shares a home directory (CLI commands, `serve`, `daemon`).
 *
 * A lock is a file `locks/<volume>.lock` holding {pid, op, since}, written whole and linked into
 * place (link fails when the name exists).
 * A lock whose process is gone (kill -9) is stale and is taken over. Within one process a
 * second acquire of the same volume fails too (the server handles concurrent requests).
 *
 * Contract: acquire() either returns a release function or throws ERR_VOLUME_LOCKED naming
 * the holder; release() is idempotent. Safe to call concurrently.
 */
import { mkdirSync, readFileSync, unlinkSync, renameSync, writeFileSync, linkSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { TandemError, fromSystemError } from '../common/errors.js';
import { pidAlive } from '../common/pid.cjs';

export interface LockInfo {
  readonly pid: number;
  readonly op: string;
  readonly since: string;
}

const heldHere = new Map<string, LockInfo>();

function readInfo(file: string): LockInfo | null {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as LockInfo;
  } catch {
    return null; // vanished, or torn by a crash between create and write: treat as stale
  }
}

/** File name safe for any volume name (names are validated elsewhere; this is belt and braces). */
function lockFile(dir: string, volume: string): string {
  return join(dir, `${encodeURIComponent(volume)}.lock`);
}

/**
 * Take the lock of `volume` for `op` (a word such as "snapshot", "sync", "restore").
 * @param dir the home's locks directory
 */
export function acquireVolumeLock(dir: string, volume: string, op: string): () => void {
  return acquire(dir, lockFile(dir, volume), op, `volume "${volume}"`, (h) => locked(volume, h));
}

/** Take lock file `file` in `dir` for `op` (`what` it guards, for messages), or throw `busy(holder)`. */
function acquire(dir: string, file: string, op: string, what: string, busy: (h: LockInfo) => TandemError): () => void {
  try {
    mkdirSync(dir, { recursive: true });
  } catch (e) {
    throw fromSystemError(e, `cannot create the locks directory ${dir}`);
  }
  const key = file;
  const mine = heldHere.get(key);
  if (mine) throw busy(mine);
  for (let attempt = 0; attempt < 3; attempt++) {
    const info: LockInfo = { pid: process.pid, op, since: new Date().toISOString() };
    // Written whole to a file of our own, then linked under the lock's name (link fails when the
    // name exists): a lock file always holds its holder. Created empty and then written, another
    // process could read it between the two, take it for a crashed holder's and take it over.
    const tmp = `${file}.${process.pid}-${randomBytes(4).toString('hex')}.tmp`;
    try {
      writeFileSync(tmp, JSON.stringify(info), { mode: 0o644, flag: 'wx' });
    } catch (e) {
      // A full disk takes the file but not its bytes: leave nothing behind.
      rmSync(tmp, { force: true });
      throw fromSystemError(e, `cannot write the lock of ${what} (${file})`);
    }
    try {
      linkSync(tmp, file);
    } catch (e) {
      rmSync(tmp, { force: true });
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(e, `cannot create the lock of ${what} (${file})`);
      const holder = liveHolder(file);
      if (holder) throw busy(holder);
      // Stale: move it aside atomically so two processes cannot both "take over" the same file.
      try {
        renameSync(file, `${file}.stale-${process.pid}`);
        unlinkSync(`${file}.stale-${process.pid}`);
      } catch {
        /* someone else took it over first; loop and try again */
      }
      continue;
    }
    rmSync(tmp, { force: true });
    heldHere.set(key, info);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      heldHere.delete(key);
      try {
        unlinkSync(file);
      } catch {
        /* already gone */
      }
    };
  }
  const holder = readInfo(file);
  throw busy(holder ?? { pid: -1, op: 'unknown', since: '' });
}

/**
 * Run `fn` holding lock `name` of the home (`init`, `token`: what two commands must not change
 * at once), waiting up to `waitMs` for another process (or call) that holds it, then
 * ERR_HOME_BUSY. Its file starts with '.', which no volume name does.
 */
export async function withHomeLock<T>(dir: string, name: string, op: string, fn: () => Promise<T> | T, waitMs = 10_000): Promise<T> {
  const file = join(dir, `.home-${name}.lock`);
  const busy = (h: LockInfo) => new TandemError('ERR_HOME_BUSY', `${op} waited ${waitMs / 1000} s for another ${h.op} in this home (pid ${h.pid}, since ${h.since}); let it finish, then retry`, { details: { holder: h } });
  const until = Date.now() + waitMs;
  let release: () => void;
  for (;;) {
    try {
      release = acquire(dir, file, op, `the home's ${name}`, busy);
      break;
    } catch (e) {
      if (!(e instanceof TandemError) || e.code !== 'ERR_HOME_BUSY' || Date.now() >= until) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  try {
    return await fn();
  } finally {
    release();
  }
}

/**
 * Who holds the lock of `volume` now: this process, or another one that is alive. Null when the
 * lock is free, or was left by a process that is gone (kill -9; the next acquire takes it over).
 */
export function volumeLockHolder(dir: string, volume: string): LockInfo | null {
  const file = lockFile(dir, volume);
  return heldHere.get(file) ?? liveHolder(file);
}

/** The holder a lock file names when it is another process that is alive; else null (stale, or gone). */
function liveHolder(file: string): LockInfo | null {
  const holder = readInfo(file);
  return holder && holder.pid !== process.pid && pidAlive(holder.pid) ? holder : null;
}

function locked(volume: string, h: LockInfo): TandemError {
  return new TandemError(
    'ERR_VOLUME_LOCKED',
    `volume "${volume}" is busy: ${h.op} by pid ${h.pid} since ${h.since}; wait for it to finish and retry`,
    { details: { volume, holder: h } },
  );
}

/** Run `fn` holding the lock of `volume`. */
export async function withVolumeLock<T>(dir: string, volume: string, op: string, fn: () => Promise<T>): Promise<T> {
  const release = acquireVolumeLock(dir, volume, op);
  try {
    return await fn();
  } finally {
    release();
  }
}
