/**
 * The appliance configuration (HOME/config.yaml): loading, validation and the lookups other
 * modules need (which policy protects a volume, which group and hooks it belongs to).
 * Keys are documented in ./README.md.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, extname, join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import type { VolumeRecord } from '../../store/types.js';
import type { Home, HomePaths } from '../home.js';
import { homePaths, writeFileAtomic } from '../home.js';
import type { AssignRule, Config, Group, Hooks, Policy } from './load.js';

import { DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_VERIFY_BYTES_PER_SEC, DEFAULT_VERIFY_EVERY_MS } from './defaults.js';

export { DEFAULT_HOOK_TIMEOUT_MS, DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_VERIFY_EVERY_MS, DEFAULT_VERIFY_BYTES_PER_SEC } from './defaults.js';
export { parseSize } from './size.js';
export type { Config, Policy, Group, Hooks, AssignRule } from './load.js';
export { parseDuration, formatDuration } from './duration.js';
export type { RawConfig, RawPolicy, RawRecoveryPlan, RawRetention, RawHooks, RawPrices, RawAssignRule } from './schema.js';

/** The parser (YAML, and the schema's validator): loaded only when a config is parsed. */
function parser(): typeof import('./load.js') {
  return require('./load.js') as typeof import('./load.js');
}

/** Parse and validate config text; `file` names it in errors (load.ts). */
export function parseConfig(text: string, file: string): Config {
  return parser().parseConfig(text, file);
}

/** Read and validate a config file; ERR_CONFIG_INVALID (with file, line, key) on any problem (load.ts). */
export async function loadConfigFile(path: string): Promise<Config> {
  return parser().loadConfigFile(path);
}

/**
 * Load and validate HOME/config.yaml (a Home or a home directory path). Reads the file on every
 * call: the daemon calls it again to pick up edits. Throws ERR_CONFIG_INVALID naming file, line and key.
 *
 * A config that validated is kept, parsed, in HOME/run/config.json, under a key of the file's path
 * and text and of the parser's own source: the next command whose config.yaml is unchanged reads
 * that instead of loading the YAML parser and the schema's validator, ~110 ms of CPU of each
 * `appliance status`, `volume add`, `doctor`, `failover` (0.31 s for a `status` before). An edit, a
 * new release or a damaged file makes it parse again; an invalid config is never kept.
 */
export async function loadConfig(home: Home | string): Promise<Config> {
  const paths = typeof home === 'string' ? homePaths(home) : home.paths;
  let text: string;
  try {
    text = await readFile(paths.config, 'utf8');
  } catch {
    return loadConfigFile(paths.config); // its error says what to do
  }
  return homeConfigOf(paths, text);
}

/**
 * The Config of `text`, HOME/config.yaml as the caller just read it: the kept copy when it is of
 * this text, else parsed (and kept). ERR_CONFIG_INVALID as parseConfig.
 */
export function homeConfigOf(paths: HomePaths, text: string): Config {
  const key = keyOf(paths.config, text);
  const kept = join(paths.run, 'config.json');
  try {
    const c = JSON.parse(readFileSync(kept, 'utf8')) as { key?: string; config?: Config };
    if (c.key === key && c.config) return c.config;
  } catch {
    // none yet, or unreadable: parsed below
  }
  const config = parseConfig(text, paths.config);
  keep(kept, key, config);
  return config;
}

/** What a kept config is filed under: the parser's source, the file's path and its text. */
function keyOf(file: string, text: string): string {
  return createHash('sha256').update(parserFingerprint()).update('\0').update(file).update('\0').update(text).digest('hex');
}

/**
 * `appliance init`: keeps the Config of the default config.yaml it wrote (`text`, naming the
 * appliance `name`), made here without the parser, so that the home's first commands need none
 * either. Not for a name YAML reads as something else than that string (a number, true, null):
 * that config is parsed, and refused, as written. config.test.ts checks it equals the parser's.
 */
export function keepDefaultConfig(homeDir: string, text: string, name: string): void {
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(name) || /^(null|true|false)$/i.test(name)) return;
  const paths = homePaths(homeDir);
  keep(join(paths.run, 'config.json'), keyOf(paths.config, text), defaultParsed(name, paths.config));
}

/** The Config of a file that names the appliance and sets nothing else (load.ts normalize, by hand). */
export function defaultParsed(name: string, file: string): Config {
  return {
    file,
    appliance: { name },
    policies: {},
    assign: [],
    groups: {},
    replication: null,
    alerts: { webhook: null },
    verify: { everyMs: DEFAULT_VERIFY_EVERY_MS, bytesPerSecond: DEFAULT_VERIFY_BYTES_PER_SEC, repairPeer: null },
    discovery: { paths: [], lvm: true, libvirt: true },
    prices: {},
    recovery: {},
    shutdown: { graceMs: DEFAULT_SHUTDOWN_GRACE_MS },
    raw: { appliance: { name } } as Config['raw'],
  };
}

/** Writes the parsed config for the next command (best effort: a home it cannot write parses each time). */
function keep(file: string, key: string, config: Config): void {
  const json = JSON.stringify({ key, config });
  // Only what reads back the same: JSON has no undefined, Infinity or Date.
  if (!isDeepStrictEqual((JSON.parse(json) as { config: Config }).config, config)) return;
  try {
    mkdirSync(dirname(file), { recursive: true });
    writeFileAtomic(file, json, 0o600);
  } catch {
    // not kept: parsed again next time
  }
}

let fingerprint: string | undefined;
/** The source of the modules that parse and normalize a config: a release that changes them parses again. */
function parserFingerprint(): string {
  if (fingerprint === undefined) {
    const h = createHash('sha256');
    for (const m of ['load', 'schema', 'defaults', 'duration', 'size', 'bwlimit']) h.update(readFileSync(join(__dirname, `${m}${extname(__filename)}`)));
    fingerprint = h.digest('hex');
  }
  return fingerprint;
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
