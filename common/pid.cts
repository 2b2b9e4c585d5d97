/**
 * Process liveness, shared by the volume locks (appliance/locks.ts) and the CLI's check for a
 * running server (appliance/cli/forward-client.cts). CommonJS, so that the CLI's forwarding path
 * can load it without Node's ES module loader.
 */

/** Whether a process with this pid exists (EPERM: it exists but belongs to another user). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
