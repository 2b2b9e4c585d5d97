/**
 * Loading HOME/config.yaml: YAML parse with line numbers, schema validation, semantic checks,
 * then normalization into a {@link Config} (durations in ms, defaults filled in).
 *
 * Every problem is a TandemError ERR_CONFIG_INVALID whose message starts with
 * `config.yaml:LINE: KEY.PATH:` and whose details are `{file, line, key, problems}` (all the
 * problems found, not only the first, so an operator fixes the file in one pass).
 */
import { readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { Value } from '@sinclair/typebox/value';
import { LineCounter, parseDocument, isNode, type Document } from 'yaml';
import { TandemError } from '../../common/errors.js';
import { parseDuration } from './duration.js';
import { parseSize } from './size.js';
import { windowProblems, type RawWindow } from './bwlimit.js';
import { ConfigSchema, type RawConfig, type RawPrices, type RawRecoveryPlan, type RawRetention } from './schema.js';
import { DEFAULT_HOOK_TIMEOUT_MS, DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_VERIFY_BYTES_PER_SEC, DEFAULT_VERIFY_EVERY_MS } from './defaults.js';

/** A named protection tier (normalized). */
export interface Policy {
  readonly name: string;
  readonly rpoMs: number;
  /** Recovery time objective, or null when the policy sets none (status then reports no RTO state). */
  readonly rtoMs: number | null;
  /** GFS counts; null keeps every snapshot. */
  readonly retention: RawRetention | null;
  /** 'ebs' when the cloud appliance exports each replicated snapshot to EBS. */
  readonly export: 'ebs' | null;
}

export interface Hooks {
  readonly pre: string | null;
  readonly post: string | null;
  readonly timeoutMs: number;
}

export interface Group {
  readonly name: string;
  readonly volumes: readonly string[];
  readonly hooks: Hooks | null;
}

export interface AssignRule {
  readonly match: string | null;
  readonly tag: string | null;
  readonly policy: string;
}

export interface Config {
  /** Absolute path of the file read (or the label given to parseConfig). */
  readonly file: string;
  readonly appliance: { readonly name: string };
  readonly policies: Readonly<Record<string, Policy>>;
  readonly assign: readonly AssignRule[];
  readonly groups: Readonly<Record<string, Group>>;
  readonly replication: { readonly peer: string; readonly bwlimit?: string; readonly schedule?: readonly RawWindow[] } | null;
  readonly alerts: { readonly webhook: string | null };
  /**
   * The daemon's scheduled verify: how often (null: never), at most how fast it reads, and the
   * peer whose copies heal what it finds (null: none; default `replication.peer`).
   */
  readonly verify: { readonly everyMs: number | null; readonly bytesPerSecond: number; readonly repairPeer: string | null };
  readonly discovery: { readonly paths: readonly string[]; readonly lvm: boolean; readonly libvirt: boolean };
  /** Price overrides as written (appliance/cost fills in the dated defaults). */
  readonly prices: RawPrices;
  /** Recovery plans by name, as written (read by appliance/recovery). */
  readonly recovery: Readonly<Record<string, RawRecoveryPlan>>;
  /**
   * How long a stopping `serve` or `daemon` gives its running jobs and forwarded commands to
   * finish before it stops them (their owed post hooks then run); `shutdown.grace`.
   */
  readonly shutdown: { readonly graceMs: number };
  /** The validated document as written. */
  readonly raw: RawConfig;
}


interface Problem {
  line: number;
  key: string;
  message: string;
}

/** Read and validate a config file. ERR_CONFIG_INVALID (with file, line, key) on any problem. */
export async function loadConfigFile(path: string): Promise<Config> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new TandemError('ERR_CONFIG_INVALID', `${path}: cannot read the config file (${(e as Error).message}); restore it from a backup, or write one (\`appliance init --home NEW --name X\` makes a default config.yaml to copy and edit); do not re-initialize this home, which would replace its identity and tokens`, { cause: e, details: { file: path, line: 0, key: '' } });
  }
  return parseConfig(text, path);
}

