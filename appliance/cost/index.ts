/**
 * `appliance cost`: what the DR site costs per month, from measured data (store sizes, change
 * rates) and a dated price table, against a hot standby. See compute.ts for the arithmetic.
 */
import type { SnapshotRecord, VolumeRecord } from '../../store/types.js';
import { policyFor, type Config } from '../config/index.js';
import { readRates } from '../scheduler/index.js';
import { computeCost, retentionDays, DEFAULT_DAILY_CHANGE_FRACTION, type CostInput, type CostReport, type CostVolume } from './compute.js';
import { resolvePrices } from './prices.js';

export { computeCost, retentionDays, HOURS_PER_MONTH, DEFAULT_DAILY_CHANGE_FRACTION, type CostInput, type CostReport, type CostLine, type CostVolume, type CostPlan } from './compute.js';
export { DEFAULT_PRICES, resolvePrices, type PriceTable } from './prices.js';

/** Two snapshots closer than this say little about a daily change rate. */
const MIN_MEASURE_WINDOW_MS = 3_600_000;
const DAY_MS = 86_400_000;

export interface CostStore {
  listVolumes(): Promise<VolumeRecord[]>;
  listSnapshots(volume: string): Promise<SnapshotRecord[]>;
  diffSnapshots(base: SnapshotRecord | null, target: SnapshotRecord): AsyncIterable<{ index: number }>;
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
}

/**
 * The change rate of a volume: blocks differing between its oldest and newest snapshot over
 * the time between them (at least an hour apart), else the bytes its replications sent per
 * job times jobs per day, else the default fraction of its data.
 */
async function changeRate(store: CostStore, v: VolumeRecord, snaps: SnapshotRecord[], dataBytes: number, rpoMs: number | null): Promise<{ perDay: number; basis: string }> {
  const oldest = snaps[0];
  const newest = snaps[snaps.length - 1];
  if (oldest && newest && oldest !== newest) {
    const window = Date.parse(newest.created) - Date.parse(oldest.created);
    if (window >= MIN_MEASURE_WINDOW_MS && oldest.size === newest.size && oldest.blockSize === newest.blockSize) {
      let changed = 0;
      for await (const _ of store.diffSnapshots(oldest, newest)) changed++;
      return { perDay: (changed * newest.blockSize * DAY_MS) / window, basis: `measured: ${changed} blocks changed in ${(window / 3_600_000).toFixed(1)} h of snapshots` };
    }
  }
  const rates = await readRates(store, v.name);
  if (rates.samples > 0 && rates.lastChangedBytes > 0 && rpoMs !== null) {
    return { perDay: (rates.lastChangedBytes * DAY_MS) / rpoMs, basis: 'measured: bytes sent by the last replication, one per RPO' };
  }
  return { perDay: dataBytes * DEFAULT_DAILY_CHANGE_FRACTION, basis: `not measured yet: assumed ${DEFAULT_DAILY_CHANGE_FRACTION * 100} % of the data per day` };
}

/** Gather the measured inputs from the store and config. Read-only. */
export async function gatherCostInput(store: CostStore, config: Config): Promise<CostInput> {
  const volumes: CostVolume[] = [];
  for (const v of await store.listVolumes()) {
    const policy = policyFor(config, v);
    const snaps = await store.listSnapshots(v.name);
    const newest = snaps[snaps.length - 1];
    const dataBytes = newest ? newest.nonZeroBlocks * newest.blockSize : 0;
    const rate = await changeRate(store, v, snaps, dataBytes, policy?.rpoMs ?? null);
    volumes.push({
      name: v.name,
      sizeBytes: newest?.size ?? v.size,
      dataBytes,
      changedBytesPerDay: rate.perDay,
      changeBasis: rate.basis,
      rpoMs: policy?.rpoMs ?? null,
      exportEbs: policy?.export === 'ebs',
      retentionDays: policy ? retentionDays(policy.retention, policy.rpoMs) : null,
    });
  }
  const plans = Object.entries(config.recovery).map(([name, r]) => ({
    name,
    instanceType: r.instanceType,
    volumes: [r.rootVolume.volume, ...(r.dataVolumes ?? []).map((d) => d.volume)],
  }));
  return { prices: resolvePrices(config.prices), volumes, plans };
}

export async function costReport(store: CostStore, config: Config): Promise<CostReport> {
  return computeCost(await gatherCostInput(store, config));
}
