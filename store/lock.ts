/**
 * The store's process lock: STORE_DIR/store.lock holding the owner's pid. It appears with its
 * contents: the pid is written to a file of this process's own and hard-linked to the lock's
 * name, which fails when the lock exists. (Created with O_EXCL and then written, a lock of a
 * process killed in between was empty, and an empty lock must be taken as held for a while: a
 * command run right after such a kill got ERR_STORE_BUSY.) A lock whose pid is no longer running
 * is stale (the owner was killed, including one left a zombie by a parent that does not reap it:
 * common/pid.cts) and is taken over. classic-level additionally locks index/,
 * which catches the rare race of two takeovers.
 */
import { link, open, readFile, readdir, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { TandemError, fromSystemError } from '../common/errors.js';
import { pidAlive as alive } from '../common/pid.cjs';

export const LOCK_FILE = 'store.lock';

/** An empty lock file older than this was left by a process killed while creating it. */
const EMPTY_LOCK_STALE_MS = 10_000;

/** Attempts at taking a stale lock over before giving up (another process raced us). */
const TAKEOVER_ATTEMPTS = 3;

export function busyError(dir: string, pid: number | undefined): TandemError {
  return new TandemError(
    'ERR_STORE_BUSY',
    `the store ${dir} is held by another appliance process${pid ? ` (pid ${pid})` : ''}; stop it, or run the command against the server it runs`,
    { details: { dir, pid } },
  );
}

/** Write `pid` to `path` (created or replaced) and make it durable. */
async function writePid(path: string, flags: string): Promise<void> {
  const fh = await open(path, flags, 0o640);
  try {
    await fh.writeFile(`${process.pid}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** File systems without hard links: the lock is then created with O_EXCL and written. */
const NO_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS', 'EXDEV']);

/**
 * Create the lock with this process's pid in it, atomically; false when it exists. Leftovers of
 * processes killed before removing their own pid file are removed on the way.
 */
async function createLock(dir: string, path: string): Promise<boolean> {
  const own = `${path}.${process.pid}.tmp`;
  for (const f of await readdir(dir).catch(() => [] as string[])) {
    if (!f.startsWith(`${LOCK_FILE}.`) || !f.endsWith('.tmp')) continue;
    const pid = Number(f.slice(LOCK_FILE.length + 1, -'.tmp'.length));
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && !alive(pid)) await unlink(join(dir, f)).catch(() => undefined);
  }
  await writePid(own, 'w');
  try {
    await link(own, path);
    return true;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? '';
    if (code === 'EEXIST') return false;
    if (!NO_LINKS.has(code)) throw e;
  } finally {
    await unlink(own).catch(() => undefined);
  }
  try {
    await writePid(path, 'wx');
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

/** Take the lock; returns the function that releases it. */
export async function acquireStoreLock(dir: string): Promise<() => Promise<void>> {
  const path = join(dir, LOCK_FILE);
  for (let attempt = 0; attempt < TAKEOVER_ATTEMPTS; attempt++) {
    try {
      if (await createLock(dir, path)) {
        return async () => {
          await unlink(path).catch(() => undefined);
        };
      }
    } catch (e) {
      throw fromSystemError(e, `cannot create the store lock ${path}`);
    }
    let pid: number | undefined;
    try {
      pid = Number.parseInt(await readFile(path, 'utf8'), 10);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue; // released meanwhile
      throw fromSystemError(e, `cannot read the store lock ${path}`);
    }
    if (!Number.isInteger(pid) || pid! <= 0) {
      // Empty: written right now by a process on a file system without hard links (createLock),
      // so held, unless it is old.
      const age = Date.now() - (await stat(path).then((s) => s.mtimeMs, () => Date.now()));
      if (age < EMPTY_LOCK_STALE_MS) throw busyError(dir, undefined);
    } else if (alive(pid!)) {
      throw busyError(dir, pid);
    }
    await unlink(path).catch(() => undefined);
  }
  throw busyError(dir, undefined);
}
