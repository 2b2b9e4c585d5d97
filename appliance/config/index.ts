/**
 * The appliance configuration (HOME/config.yaml): loading, validation and the lookups other
 * modules need (which policy protects a volume, which group and hooks it belongs to).
 * Keys are documented in ./README.md.
 */
import type { VolumeRecord } from '../../store/types.js';
import type { Home } from '../home.js';
import { homePaths } from '../home.js';
import { loadConfigFile } from './load.js';
import type { AssignRule, Config, Group, Hooks, Policy } from './load.js';

export { parseConfig, loadConfigFile, DEFAULT_HOOK_TIMEOUT_MS, DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_VERIFY_EVERY_MS, DEFAULT_VERIFY_BYTES_PER_SEC } from './load.js';
export { parseSize } from './size.js';
export type { Config, Policy, Group, Hooks, AssignRule } from './load.js';
export { parseDuration, formatDuration } from './duration.js';
export type { RawConfig, RawPolicy, RawRecoveryPlan, RawRetention, RawHooks, RawPrices, RawAssignRule } from './schema.js';

/**
 * Load and validate HOME/config.yaml (a Home or a home directory path). Reads the file on every
 * call: the daemon calls it again to pick up edits. Throws ERR_CONFIG_INVALID naming file, line and key.
 */
export async function loadConfig(home: Home | string): Promise<Config> {
  const path = typeof home === 'string' ? homePaths(home).config : home.paths.config;
  return loadConfigFile(path);
}

/**
 * Match a name against a glob: `*` any run of characters, `?` one character; everything else
 * literal. Globs are anchored (the whole name must match).
 */
export function globMatch(glob: string, name: string): boolean {
  const re = glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${re}$`).test(name);
}

function ruleMatches(rule: AssignRule, volume: Pick<VolumeRecord, 'name' | 'tags'>): boolean {
  if (rule.match !== null) return globMatch(rule.match, volume.name);
  return rule.tag !== null && (volume.tags ?? []).includes(rule.tag);
}

/**
 * The policy protecting a volume: its explicit `policy` (volume add --policy) when that names a
 * defined policy, else the first `assign` rule that matches its name or one of its tags, else null
 * (the volume is registered but not protected on a schedule).
 */
export function policyFor(config: Config, volume: Pick<VolumeRecord, 'name' | 'tags' | 'policy'>): Policy | null {
  if (volume.policy !== undefined) return config.policies[volume.policy] ?? null;
  for (const rule of config.assign) if (ruleMatches(rule, volume)) return config.policies[rule.policy] ?? null;
  return null;
}

/** The group a volume belongs to, or null (a volume is in at most one group; the config check enforces it). */
export function groupOf(config: Config, volumeName: string): Group | null {
  for (const g of Object.values(config.groups)) if (g.volumes.includes(volumeName)) return g;
  return null;
}

/**
 * The pre/post snapshot hooks that apply to a volume (those of its group), or null. Callers
 * that snapshot a volume wrap the snapshot with `withHooks(hooksForVolume(config, name), fn)`
 * (appliance/hooks.ts).
 */
export function hooksForVolume(config: Config, volumeName: string): Hooks | null {
  return groupOf(config, volumeName)?.hooks ?? null;
}
