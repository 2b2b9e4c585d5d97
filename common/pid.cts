/**
 * Process liveness, shared by the volume locks (appliance/locks.ts) and the CLI's check for a
 * running server (appliance/cli/forward-client.cts), which loads it and nothing else of ours.
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