/** Parse and validate config text; `file` names it in errors. Pure apart from the error thrown. */
export function parseConfig(text: string, file: string): Config {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const problems: Problem[] = [];
  for (const err of doc.errors) {
    const line = lc.linePos(err.pos[0]).line;
    problems.push({ line, key: '', message: `YAML syntax: ${err.message.split('\n')[0]}` });
  }
  if (problems.length === 0) {
    const data: unknown = doc.toJS() ?? {};
    if (typeof data !== 'object' || Array.isArray(data)) {
      problems.push({ line: 1, key: '', message: 'the file must be a mapping of keys (appliance:, policies:, ...)' });
    } else {
      for (const e of Value.Errors(ConfigSchema, data)) {
        const path = e.path.split('/').slice(1).map(unescapePointer);
        problems.push({ line: lineOf(doc, lc, path), key: path.join('.'), message: schemaMessage(e.message, e.value, path) });
      }
      if (problems.length === 0) semanticChecks(data as RawConfig, doc, lc, problems);
      if (problems.length === 0) return normalize(data as RawConfig, file);
    }
  }
  throw configError(file, dedupe(problems));
}

function unescapePointer(s: string): string {
  return s.replace(/~1/g, '/').replace(/~0/g, '~');
}

function dedupe(problems: Problem[]): Problem[] {
  const seen = new Set<string>();
  // A missing key yields both "required" and "expected type" errors: keep the first per key.
  return problems.filter((p) => {
    const k = `${p.key}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  }).sort((a, b) => a.line - b.line);
}

function schemaMessage(message: string, value: unknown, path: string[]): string {
  if (/Unexpected property/.test(message)) return `unknown key "${path[path.length - 1]}" (misspelt? see appliance/config/README.md for the keys)`;
  if (/required property/.test(message)) return 'is required';
  if (/to match/.test(message)) return `${JSON.stringify(value)} is not valid (${message.replace(/^Expected/, 'expected')})`;
  return `${JSON.stringify(value) ?? 'nothing'}: ${message.replace(/^Expected/, 'expected')}`;
}

/** Line of the deepest existing node on `path` (1-based; 1 when nothing matches). */
function lineOf(doc: Document, lc: LineCounter, path: string[]): number {
  for (let n = path.length; n >= 0; n--) {
    // Sequences accept numeric-string indices, so the schema's path can be used as is.
    const node = n === 0 ? doc.contents : doc.getIn(path.slice(0, n), true);
    if (isNode(node) && node.range) return lc.linePos(node.range[0]).line;
  }
  return 1;
}

function semanticChecks(raw: RawConfig, doc: Document, lc: LineCounter, problems: Problem[]): void {
  const at = (path: (string | number)[], message: string) =>
    problems.push({ line: lineOf(doc, lc, path.map(String)), key: path.join('.'), message });
  const duration = (path: (string | number)[], v: string | undefined) => {
    if (v === undefined) return;
    try {
      parseDuration(v);
    } catch {
      at(path, `"${v}" is not a duration (write e.g. 15m, 1h)`);
    }
  };
  const size = (path: (string | number)[], v: string | undefined) => {
    if (v === undefined) return;
    try {
      if (parseSize(v) <= 0) throw new Error('zero');
    } catch {
      at(path, `"${v}" is not a rate (write e.g. 50MiB, a number of bytes a second)`);
    }
  };
  size(['replication', 'bwlimit'], raw.replication?.bwlimit);
  (raw.replication?.schedule ?? []).forEach((w, i) => {
    for (const [key, message] of windowProblems(w)) at(['replication', 'schedule', i, key], message);
  });
  size(['verify', 'bwlimit'], raw.verify?.bwlimit);
  if (raw.verify?.every !== undefined && raw.verify.every !== 'off') duration(['verify', 'every'], raw.verify.every);
  const policies = raw.policies ?? {};
  for (const [name, p] of Object.entries(policies)) {
    duration(['policies', name, 'rpo'], p.rpo);
    duration(['policies', name, 'rto'], p.rto);
  }
  (raw.assign ?? []).forEach((rule, i) => {
    if ((rule.match === undefined) === (rule.tag === undefined)) at(['assign', i], 'give exactly one of `match` (a name glob) or `tag`');
    if (!(rule.policy in policies)) at(['assign', i, 'policy'], `policy "${rule.policy}" is not defined under policies:`);
  });
  for (const [name, plan] of Object.entries(raw.recovery ?? {})) {
    duration(['recovery', name, 'drill', 'check', 'timeout'], plan.drill?.check?.timeout);
    duration(['recovery', name, 'drill', 'check', 'interval'], plan.drill?.check?.interval);
    duration(['recovery', name, 'drill', 'every'], plan.drill?.every);
  }
  duration(['shutdown', 'grace'], raw.shutdown?.grace);
  const groupOf = new Map<string, string>();
  for (const [name, g] of Object.entries(raw.groups ?? {})) {
    duration(['groups', name, 'hooks', 'timeout'], g.hooks?.timeout);
    g.volumes.forEach((v, i) => {
      const other = groupOf.get(v);
      if (other !== undefined) at(['groups', name, 'volumes', i], `volume "${v}" is already in group "${other}"; a volume belongs to at most one group`);
      groupOf.set(v, name);
    });
  }
}

function normalize(raw: RawConfig, file: string): Config {
  const policies: Record<string, Policy> = {};
  for (const [name, p] of Object.entries(raw.policies ?? {})) {
    policies[name] = {
      name,
      rpoMs: parseDuration(p.rpo),
      rtoMs: p.rto === undefined ? null : parseDuration(p.rto),
      retention: p.retention ?? null,
      export: p.export ?? null,
    };
  }
  const groups: Record<string, Group> = {};
  for (const [name, g] of Object.entries(raw.groups ?? {})) {
    groups[name] = {
      name,
      volumes: [...g.volumes],
      hooks: g.hooks === undefined ? null : {
        pre: g.hooks.pre ?? null,
        post: g.hooks.post ?? null,
        timeoutMs: g.hooks.timeout === undefined ? DEFAULT_HOOK_TIMEOUT_MS : parseDuration(g.hooks.timeout),
      },
    };
  }
  return {
    file,
    appliance: { name: raw.appliance.name },
    policies,
    assign: (raw.assign ?? []).map((r) => ({ match: r.match ?? null, tag: r.tag ?? null, policy: r.policy })),
    groups,
    replication: raw.replication ?? null,
    alerts: { webhook: raw.alerts?.webhook ?? null },
    verify: {
      everyMs: raw.verify?.every === 'off' ? null : raw.verify?.every === undefined ? DEFAULT_VERIFY_EVERY_MS : parseDuration(raw.verify.every),
      bytesPerSecond: raw.verify?.bwlimit === undefined ? DEFAULT_VERIFY_BYTES_PER_SEC : parseSize(raw.verify.bwlimit),
      repairPeer: raw.verify?.repair === 'off' ? null : raw.verify?.repair ?? raw.replication?.peer ?? null,
    },
    discovery: { paths: raw.discovery?.paths ?? [], lvm: raw.discovery?.lvm ?? true, libvirt: raw.discovery?.libvirt ?? true },
    prices: raw.prices ?? {},
    recovery: raw.recovery ?? {},
    shutdown: { graceMs: raw.shutdown?.grace === undefined ? DEFAULT_SHUTDOWN_GRACE_MS : parseDuration(raw.shutdown.grace) },
    raw,
  };
}

function configError(file: string, problems: Problem[]): TandemError {
  const name = basename(file);
  const lines = problems.map((p) => `${name}:${p.line}: ${p.key ? `${p.key}: ` : ''}${p.message}`);
  const first = problems[0]!;
  const more = lines.length > 1 ? `\n${lines.slice(1).join('\n')}` : '';
  return new TandemError('ERR_CONFIG_INVALID', `${lines[0]}${more}\nfix ${file} and rerun (\`appliance config check\` validates it)`, {
    details: { file, line: first.line, key: first.key, problems },
  });
}
