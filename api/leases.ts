/**
 * Volume leases: how a remote sync holds a volume's lock on this appliance across many requests.
 *
 * POST /v1/volumes/:vol/lock takes the volume lock (appliance/locks.ts, the same lock local
 * snapshots, syncs and restores take) on behalf of a holder (the calling appliance's id) and
 * returns a lease id. Requests carrying the lease header keep it alive, and so does each block of
 * a block stream carrying it (a stream under --bwlimit can run for hours); commit or DELETE
 * releases it; a lease idle for {@link LEASE_IDLE_MS} expires. A new lease request from the
 * same holder takes an existing lease over: that holder's previous sync died (its own local
 * volume lock keeps two of its syncs of one volume from running at once), and the rerun must not
 * wait for the timeout. Any other holder gets ERR_VOLUME_LOCKED.
 */
import { randomUUID } from 'node:crypto';
import { TandemError } from '../common/errors.js';
import type { Home } from '../appliance/home.js';

/** A client that stops talking for this long has died or lost the link: free the volume. */
export const LEASE_IDLE_MS = 120_000;

interface Lease {
  readonly id: string;
  readonly volume: string;
  readonly holder: string;
  readonly since: string;
  readonly release: () => void;
  timer: NodeJS.Timeout;
}

export class LeaseTable {
  private readonly byVolume = new Map<string, Lease>();
  private readonly byId = new Map<string, Lease>();

  constructor(private readonly home: Home, private readonly idleMs = LEASE_IDLE_MS) {}

  /** Take the volume for `holder`; ERR_VOLUME_LOCKED when another holder or a local operation has it. */
  acquire(volume: string, holder: string): { lease: string; expiresInMs: number } {
    const cur = this.byVolume.get(volume);
    if (cur) {
      if (cur.holder !== holder) {
        throw new TandemError('ERR_VOLUME_LOCKED', `volume "${volume}" is busy: a sync from ${cur.holder} holds it since ${cur.since}; wait for it to finish and retry`, {
          details: { volume, holder: cur.holder, since: cur.since },
        });
      }
      this.drop(cur);
    }
    const release = this.home.lockVolume(volume, `sync from ${holder}`);
    const lease: Lease = {
      id: randomUUID(),
      volume,
      holder,
      since: new Date().toISOString(),
      release,
      timer: setTimeout(() => this.drop(lease), this.idleMs).unref(),
    };
    this.byVolume.set(volume, lease);
    this.byId.set(lease.id, lease);
    return { lease: lease.id, expiresInMs: this.idleMs };
  }

  /** Keep a lease alive (any request carrying it). Unknown ids are ignored. */
  touch(id: string): void {
    this.byId.get(id)?.timer.refresh();
  }

  /** The volume of a live lease, or undefined. */
  volumeOf(id: string): string | undefined {
    return this.byId.get(id)?.volume;
  }

  /** The holder of a live lease, or undefined. */
  holderOf(id: string): string | undefined {
    return this.byId.get(id)?.holder;
  }

  /** True when a lease other than `id` holds `volume`. */
  heldByOther(volume: string, id: string | undefined): boolean {
    const cur = this.byVolume.get(volume);
    return cur !== undefined && cur.id !== id;
  }

  release(id: string): boolean {
    const l = this.byId.get(id);
    if (!l) return false;
    this.drop(l);
    return true;
  }

  releaseAll(): void {
    for (const l of [...this.byId.values()]) this.drop(l);
  }

  private drop(l: Lease): void {
    clearTimeout(l.timer);
    if (this.byId.get(l.id) === l) this.byId.delete(l.id);
    if (this.byVolume.get(l.volume) === l) this.byVolume.delete(l.volume);
    l.release();
  }
}
