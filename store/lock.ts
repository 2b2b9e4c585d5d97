/**
 * The store's process lock: STORE_DIR/store.lock created with O_EXCL holding the owner's pid.
 * A lock whose pid is no longer running is stale (the owner was killed) and is taken over.
 * classic-level additionally locks index/, which catches the rare race of two takeovers.
 */
import { open, readFile, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { TandemError, fromSystemError } from '../common/errors.js';

export const LOCK_FILE = 'store.lock';

/** An empty lock file older than this was left by a process killed while creating it. */
const EMPTY_LOCK_STALE_MS = 10_000;

/** Attempts at taking a stale lock over before giving up (another process raced us). */
const TAKEOVER_ATTEMPTS = 3;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export function busyError(dir: string, pid: number | undefined): TandemError {
  return new TandemError(
    'ERR_STORE_BUSY',
    `the store ${dir} is held by another appliance process${pid ? ` (pid ${pid})` : ''}; stop it, or run the command against the server it runs`,
    { details: { dir, pid } },
  );
}

/** Take the lock; returns the function that releases it. */
export async function acquireStoreLock(dir: string): Promise<() => Promise<void>> {
  const path = join(dir, LOCK_FILE);
  for (let attempt = 0; attempt < TAKEOVER_ATTEMPTS; attempt++) {
    try {
      const fh = await open(path, 'wx', 0o640);
      try {
        await fh.writeFile(`${process.pid}\n`);
        await fh.sync();
      } finally {
        await fh.close();
      }
      return async () => {
        await unlink(path).catch(() => undefined);
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(e, `cannot create the store lock ${path}`);
    }
    let pid: number | undefined;
    try {
      pid = Number.parseInt(await readFile(path, 'utf8'), 10);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // released meanwhile
      throw fromSystemError(e, `cannot read the store lock ${path}`);
    }
    if (!Number.isInteger(pid) || pid! <= 0) {
      // A lock file being written right now is still empty: held, unless it is old.
      const age = Date.now() - (await stat(path).then((s) => s.mtimeMs, () => Date.now()));
      if (age < EMPTY_LOCK_STALE_MS) throw busyError(dir, undefined);
    } else if (alive(pid!)) {
      throw busyError(dir, pid);
    }
    await unlink(path).catch(() => undefined);
  }
  throw busyError(dir, undefined);
}
