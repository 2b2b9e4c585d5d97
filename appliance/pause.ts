/**
 * Pausing a volume's scheduled jobs (`appliance pause` / `appliance resume`): maintenance on the
 * protected server, a WAN that must be left alone for a while, an upgrade of the other appliance.
 *
 * A pause is kept in the volume's scheduler state (meta `scheduler`/VOL `paused`, as crash-safe
 * as the store): who paused it, when, until when (null: until `appliance resume`) and why. While
 * it holds, the daemon starts no job for the volume (on-prem: no snapshot or push; on the cloud
 * appliance: no EBS export or retention of its replicas), and a job running when it is paused is
 * stopped (its checkpoint is kept, and the job goes on from it when the pause ends). A volume of a
 * group pauses the group's jobs (its volumes are snapshotted together). A pause with an end
 * lifts itself. Manual commands (`snapshot`, `sync`, `failover`, ...) are not paused: the operator
 * who runs them means it. A manual `sync` of a paused volume says so (a note on stderr and
 * `paused` in its JSON: a script's log shows the daemon's syncs are held). The RPO keeps
 * counting: `status` shows the pause next to the age of the last replicated point, and `doctor`
 * warns of it.
 */
import { TandemError } from '../common/errors.js';
import type { VolumeRecord } from '../store/types.js';
import { readVolumeState, updateVolumeState, type MetaStore, type Pause } from './scheduler/state.js';

export type { Pause } from './scheduler/state.js';

/** The longest pause with an end: a longer one is an indefinite pause, said as such. */
export const MAX_PAUSE_MS = 30 * 86_400_000;

/** The pause of a volume's state that still holds at `now` (one whose end has passed holds no more). */
export function activePause(p: Pause | null | undefined, now: number): Pause | null {
  if (!p) return null;
  return p.until !== null && Date.parse(p.until) <= now ? null : p;
}

/**
 * In-process listeners of pauses and resumes: the scheduler of a daemon wakes at once when a
 * command forwarded to it pauses or resumes a volume (a daemon in another process notices at its
 * next rescan, within a minute).
 */
const listeners = new Set<() => void>();
export function onPauseChange(fn: () => void): () => void {
  listeners.add(fn);
  return () => void listeners.delete(fn);
}
function changed(): void {
  for (const fn of listeners) fn();
}

interface PauseStore extends MetaStore {
  listVolumes(): Promise<VolumeRecord[]>;
}

/** The volumes named (all with `all`); ERR_VOLUME_NOT_FOUND naming every unknown one, before anything changes. */
async function pick(store: PauseStore, names: readonly string[], all: boolean): Promise<string[]> {
  const volumes = (await store.listVolumes()).map((v) => v.name);
  if (all) return volumes;
  const unknown = names.filter((n) => !volumes.includes(n));
  if (unknown.length > 0) {
    throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume named ${unknown.map((n) => `"${n}"`).join(', ')} on this appliance; nothing was paused or resumed (\`appliance volume list\` shows the volumes)`, { details: { volume: unknown[0] } });
  }
  return [...new Set(names)];
}

/**
 * Pause the scheduled jobs of `names` (every volume with `all`) from `now`, for `forMs` (absent:
 * until resumed). A volume paused already gets the new pause. Returns each volume's pause.
 */
export async function pauseVolumes(
  store: PauseStore,
  names: readonly string[],
  opts: { readonly all?: boolean; readonly by: string; readonly now: number; readonly forMs?: number; readonly reason?: string },
): Promise<Array<{ volume: string; paused: Pause }>> {
  if (opts.forMs !== undefined && !(opts.forMs > 0 && opts.forMs <= MAX_PAUSE_MS)) {
    throw new TandemError('ERR_USAGE', `a pause lasts more than 0 and at most 30d (--for); leave --for out to pause until \`appliance resume\``);
  }
  const volumes = await pick(store, names, opts.all === true);
  const paused: Pause = {
    by: opts.by,
    at: new Date(opts.now).toISOString(),
    until: opts.forMs === undefined ? null : new Date(opts.now + opts.forMs).toISOString(),
    reason: opts.reason ?? null,
  };
  for (const v of volumes) await updateVolumeState(store, v, { paused });
  changed();
  return volumes.map((volume) => ({ volume, paused }));
}

/** End the pause of `names` (every volume with `all`); returns the volumes that were paused, with their pause. */
export async function resumeVolumes(store: PauseStore, names: readonly string[], opts: { readonly all?: boolean; readonly now: number }): Promise<Array<{ volume: string; paused: Pause }>> {
  const volumes = await pick(store, names, opts.all === true);
  const out: Array<{ volume: string; paused: Pause }> = [];
  for (const v of volumes) {
    const st = await readVolumeState(store, v);
    if (!st.paused) continue;
    const p = activePause(st.paused, opts.now);
    if (p) out.push({ volume: v, paused: p });
    await updateVolumeState(store, v, { paused: null });
  }
  changed();
  return out;
}
