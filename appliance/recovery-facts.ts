/**
 * What a volume's recovery at the DR site would take, as the cloud appliance knows it: its last
 * EBS export, the export rate and launch time it measured, its last drill. `status` estimates
 * the RTO from them (status.ts estimateRto). The on-prem appliance has none of them (exports,
 * drills and failovers run on the cloud appliance), so the cloud appliance gives them in every
 * lock answer (POST /v1/volumes/VOL/lock, `recovery`: sync/README.md) and a push records them
 * with its sync base (sync-base.ts): on-prem `status` then estimates from the cloud's measured
 * numbers and exports, not from a full first export at default rates.
 */
import type { Store } from '../store/index.js';
import { readRates } from './scheduler/state.js';

export interface RecoveryFacts {
  /** The volume's last EBS export: the Tandem snapshot it holds and when it completed. */
  readonly lastExport: { readonly ebsSnapshotId: string; readonly tandemSnapshot: string; readonly created: string } | null;
  /** EBS upload rate measured by exports (bytes/s); null until one is measured. */
  readonly exportBytesPerSec: number | null;
  /** Time to launch measured by the last failover or drill (seconds), and when; null until one ran. */
  readonly launchSeconds: number | null;
  readonly launchMeasuredAt: string | null;
  /** The newest drill of the volume. */
  readonly lastDrill: { readonly id: string; readonly at: string; readonly passed: boolean; readonly rtoSeconds: number | null } | null;
}

/** Meta records the recovery facts are read from (status.ts reads them too): a drill (`drills`), the measured RTO (`rto`), an EBS export (`ebs-exports`). */
export interface DrillRecord { id: string; at: string; volumes: string[]; passed: boolean; rtoSeconds: number | null }
export interface RtoRecord { at: string; rtoSeconds: number | null; launchSeconds?: number | null }
export interface ExportRecord { ebsSnapshotId: string; tandemSnapshot: string; created: string }

/** This appliance's {@link RecoveryFacts} of `volume`. */
export async function recoveryFacts(store: Pick<Store, 'getMeta' | 'listMeta'>, volume: string): Promise<RecoveryFacts> {
  const exports = (await store.getMeta<ExportRecord[]>('ebs-exports', volume)) ?? [];
  const last = exports.length > 0 ? exports[exports.length - 1]! : null;
  const rto = await store.getMeta<RtoRecord>('rto', volume);
  const rates = await readRates(store, volume);
  const drill = (await store.listMeta<DrillRecord>('drills'))
    .map(([, d]) => d)
    .filter((d) => Array.isArray(d.volumes) && d.volumes.includes(volume))
    .sort((a, b) => (a.at < b.at ? 1 : -1))[0];
  return {
    lastExport: last ? { ebsSnapshotId: last.ebsSnapshotId, tandemSnapshot: last.tandemSnapshot, created: last.created } : null,
    exportBytesPerSec: rates.exportBytesPerSec ?? null,
    launchSeconds: rto?.rtoSeconds ?? null,
    launchMeasuredAt: rto?.rtoSeconds != null ? rto.at : null,
    lastDrill: drill ? { id: drill.id, at: drill.at, passed: drill.passed === true, rtoSeconds: drill.rtoSeconds ?? null } : null,
  };
}

const isString = (s: unknown, max = 256): s is string => typeof s === 'string' && s.length > 0 && s.length <= max;
const isTime = (s: unknown): s is string => isString(s, 64) && Number.isFinite(Date.parse(s));
const isRate = (n: unknown): n is number => typeof n === 'number' && Number.isFinite(n) && n > 0;

/**
 * A peer's `recovery` as a lock answer gives it, checked field by field (a peer is not trusted to
 * send sense); null when it is absent or malformed (a peer of an earlier version sends none): the
 * estimate then falls back to this appliance's own records and default rates.
 */
export function checkRecoveryFacts(v: unknown): RecoveryFacts | null {
  if (typeof v !== 'object' || v === null) return null;
  const r = v as Record<string, unknown>;
  const e = r.lastExport as Record<string, unknown> | null | undefined;
  const d = r.lastDrill as Record<string, unknown> | null | undefined;
  const lastExport = e === null ? null : e && isString(e.ebsSnapshotId) && isString(e.tandemSnapshot) && isTime(e.created) ? { ebsSnapshotId: e.ebsSnapshotId, tandemSnapshot: e.tandemSnapshot, created: e.created } : undefined;
  const lastDrill = d === null ? null : d && isString(d.id) && isTime(d.at) && typeof d.passed === 'boolean' && (d.rtoSeconds === null || isRate(d.rtoSeconds)) ? { id: d.id, at: d.at, passed: d.passed, rtoSeconds: d.rtoSeconds as number | null } : undefined;
  if (lastExport === undefined || lastDrill === undefined) return null;
  if (!(r.exportBytesPerSec === null || isRate(r.exportBytesPerSec))) return null;
  if (!(r.launchSeconds === null || isRate(r.launchSeconds))) return null;
  if (!(r.launchMeasuredAt === null || isTime(r.launchMeasuredAt))) return null;
  return { lastExport, exportBytesPerSec: r.exportBytesPerSec, launchSeconds: r.launchSeconds, launchMeasuredAt: r.launchMeasuredAt as string | null, lastDrill };
}
