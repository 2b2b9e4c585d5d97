/**
 * The schema of HOME/config.yaml (typebox). Every object is closed (`additionalProperties:
 * false`) so a misspelt key is an error, not a silently ignored setting. Keys are documented in
 * appliance/config/README.md; semantic checks that a schema cannot express (durations, names,
 * cross references) live in ./index.ts.
 */
import { Type, type Static } from '@sinclair/typebox';

const closed = { additionalProperties: false } as const;

/** A duration string such as 15m, 1h, 2h30m (parsed by ./duration.ts). */
const Duration = Type.String({ minLength: 2, description: 'duration: 30s, 15m, 1h, 2h30m, 1d, 1w' });
const Count = Type.Integer({ minimum: 0 });

export const RetentionSchema = Type.Object({
  last: Type.Optional(Count),
  hourly: Type.Optional(Count),
  daily: Type.Optional(Count),
  weekly: Type.Optional(Count),
  monthly: Type.Optional(Count),
}, closed);

export const PolicySchema = Type.Object({
  rpo: Duration,
  rto: Type.Optional(Duration),
  retention: Type.Optional(RetentionSchema),
  /** `ebs`: the cloud appliance turns every replicated snapshot into an EBS snapshot. */
  export: Type.Optional(Type.Literal('ebs')),
}, closed);

/** One rule of `assign`: a volume matching `match` (name glob) or carrying `tag` gets `policy`. */
export const AssignRuleSchema = Type.Object({
  match: Type.Optional(Type.String({ minLength: 1 })),
  tag: Type.Optional(Type.String({ minLength: 1 })),
  policy: Type.String({ minLength: 1 }),
}, closed);

export const HooksSchema = Type.Object({
  pre: Type.Optional(Type.String({ minLength: 1 })),
  post: Type.Optional(Type.String({ minLength: 1 })),
  timeout: Type.Optional(Duration),
}, closed);

export const GroupSchema = Type.Object({
  volumes: Type.Array(Type.String({ minLength: 1 }), { minItems: 1 }),
  hooks: Type.Optional(HooksSchema),
}, closed);

const DeviceName = Type.String({ pattern: '^/dev/[a-z0-9/]+$' });

export const DiskMappingSchema = Type.Object({
  volume: Type.String({ minLength: 1 }),
  device: DeviceName,
}, closed);

/**
 * A drill's own check of the recovered server (appliance/recovery/drill-check.ts): a shell
 * command run on the cloud appliance once the instance runs, tried every `interval` until it
 * exits 0 or `timeout` has passed.
 */
export const DrillCheckSchema = Type.Object({
  command: Type.String({ minLength: 1 }),
  timeout: Type.Optional(Duration),
  interval: Type.Optional(Duration),
}, closed);

export const DrillSchema = Type.Object({
  subnet: Type.String({ pattern: '^subnet-[0-9a-zA-Z]+$' }),
  securityGroups: Type.Array(Type.String({ pattern: '^sg-[0-9a-zA-Z]+$' }), { minItems: 1 }),
  keepMinutes: Type.Optional(Type.Integer({ minimum: 0 })),
  check: Type.Optional(DrillCheckSchema),
  /** The cloud daemon drills the plan this often (appliance/scheduler/drills.ts). */
  every: Type.Optional(Duration),
}, closed);

export const RecoveryPlanSchema = Type.Object({
  instanceType: Type.String({ pattern: '^[a-z0-9-]+\\.[a-z0-9]+$' }),
  architecture: Type.Optional(Type.Union([Type.Literal('x86_64'), Type.Literal('arm64')])),
  subnet: Type.String({ pattern: '^subnet-[0-9a-zA-Z]+$' }),
  securityGroups: Type.Array(Type.String({ pattern: '^sg-[0-9a-zA-Z]+$' }), { minItems: 1 }),
  privateIp: Type.Optional(Type.String({ pattern: '^\\d{1,3}(\\.\\d{1,3}){3}$' })),
  userData: Type.Optional(Type.String()),
  keyName: Type.Optional(Type.String({ minLength: 1 })),
  tags: Type.Optional(Type.Record(Type.String(), Type.String())),
  rootVolume: DiskMappingSchema,
  dataVolumes: Type.Optional(Type.Array(DiskMappingSchema)),
  drill: Type.Optional(DrillSchema),
}, closed);

