/**
 * The dated price table `appliance cost` uses. Defaults are AWS on-demand list prices for
 * us-east-1 (Linux, USD) as published at the date below; they change, and other regions
 * differ: check https://aws.amazon.com/ebs/pricing/ and https://aws.amazon.com/ec2/pricing/
 * and override any entry in config.yaml `prices:` (the output names the table's region and date).
 */
import type { RawPrices } from '../config/index.js';

export interface PriceTable {
  readonly region: string;
  readonly date: string;
  /** EBS snapshot storage, standard tier, per GB-month. */
  readonly snapshotGbMonth: number;
  /** EBS direct APIs: PutSnapshotBlock per 1,000 requests (one per 512 KiB block). */
  readonly ebsPutPer1000: number;
  /** GetSnapshotBlock per 1,000 requests. */
  readonly ebsGetPer1000: number;
  /** ListChangedBlocks / ListSnapshotBlocks per 1,000 requests. */
  readonly ebsListPer1000: number;
  /** The cloud appliance's own instance. */
  readonly applianceInstance: { readonly type: string; readonly hourly: number };
  /** On-demand hourly price by instance type (recovery plans' types for the hot standby). */
  readonly instances: Readonly<Record<string, number>>;
  /** gp3 volume storage per GB-month (baseline IOPS and throughput included). */
  readonly gp3GbMonth: number;
}

export const DEFAULT_PRICES: PriceTable = {
  region: 'us-east-1',
  date: '2026-11-01',
  snapshotGbMonth: 0.05,
  ebsPutPer1000: 0.006,
  ebsGetPer1000: 0.003,
  ebsListPer1000: 0.0006,
  // Hashing 512 KiB blocks and serving EBS APIs wants 2 steady vCPUs: not a burstable type.
  applianceInstance: { type: 'm6i.large', hourly: 0.096 },
  instances: {
    't3.small': 0.0208,
    't3.medium': 0.0416,
    't3.large': 0.0832,
    't3.xlarge': 0.1664,
    'm5.large': 0.096,
    'm5.xlarge': 0.192,
    'm6i.large': 0.096,
    'm6i.xlarge': 0.192,
    'm6i.2xlarge': 0.384,
    'm7i.large': 0.1008,
    'c6i.large': 0.085,
    'c6i.xlarge': 0.17,
    'r6i.large': 0.126,
    'r6i.xlarge': 0.252,
  },
  gp3GbMonth: 0.08,
};

/** The defaults with config.yaml's overrides applied. */
export function resolvePrices(overrides: RawPrices): PriceTable {
  return {
    ...DEFAULT_PRICES,
    ...Object.fromEntries(Object.entries(overrides).filter(([k]) => k !== 'instances')),
    instances: { ...DEFAULT_PRICES.instances, ...(overrides.instances ?? {}) },
  } as PriceTable;
}
