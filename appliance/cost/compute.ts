/**
 * The monthly cost of the DR site against a hot standby, as pure arithmetic over measured
 * inputs. Every line carries its quantity, unit price and a sentence saying where the
 * numbers come from, so an operator can check each one.
 */
import type { PriceTable } from './prices.js';

/** AWS bills a month as 730 hours. */
export const HOURS_PER_MONTH = 730;
export const DAYS_PER_MONTH = HOURS_PER_MONTH / 24;
/** AWS storage "GB" in GB-month prices is GiB. */
export const GB = 1024 ** 3;
/** EBS direct APIs move 512 KiB blocks: one request per block. */
export const EBS_BLOCK_BYTES = 524288;
/** Until a change rate is measured: 2 % of the data per day, a common figure for servers. */
export const DEFAULT_DAILY_CHANGE_FRACTION = 0.02;
/** With no retention (keep everything) storage grows without bound; the estimate counts one month. */
export const UNBOUNDED_RETENTION_DAYS = 30;

export interface CostVolume {
  readonly name: string;
  readonly sizeBytes: number;
  /** Non-zero data in the newest snapshot. */
  readonly dataBytes: number;
  readonly changedBytesPerDay: number;
  /** How the change rate was obtained (for the explanation). */
  readonly changeBasis: string;
  readonly rpoMs: number | null;
  readonly exportEbs: boolean;
  /** Days of history the policy's retention keeps (null: keeps everything). */
  readonly retentionDays: number | null;
}

export interface CostPlan {
  readonly name: string;
  readonly instanceType: string;
  readonly volumes: readonly string[];
}

export interface CostInput {
  readonly prices: PriceTable;
  readonly volumes: readonly CostVolume[];
  readonly plans: readonly CostPlan[];
}

export interface CostLine {
  readonly item: string;
  readonly quantity: number;
  readonly unit: string;
  readonly unitPrice: number;
  /** USD per month (or per event for one-off lines). */
  readonly cost: number;
  readonly explain: string;
}

export interface CostReport {
  readonly prices: { readonly region: string; readonly date: string; readonly note: string };
  readonly dr: { readonly lines: CostLine[]; readonly monthly: number };
  readonly hotStandby: { readonly lines: CostLine[]; readonly monthly: number };
  /** Costs per event, not per month (first export, a failback). */
  readonly oneOff: CostLine[];
  readonly savingsMonthly: number;
}

