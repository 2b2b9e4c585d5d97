/**
 * Recovery plans: which servers to launch, from which volumes, where.
 *
 * A plan (config.yaml `recovery.NAME`, schema in ../config/schema.ts) describes one server to
 * bring up in EC2: its root volume, its data volumes, instance type, subnet, security groups,
 * private IP, user data, tags, and the isolated subnet a drill uses. The DR commands accept a
 * volume, a group or a plan name and act on every plan that involves it.
 */
import { TandemError } from '../../common/errors.js';
import type { RawRecoveryPlan } from '../config/schema.js';

export interface PlanDisk {
  readonly volume: string;
  readonly device: string;
  readonly root: boolean;
}

export interface RecoveryPlan {
  readonly name: string;
  readonly raw: RawRecoveryPlan;
  /** Root disk first, then data disks in config order. */
  readonly disks: readonly PlanDisk[];
}

/** The part of the loaded config this module reads. */
export interface RecoveryConfig {
  readonly recovery?: Readonly<Record<string, RawRecoveryPlan>>;
  readonly groups?: Readonly<Record<string, { readonly volumes: readonly string[] }>>;
}

export interface PlanSelector {
  /** A volume name: every plan whose root or data disks include it. */
  readonly volume?: string;
  /** A volume group (config `groups`): every plan that involves one of its volumes. */
  readonly group?: string;
  /** A plan by name. */
  readonly plan?: string;
}

export function toPlan(name: string, raw: RawRecoveryPlan): RecoveryPlan {
  const disks: PlanDisk[] = [{ volume: raw.rootVolume.volume, device: raw.rootVolume.device, root: true }];
  for (const d of raw.dataVolumes ?? []) disks.push({ volume: d.volume, device: d.device, root: false });
  const devices = new Set<string>();
  for (const d of disks) {
    if (devices.has(d.device)) {
      throw new TandemError('ERR_PLAN_INVALID', `recovery plan "${name}" maps two volumes to ${d.device}; give each disk its own device name`, { details: { plan: name } });
    }
    devices.add(d.device);
  }
  return { name, raw, disks };
}

/** The plans a DR command acts on; ERR_PLAN_INVALID with advice when none matches. */
export function selectPlans(config: RecoveryConfig, sel: PlanSelector): RecoveryPlan[] {
  const all = Object.entries(config.recovery ?? {}).map(([name, raw]) => toPlan(name, raw));
  if (all.length === 0) {
    throw new TandemError('ERR_PLAN_INVALID', 'config.yaml has no `recovery` plans; add one per server (instance type, subnet, security groups, root volume) and run `appliance config check`');
  }
  let wanted: Set<string>;
  let what: string;
  if (sel.plan !== undefined) {
    const p = all.find((x) => x.name === sel.plan);
    if (!p) throw new TandemError('ERR_PLAN_INVALID', `no recovery plan "${sel.plan}" in config.yaml; plans: ${all.map((x) => x.name).join(', ')}`);
    return [p];
  } else if (sel.group !== undefined) {
    const g = config.groups?.[sel.group];
    if (!g) throw new TandemError('ERR_PLAN_INVALID', `no volume group "${sel.group}" in config.yaml; groups: ${Object.keys(config.groups ?? {}).join(', ') || '(none)'}`);
    wanted = new Set(g.volumes);
    what = `group "${sel.group}"`;
  } else if (sel.volume !== undefined) {
    wanted = new Set([sel.volume]);
    what = `volume "${sel.volume}"`;
  } else {
    return all;
  }
  const plans = all.filter((p) => p.disks.some((d) => wanted.has(d.volume)));
  if (plans.length === 0) {
    throw new TandemError('ERR_PLAN_INVALID', `no recovery plan involves ${what}; add it as rootVolume or dataVolumes of a plan in config.yaml`);
  }
  return plans;
}
