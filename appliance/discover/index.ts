/**
 * `appliance discover`: find what this machine could protect (block devices, LVM logical
 * volumes, image files under `discovery.paths`, libvirt domains' disks), size each, estimate its
 * non-zero data, and propose a policy; optionally add the proposals to config.yaml.
 *
 * System tools are run through a {@link CommandRunner} (absent tools are skipped, never an
 * error), so the same code runs on recorded output in tests.
 */
import { execFile } from 'node:child_process';
import { readFile, stat } from 'node:fs/promises';
import { basename } from 'node:path';
import { isMap, isSeq, parseDocument, YAMLMap, YAMLSeq } from 'yaml';
import type { VolumeRecord } from '../../store/types.js';
import { policyFor, parseConfig, type Config } from '../config/index.js';
import { writeFileAtomic } from '../home.js';
import { estimateNonZero, findImages, imageFormat, type ImageFormat } from './images.js';
import { parseDomblklist, parseLsblk, parseLvs, parseVirshList, type Found } from './parse.js';

export { parseLsblk, parseLvs, parseVirshList, parseDomblklist, type Found } from './parse.js';
export { discoveryPathProblems, findImages, estimateNonZero, imageFormat, SAMPLE_COUNT, SAMPLE_BYTES } from './images.js';

/** Runs a tool; resolves its stdout, or null when the tool is absent or fails. */
export type CommandRunner = (cmd: string, args: readonly string[]) => Promise<string | null>;

/** A stuck tool (e.g. lvs waiting on a dead PV) must not hang discovery. */
const TOOL_TIMEOUT_MS = 15_000;

export const systemRunner: CommandRunner = (cmd, args) => new Promise((resolve) => {
  execFile(cmd, [...args], { timeout: TOOL_TIMEOUT_MS, maxBuffer: 16 * 1024 * 1024 }, (err, stdout) => resolve(err ? null : stdout));
});

/** The policy `--write` creates when config.yaml has none: hourly points, a day of hours, a week of days, a month of weeks. */
export const STARTER_POLICY = { name: 'standard', rpo: '1h', retention: { hourly: 24, daily: 7, weekly: 4 } } as const;

export interface Asset {
  /** Proposed volume name (valid for `appliance volume add`). */
  readonly name: string;
  readonly kind: Found['kind'];
  readonly path: string;
  readonly size: number;
  readonly format: ImageFormat | 'device';
  /** Estimated bytes of non-zero data (null: could not be read). */
  readonly nonZeroEstimate: number | null;
  readonly mountpoint: string | null;
  /** libvirt domains (and targets) using it. */
  readonly usedBy: string[];
  /** The volume already registered for this path, if any. */
  readonly registered: string | null;
  readonly proposedPolicy: string | null;
  /** Why it is not proposed, or what to do first. */
  readonly note: string | null;
}

export interface DiscoverOptions {
  readonly run?: CommandRunner;
}

function volumeName(s: string): string {
  return s.replace(/\.(img|raw|qcow2|vmdk|disk|bin)$/i, '').replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[-.]+/, '').slice(0, 64) || 'volume';
}