const round = (x: number, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;
const gib = (b: number) => b / GB;
const fmt = (x: number, d = 1) => x.toLocaleString('en-US', { maximumFractionDigits: d });
/** Bytes in the unit that keeps the number readable (GiB, MiB or KiB). */
const size = (b: number) => (b >= GB ? `${fmt(b / GB, 2)} GiB` : b >= 1024 ** 2 ? `${fmt(b / 1024 ** 2, 1)} MiB` : `${fmt(b / 1024, 0)} KiB`);

function line(item: string, quantity: number, unit: string, unitPrice: number, explain: string, per = 1): CostLine {
  return { item, quantity: round(quantity, 3), unit, unitPrice, cost: round((quantity / per) * unitPrice, 4), explain };
}

/** Stored incremental history: the change over the retention window, at most one full copy per retained day. */
function historyBytes(v: CostVolume): number {
  const days = v.retentionDays ?? UNBOUNDED_RETENTION_DAYS;
  return Math.min(v.changedBytesPerDay * days, v.sizeBytes * Math.max(1, days));
}

export function computeCost(input: CostInput): CostReport {
  const p = input.prices;
  const dr: CostLine[] = [];
  const oneOff: CostLine[] = [];
  for (const v of input.volumes) {
    const history = historyBytes(v);
    const days = v.retentionDays ?? UNBOUNDED_RETENTION_DAYS;
    const storedGb = gib(v.dataBytes + history);
    const keep = v.retentionDays === null ? `no retention (keeps every snapshot: grows; ${UNBOUNDED_RETENTION_DAYS} days counted)` : `retention keeps ${fmt(days)} days`;
    const how = `${size(v.dataBytes)} of data + ${size(v.changedBytesPerDay)}/day changed (${v.changeBasis}) x ${keep}`;
    if (v.exportEbs) {
      dr.push(line(`${v.name}: EBS snapshot storage`, storedGb, 'GB-month', p.snapshotGbMonth, `incremental EBS snapshots: ${how}`));
      const blocksPerMonth = (v.changedBytesPerDay * DAYS_PER_MONTH) / EBS_BLOCK_BYTES;
      const exportsPerMonth = v.rpoMs ? (HOURS_PER_MONTH * 3_600_000) / v.rpoMs : 0;
      dr.push(line(`${v.name}: EBS PutSnapshotBlock`, blocksPerMonth, 'requests', p.ebsPutPer1000, `one request per changed 512 KiB block: ${size(v.changedBytesPerDay)}/day x ${fmt(DAYS_PER_MONTH)} days / 512 KiB, spread over ~${fmt(exportsPerMonth, 0)} exports (one per RPO)`, 1000));
      oneOff.push(line(`${v.name}: first full EBS export`, v.dataBytes / EBS_BLOCK_BYTES, 'requests', p.ebsPutPer1000, 'every non-zero block once (zero blocks are never sent)', 1000));
    }
    // The cloud appliance keeps the replicas in its own store, on gp3.
    dr.push(line(`${v.name}: replica store on the cloud appliance (gp3)`, storedGb, 'GB-month', p.gp3GbMonth, `deduplicated block store: ${how}`));
    const changedBlocks = Math.ceil((v.changedBytesPerDay * DAYS_PER_MONTH) / EBS_BLOCK_BYTES);
    oneOff.push(line(`${v.name}: failback reading a month of changes from EBS`, changedBlocks, 'requests', p.ebsGetPer1000, `GetSnapshotBlock for each block changed after a month running in AWS (${changedBlocks} blocks), plus a few ListChangedBlocks pages (${p.ebsListPer1000} USD per 1,000)`, 1000));
  }
  dr.push(line(`cloud appliance instance (${p.applianceInstance.type})`, HOURS_PER_MONTH, 'hours', p.applianceInstance.hourly, 'one instance running all month receives replicas and exports them to EBS'));

  const hot: CostLine[] = [];
  const byName = new Map(input.volumes.map((v) => [v.name, v]));
  for (const plan of input.plans) {
    const hourly = p.instances[plan.instanceType];
    hot.push(hourly === undefined
      ? { item: `${plan.name}: instance ${plan.instanceType}`, quantity: HOURS_PER_MONTH, unit: 'hours', unitPrice: 0, cost: 0, explain: `no price for ${plan.instanceType} in the table: add prices.instances["${plan.instanceType}"] to config.yaml (counted as 0)` }
      : line(`${plan.name}: instance ${plan.instanceType}`, HOURS_PER_MONTH, 'hours', hourly, 'the standby server runs all month'));
    const sizes = plan.volumes.map((n) => byName.get(n)?.sizeBytes ?? 0);
    hot.push(line(`${plan.name}: gp3 volumes`, gib(sizes.reduce((a, b) => a + b, 0)), 'GB-month', p.gp3GbMonth, `provisioned at full size: ${plan.volumes.join(', ')}`));
  }
  if (input.plans.length === 0) {
    for (const v of input.volumes) hot.push(line(`${v.name}: gp3 volume`, gib(v.sizeBytes), 'GB-month', p.gp3GbMonth, 'no recovery plans in config.yaml: standby instances not counted, only their volumes'));
  }
  const sum = (ls: CostLine[]) => round(ls.reduce((a, l) => a + l.cost, 0));
  const drMonthly = sum(dr);
  const hotMonthly = sum(hot);
  return {
    prices: { region: p.region, date: p.date, note: `AWS on-demand list prices for ${p.region} as of ${p.date}; check current prices and override them under prices: in config.yaml` },
    dr: { lines: dr, monthly: drMonthly },
    hotStandby: { lines: hot, monthly: hotMonthly },
    oneOff,
    savingsMonthly: round(hotMonthly - drMonthly),
  };
}

/** Days of history a retention policy keeps (the longest of its buckets), null when it keeps everything. */
export function retentionDays(retention: { last?: number; hourly?: number; daily?: number; weekly?: number; monthly?: number } | null, rpoMs: number | null): number | null {
  if (retention === null) return null;
  const day = 86_400_000;
  return Math.max(
    ((retention.last ?? 0) * (rpoMs ?? 0)) / day,
    (retention.hourly ?? 0) / 24,
    retention.daily ?? 0,
    (retention.weekly ?? 0) * 7,
    (retention.monthly ?? 0) * 30,
  );
}
