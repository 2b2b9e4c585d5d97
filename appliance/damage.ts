/**
 * What the last verify of this store found damaged or missing, by hash (meta `verify` /
 * `damage`), so the paired appliance can heal it by pushing good copies
 * (`appliance repair --peer NAME --push`, GET /v1/damage, POST /v1/blocks/repair and
 * POST /v1/nodes/put: sync/README.md, Repair). A verify of the whole store replaces the record; a
 * verify of part of it adds what it found; a healed block or node leaves it.
 */
import type { VerifyReport } from '../store/types.js';

/** The meta namespace of verify's records: this one and the scheduled verify's state (scheduler/verify.ts). */
export const VERIFY_NS = 'verify';
export const DAMAGE_KEY = 'damage';
/** Hashes kept at most (a store with more damage than this needs a resync, not a repair). */
export const MAX_DAMAGE_KEPT = 100_000;

export interface DamageRecord {
  /** When the verify that found it ended (ISO). */
  readonly at: string;
  /** Distinct damaged or missing blocks and tree nodes, lowercase hex. */
  readonly blocks: readonly string[];
  readonly nodes: readonly string[];
}

export interface DamageStore {
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
  putMeta(ns: string, key: string, value: unknown): Promise<void>;
}

export async function readDamage(store: DamageStore): Promise<DamageRecord> {
  return (await store.getMeta<DamageRecord>(VERIFY_NS, DAMAGE_KEY)) ?? { at: new Date(0).toISOString(), blocks: [], nodes: [] };
}

/** Record what `report` found; `whole`: it verified every snapshot of the store. */
export async function recordDamage(store: DamageStore, report: VerifyReport, whole: boolean): Promise<void> {
  const before = whole ? { blocks: [], nodes: [] } : await readDamage(store);
  const pick = (kind: 'block' | 'node', old: readonly string[]) =>
    [...new Set([...old, ...report.problems.filter((p) => p.kind === kind).map((p) => p.hash)])].slice(0, MAX_DAMAGE_KEPT);
  const next: DamageRecord = { at: new Date().toISOString(), blocks: pick('block', before.blocks), nodes: pick('node', before.nodes) };
  if (whole || next.blocks.length + next.nodes.length > 0) await store.putMeta(VERIFY_NS, DAMAGE_KEY, next);
}

/** Take healed blocks and nodes (hex hashes) off the record. */
export async function clearDamage(store: DamageStore, healed: readonly string[]): Promise<void> {
  if (healed.length === 0) return;
  const d = await readDamage(store);
  const gone = new Set(healed);
  // Most calls heal nothing listed (every node a sync puts passes here): then nothing is written.
  if (!d.blocks.some((h) => gone.has(h)) && !d.nodes.some((h) => gone.has(h))) return;
  await store.putMeta(VERIFY_NS, DAMAGE_KEY, { ...d, blocks: d.blocks.filter((h) => !gone.has(h)), nodes: d.nodes.filter((h) => !gone.has(h)) } satisfies DamageRecord);
}