/** Find and describe protectable assets. Read-only. */
export async function discover(config: Config, volumes: readonly VolumeRecord[], opts: DiscoverOptions = {}): Promise<Asset[]> {
  const run = opts.run ?? systemRunner;
  const found: Found[] = [];
  const lvsOut = config.discovery.lvm ? await run('lvs', ['--reportformat', 'json', '--units', 'b', '-o', 'lv_name,vg_name,lv_attr,lv_size,lv_path']) : null;
  const lsblkOut = await run('lsblk', ['--json', '-b', '-o', 'NAME,PATH,SIZE,TYPE,MOUNTPOINT,FSTYPE,RO']);
  if (lsblkOut !== null) found.push(...parseLsblk(lsblkOut, config.discovery.lvm && lvsOut === null));
  if (lvsOut !== null) {
    // lsblk knows mount points of LVs (as /dev/mapper/VG-LV); lvs knows which are snapshots.
    found.push(...parseLvs(lvsOut));
  }
  for (const img of await findImages(config.discovery.paths)) {
    found.push({ kind: 'image', name: basename(img.path), path: img.path, size: img.size });
  }
  const usedBy = new Map<string, string[]>();
  if (config.discovery.libvirt) {
    const list = await run('virsh', ['list', '--all', '--name']);
    for (const domain of list === null ? [] : parseVirshList(list)) {
      const blk = await run('virsh', ['domblklist', domain, '--details']);
      for (const d of blk === null ? [] : parseDomblklist(domain, blk)) {
        usedBy.set(d.source, [...(usedBy.get(d.source) ?? []), `${d.domain}:${d.target}`]);
        if (!found.some((f) => f.path === d.source)) found.push({ kind: 'libvirt', name: `${d.domain}-${d.target}`, path: d.source, size: -1, domain: d.domain, target: d.target });
      }
    }
  }
  const byPath = new Map(volumes.filter((v) => v.path !== undefined).map((v) => [v.path!, v.name]));
  const names = new Set<string>(volumes.map((v) => v.name));
  const fallback = Object.keys(config.policies)[0] ?? STARTER_POLICY.name;
  const assets: Asset[] = [];
  for (const f of found) {
    let size = f.size;
    let format: Asset['format'] = f.kind === 'disk' || f.kind === 'lvm' || f.kind === 'loop' ? 'device' : 'raw';
    let nonZero: number | null = null;
    let note: string | null = f.skip ? `not proposed: ${f.skip}` : null;
    if (f.kind === 'loop') {
      // The file it reads: protected as an image where discovery finds it (one copy of the data, and
      // a restore onto either is refused while the other is in use), else as the device.
      const backing = await readFile(`/sys/block/${f.name}/loop/backing_file`, 'utf8').then((s) => s.trim(), () => null);
      if (backing !== null && found.some((o) => o.kind === 'image' && o.path === backing)) note = `not proposed: loop device of ${backing}, which is listed: protect the image`;
    }
    if (f.kind === 'image' || f.kind === 'libvirt') {
      try {
        const st = await stat(f.path);
        if (st.isBlockDevice()) format = 'device';
        else format = await imageFormat(f.path);
        if (size < 0) size = st.size;
        if (format === 'qcow2' || format === 'vmdk') {
          // Allocated space is the best estimate of a sparse image format's data.
          nonZero = st.blocks * 512;
          note = `${format} image: convert to raw first (qemu-img convert -O raw ${f.path} ${f.path.replace(/\.\w+$/, '')}.img), then protect the raw image`;
        }
      } catch {
        note = 'cannot be read from here (path missing or no permission)';
      }
    }
    if (size < 0) size = 0;
    if (nonZero === null && note === null) nonZero = await estimateNonZero(f.path, size);
    const registered = byPath.get(f.path) ?? null;
    let name = registered ?? volumeName(f.name);
    if (registered === null) {
      for (let i = 2; names.has(name); i++) name = `${volumeName(f.name)}-${i}`;
      names.add(name);
    }
    const proposable = note === null;
    const matched = policyFor(config, { name, ...(registered !== null ? { policy: volumes.find((v) => v.name === registered)?.policy } : {}) } as Pick<VolumeRecord, 'name' | 'policy'>);
    assets.push({
      name,
      kind: f.kind,
      path: f.path,
      size,
      format,
      nonZeroEstimate: nonZero,
      mountpoint: f.mountpoint ?? null,
      usedBy: usedBy.get(f.path) ?? [],
      registered,
      proposedPolicy: proposable ? matched?.name ?? fallback : null,
      note,
    });
  }
  return assets;
}

export interface WriteResult {
  readonly added: Array<{ name: string; policy: string }>;
  readonly createdPolicy: string | null;
  /** Commands that register the new volumes (the config assigns their policy). */
  readonly commands: string[];
}

/**
 * Add an `assign` rule (exact name → proposed policy) for each proposed asset that no rule
 * matches yet, creating the starter policy when config.yaml has no policy. Comments and layout
 * are preserved (YAML document API); the result is validated before it replaces the file
 * atomically, so a failure changes nothing. Idempotent.
 */
export async function writeDiscovered(configFile: string, config: Config, assets: readonly Asset[]): Promise<WriteResult> {
  const text = await readFile(configFile, 'utf8');
  const doc = parseDocument(text);
  const added: Array<{ name: string; policy: string }> = [];
  let createdPolicy: string | null = null;
  const commands: string[] = [];
  for (const a of assets) {
    if (a.proposedPolicy === null) continue;
    if (a.registered === null) commands.push(`appliance volume add ${a.name} --path ${a.path}`);
    const ruled = config.assign.some((r) => policyFor({ ...config, assign: [r] }, { name: a.name }) !== null);
    if (ruled) continue;
    if (!(a.proposedPolicy in config.policies) && createdPolicy === null) {
      if (!isMap(doc.get('policies'))) doc.set('policies', new YAMLMap());
      doc.setIn(['policies', a.proposedPolicy], doc.createNode({ rpo: STARTER_POLICY.rpo, retention: { ...STARTER_POLICY.retention } }));
      createdPolicy = a.proposedPolicy;
    }
    if (!isSeq(doc.get('assign'))) doc.set('assign', new YAMLSeq());
    (doc.get('assign') as YAMLSeq).add(doc.createNode({ match: a.name, policy: a.proposedPolicy }));
    added.push({ name: a.name, policy: a.proposedPolicy });
  }
  if (added.length > 0) {
    const next = doc.toString();
    parseConfig(next, configFile); // throws ERR_CONFIG_INVALID and leaves the file alone
    writeFileAtomic(configFile, next);
  }
  return { added, createdPolicy, commands };
}
