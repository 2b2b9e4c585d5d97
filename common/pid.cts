/**
 * Process liveness, shared by the store lock (store/lock.ts), the volume locks
 * (appliance/locks.ts) and the CLI's check for a running server (appliance/cli/forward-client.cts),
 * which loads it and nothing else of ours.
 */
import { readFileSync } from 'node:fs';

/**
 * Whether a process with this pid exists and has not ended (EPERM: it exists but belongs to
 * another user). A zombie has ended: it holds no lock, socket or file (the kernel closed them when
 * it died) and waits only for its parent to read its exit status, which a parent that does not
 * reap children (a shell that exec'd another program, an init that does not reap) may never do.
 * Taken as alive, a `serve` killed with -9 kept its home's store "held": the next `serve` refused to
 * start (ERR_STORE_BUSY) and commands tried to forward to its closed port.
 */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
  return !ended(pid);
}

/** Whether /proc says the process is a zombie or dead (state Z or X); false where /proc cannot tell. */
function ended(pid: number): boolean {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return false;
  }
  // "pid (comm) S ...": the command name may hold spaces and parentheses, the state follows the last ')'.
  const state = stat.charAt(stat.lastIndexOf(')') + 2);
  return state === 'Z' || state === 'X';
}