const Price = Type.Number({ minimum: 0 });

export const PricesSchema = Type.Object({
  region: Type.Optional(Type.String({ minLength: 1 })),
  date: Type.Optional(Type.String({ pattern: '^\\d{4}-\\d{2}-\\d{2}$' })),
  snapshotGbMonth: Type.Optional(Price),
  ebsPutPer1000: Type.Optional(Price),
  ebsGetPer1000: Type.Optional(Price),
  ebsListPer1000: Type.Optional(Price),
  applianceInstance: Type.Optional(Type.Object({
    type: Type.String({ minLength: 1 }),
    hourly: Price,
  }, closed)),
  instances: Type.Optional(Type.Record(Type.String(), Price)),
  gp3GbMonth: Type.Optional(Price),
}, closed);

export const ConfigSchema = Type.Object({
  appliance: Type.Object({ name: Type.String({ minLength: 1 }) }, closed),
  policies: Type.Optional(Type.Record(Type.String(), PolicySchema)),
  assign: Type.Optional(Type.Array(AssignRuleSchema)),
  groups: Type.Optional(Type.Record(Type.String(), GroupSchema)),
  replication: Type.Optional(Type.Object({
    peer: Type.String({ minLength: 1 }),
    bwlimit: Type.Optional(Type.String({ minLength: 1 })),
    /** Windows of the week with their own cap (appliance/config/bwlimit.ts). */
    schedule: Type.Optional(Type.Array(Type.Object({
      days: Type.Optional(Type.Array(Type.String({ minLength: 1 }), { minItems: 1 })),
      from: Type.Optional(Type.String({ minLength: 1 })),
      to: Type.Optional(Type.String({ minLength: 1 })),
      /** A rate, or 0 (written as a number too) for no cap. */
      bwlimit: Type.Union([Type.String({ minLength: 1 }), Type.Integer({ minimum: 0 })]),
    }, closed))),
  }, closed)),
  alerts: Type.Optional(Type.Object({ webhook: Type.String({ pattern: '^https?://' }) }, closed)),
  /** The daemon's scheduled verify of the whole store. */
  verify: Type.Optional(Type.Object({
    /** How often (a duration), or `off`. */
    every: Type.Optional(Type.String({ minLength: 2 })),
    /** Read rate cap, e.g. 100MiB (a second). */
    bwlimit: Type.Optional(Type.String({ minLength: 1 })),
    /** The peer whose copies heal what a run finds (default: replication.peer), or `off`. */
    repair: Type.Optional(Type.String({ minLength: 1 })),
  }, closed)),
  discovery: Type.Optional(Type.Object({
    paths: Type.Optional(Type.Array(Type.String({ minLength: 1 }))),
    lvm: Type.Optional(Type.Boolean()),
    libvirt: Type.Optional(Type.Boolean()),
  }, closed)),
  prices: Type.Optional(PricesSchema),
  recovery: Type.Optional(Type.Record(Type.String(), RecoveryPlanSchema)),
  /** How `serve` and `daemon` stop on SIGTERM. */
  shutdown: Type.Optional(Type.Object({
    /** How long running jobs and forwarded commands get to finish (then owed post hooks run). */
    grace: Type.Optional(Duration),
  }, closed)),
}, closed);

/** The config file as written (after schema validation, before defaults and parsing). */
export type RawConfig = Static<typeof ConfigSchema>;
export type RawPolicy = Static<typeof PolicySchema>;
export type RawRetention = Static<typeof RetentionSchema>;
export type RawAssignRule = Static<typeof AssignRuleSchema>;
export type RawHooks = Static<typeof HooksSchema>;
export type RawPrices = Static<typeof PricesSchema>;
export type RawRecoveryPlan = Static<typeof RecoveryPlanSchema>;
export type RawDrillCheck = Static<typeof DrillCheckSchema>;
