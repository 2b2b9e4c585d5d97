/**
 * The EC2 Query API (service "ec2", API version 2016-11-15): POST / with a form body
 * `Action=...&Version=...`, XML answers in the namespace of that version. Only the actions a
 * DR failover, drill and failback need are emulated (list in emulators/README.md); unknown
 * ids answer with EC2's real error codes (InvalidSnapshot.NotFound, InvalidAMIID.NotFound...).
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { EmulatorContext } from './context.js';
import { Ec2Error } from './errors.js';
import { newId, OWNER_ID } from './ids.js';
import { prepare } from './pipeline.js';
import { INSTANCE_STATE_CODES, type ImageMapping, type ImageRec, type InstanceRec, type SnapshotRec, type SubnetRec, type Tag, type VolumeRec } from './state.js';
import { ec2ErrorXml, ec2Response, type XmlObject, type XmlValue } from './xml.js';

/** Instance types accepted when RunInstances gives none (EC2's historical default). */
const DEFAULT_INSTANCE_TYPE = 'm1.small';
/** Most instances one RunInstances may start here: the emulator is for recovery plans, not fleets. */
const MAX_INSTANCES_PER_CALL = 20;

export function renderEc2Error(reply: FastifyReply, e: Ec2Error, requestId: string): FastifyReply {
  return reply.code(e.status).header('content-type', 'text/xml;charset=UTF-8').send(ec2ErrorXml(e.code, e.message, requestId));
}

/** A parsed Query API form: flat keys such as `TagSpecification.1.Tag.2.Key`. */
class Form {
  constructor(private readonly params: URLSearchParams) {}
  get(key: string): string | undefined {
    return this.params.get(key) ?? undefined;
  }
  required(key: string): string {
    const v = this.get(key);
    if (v === undefined || v === '') throw new Ec2Error('MissingParameter', `The request must contain the parameter ${key}`);
    return v;
  }
  bool(key: string): boolean | undefined {
    const v = this.get(key);
    return v === undefined ? undefined : v === 'true';
  }
  int(key: string): number | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isSafeInteger(n)) throw new Ec2Error('InvalidParameterValue', `Value (${v}) for parameter ${key} is invalid. Expected an integer.`);
    return n;
  }
  /** The numbered members `prefix.1`, `prefix.2`... as their key prefixes, in numeric order. */
  members(prefix: string): string[] {
    const ns = new Set<number>();
    for (const key of this.params.keys()) {
      if (!key.startsWith(`${prefix}.`)) continue;
      const n = Number(key.slice(prefix.length + 1).split('.')[0]);
      if (Number.isInteger(n)) ns.add(n);
    }
    return [...ns].sort((a, b) => a - b).map((n) => `${prefix}.${n}`);
  }
  strings(prefix: string): string[] {
    return this.members(prefix).map((p) => this.get(p)).filter((v): v is string => v !== undefined);
  }
  tags(prefix: string): Tag[] {
    return this.members(prefix).map((p) => ({ Key: this.required(`${p}.Key`), Value: this.get(`${p}.Value`) ?? '' }));
  }
  /** Tags of TagSpecification.N whose ResourceType is `type`. */
  tagSpec(type: string): Tag[] {
    return this.members('TagSpecification')
      .filter((p) => this.get(`${p}.ResourceType`) === type)
      .flatMap((p) => this.tags(`${p}.Tag`));
  }
  filters(): Array<{ name: string; values: string[] }> {
    return this.members('Filter').map((p) => ({ name: this.required(`${p}.Name`), values: this.strings(`${p}.Value`) }));
  }
}

/** EC2 filter values may use * and ? wildcards. */
function wildcard(pattern: string): RegExp {
  return new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);
}

/**
 * Keep the resources matching every filter. `fields` gives a resource's values for a filter
 * name (tag:KEY and tag-key are handled here); an unknown filter name is an error, as on EC2.
 */
function applyFilters<T extends { tags: Tag[] }>(items: T[], filters: Array<{ name: string; values: string[] }>, fields: Record<string, (x: T) => Array<string | null | undefined>>): T[] {
  for (const { name } of filters) {
    if (!name.startsWith('tag:') && name !== 'tag-key' && !Object.prototype.hasOwnProperty.call(fields, name)) {
      throw new Ec2Error('InvalidParameterValue', `The filter '${name}' is invalid`);
    }
  }
  return items.filter((item) =>
    filters.every(({ name, values }) => {
      let have: Array<string | null | undefined>;
      if (name.startsWith('tag:')) have = item.tags.filter((t) => t.Key === name.slice(4)).map((t) => t.Value);
      else if (name === 'tag-key') have = item.tags.map((t) => t.Key);
      else have = fields[name]!(item);
      const res = values.map(wildcard);
      return have.some((h) => h != null && res.some((re) => re.test(h)));
    }),
  );
}

const iso = (ms: number): string => new Date(ms).toISOString();
const tagSet = (tags: Tag[]): XmlValue[] => tags.map((t) => ({ key: t.Key, value: t.Value }));

function mergeTags(into: Tag[], add: Tag[]): void {
  for (const t of add) {
    const at = into.findIndex((x) => x.Key === t.Key);
    if (at >= 0) into[at] = t;
    else into.push(t);
  }
}

const ID_PATTERN = /^[a-z]+-[0-9a-f]{8}([0-9a-f]{9})?$/;

export function registerEc2(app: FastifyInstance, ctx: EmulatorContext): void {
  const { state } = ctx;

  // Lookups that answer with EC2's own error codes --------------------------------------------
  function snapshotOf(id: string): SnapshotRec {
    if (!/^snap-/.test(id) || !ID_PATTERN.test(id)) throw new Ec2Error('InvalidSnapshotID.Malformed', `Invalid id: "${id}" (expecting "snap-...")`);
    const s = state.snapshot(id);
    if (!s) throw new Ec2Error('InvalidSnapshot.NotFound', `The snapshot '${id}' does not exist.`);
    return s;
  }
  function imageOf(id: string): ImageRec {
    if (!/^ami-/.test(id) || !ID_PATTERN.test(id)) throw new Ec2Error('InvalidAMIID.Malformed', `Invalid id: "${id}" (expecting "ami-...")`);
    const i = state.images.get(id);
    if (!i) throw new Ec2Error('InvalidAMIID.NotFound', `The image id '[${id}]' does not exist`);
    return i;
  }
  function instanceOf(id: string): InstanceRec {
    if (!/^i-/.test(id) || !ID_PATTERN.test(id)) throw new Ec2Error('InvalidInstanceID.Malformed', `Invalid id: "${id}" (expecting "i-...")`);
    const i = state.instances.get(id);
    if (!i) throw new Ec2Error('InvalidInstanceID.NotFound', `The instance ID '${id}' does not exist`);
    return i;
  }
  function volumeOf(id: string): VolumeRec {
    if (!/^vol-/.test(id) || !ID_PATTERN.test(id)) throw new Ec2Error('InvalidVolumeID.Malformed', `Invalid id: "${id}" (expecting "vol-...")`);
    const v = state.volumes.get(id);
    if (!v || v.state === 'deleted') throw new Ec2Error('InvalidVolume.NotFound', `The volume '${id}' does not exist.`);
    return v;
  }
  function subnetOf(id: string): SubnetRec {
    if (!/^subnet-[0-9a-z]+$/.test(id)) throw new Ec2Error('InvalidSubnetID.NotFound', `The subnet ID '${id}' does not exist`);
    return state.subnet(id);
  }

  // Renderers ----------------------------------------------------------------------------------
  function snapshotXml(s: SnapshotRec): XmlObject {
    return {
      snapshotId: s.id,
      volumeId: s.volumeId ?? 'vol-ffffffff',
      status: s.status,
      statusMessage: s.statusMessage || undefined,
      startTime: iso(s.startTime),
      completionTime: s.completionTime === null ? undefined : iso(s.completionTime),
      progress: s.status === 'completed' ? '100%' : '0%',
      ownerId: OWNER_ID,
      description: s.description,
      volumeSize: s.volumeSizeGiB,
      encrypted: s.encrypted,
      kmsKeyId: s.kmsKeyArn ?? undefined,
      storageTier: 'standard',
      tagSet: s.tags.length ? tagSet(s.tags) : undefined,
    };
  }
  function imageXml(i: ImageRec): XmlObject {
    return {
      imageId: i.id,
      imageLocation: `${OWNER_ID}/${i.name}`,
      imageState: i.state,
      imageOwnerId: OWNER_ID,
      creationDate: iso(i.creationDate),
      isPublic: false,
      architecture: i.architecture,
      imageType: 'machine',
      name: i.name,
      description: i.description || undefined,
      rootDeviceType: 'ebs',
      rootDeviceName: i.rootDeviceName,
      blockDeviceMapping: i.mappings.map((m) => ({
        deviceName: m.deviceName,
        ebs: { snapshotId: m.snapshotId, volumeSize: m.volumeSizeGiB, deleteOnTermination: m.deleteOnTermination, volumeType: m.volumeType, encrypted: false },
      })),
      virtualizationType: i.virtualizationType,
      hypervisor: 'xen',
      enaSupport: i.enaSupport,
      tagSet: i.tags.length ? tagSet(i.tags) : undefined,
    };
  }
  function instanceXml(i: InstanceRec): XmlObject {
    const subnet = state.subnets.get(i.subnetId);
    return {
      instanceId: i.id,
      imageId: i.imageId,
      instanceState: { code: INSTANCE_STATE_CODES[i.state], name: i.state },
      privateDnsName: `ip-${i.privateIp.replace(/\./g, '-')}.ec2.internal`,
      dnsName: '',
      reason: i.stateReason?.message ?? (i.state === 'terminated' || i.state === 'shutting-down' ? 'User initiated' : ''),
      stateReason: i.stateReason,
      keyName: i.keyName ?? undefined,
      amiLaunchIndex: 0,
      instanceType: i.instanceType,
      launchTime: iso(i.launchTime),
      placement: { availabilityZone: subnet?.availabilityZone ?? `${state.region}a`, tenancy: 'default' },
      monitoring: { state: 'disabled' },
      subnetId: i.state === 'terminated' ? undefined : i.subnetId,
      vpcId: i.state === 'terminated' ? undefined : i.vpcId,
      privateIpAddress: i.state === 'terminated' ? undefined : i.privateIp,
      groupSet: i.securityGroupIds.map((g) => ({ groupId: g, groupName: g })),
      architecture: i.architecture,
      rootDeviceType: 'ebs',
      rootDeviceName: i.rootDeviceName,
      blockDeviceMapping: i.state === 'terminated'
        ? []
        : i.volumes.map((v) => ({
            deviceName: v.device,
            ebs: { volumeId: v.volumeId, status: i.state === 'shutting-down' ? 'detaching' : 'attached', attachTime: iso(i.launchTime), deleteOnTermination: v.deleteOnTermination },
          })),
      clientToken: i.clientToken ?? undefined,
      virtualizationType: 'hvm',
      hypervisor: 'xen',
      enaSupport: true,
      tagSet: i.tags.length ? tagSet(i.tags) : undefined,
    };
  }
  function volumeXml(v: VolumeRec): XmlObject {
    return {
      volumeId: v.id,
      size: v.sizeGiB,
      snapshotId: v.snapshotId ?? '',
      availabilityZone: `${state.region}a`,
      status: v.state,
      createTime: iso(v.createTime),
      attachmentSet: v.attachedTo
        ? [{ volumeId: v.id, instanceId: v.attachedTo, device: v.device ?? undefined, status: 'attached', attachTime: iso(v.createTime), deleteOnTermination: v.deleteOnTermination }]
        : [],
      volumeType: v.volumeType,
      encrypted: false,
      tagSet: v.tags.length ? tagSet(v.tags) : undefined,
    };
  }
  function subnetXml(s: SubnetRec): XmlObject {
    return {
      subnetId: s.id,
      subnetArn: `arn:aws:ec2:${state.region}:${OWNER_ID}:subnet/${s.id}`,
      state: 'available',
      vpcId: s.vpcId,
      ownerId: OWNER_ID,
      cidrBlock: s.cidr,
      availableIpAddressCount: 250,
      availabilityZone: s.availabilityZone,
      defaultForAz: false,
      mapPublicIpOnLaunch: false,
      tagSet: s.tags.length ? tagSet(s.tags) : undefined,
    };
  }

  // Actions ------------------------------------------------------------------------------------
  type Handler = (f: Form) => Promise<XmlObject> | XmlObject;
  const actions: Record<string, Handler> = {
    CreateSnapshot(f) {
      const v = volumeOf(f.required('VolumeId'));
      const parent = v.lastSnapshotId ? state.snapshot(v.lastSnapshotId) : undefined;
      const base = parent ? state.effectiveBlocks(parent) : new Map<number, string>();
      const own = new Map<number, string>();
      for (const [i, d] of v.blocks) if (base.get(i) !== d) own.set(i, d);
      const now = Date.now();
      const s: SnapshotRec = {
        id: newId('snap'),
        status: 'completed',
        statusMessage: '',
        startTime: now,
        completionTime: now,
        volumeSizeGiB: v.sizeGiB,
        parentId: parent?.id ?? null,
        tags: f.tagSpec('snapshot'),
        description: f.get('Description') ?? '',
        encrypted: false,
        kmsKeyArn: null,
        clientToken: null,
        requestKey: null,
        timeoutMinutes: 0,
        volumeId: v.id,
        blocks: own,
      };
      state.snapshots.set(s.id, s);
      v.lastSnapshotId = s.id;
      state.changed();
      return snapshotXml(s);
    },

    DeleteSnapshot(f) {
      const s = snapshotOf(f.required('SnapshotId'));
      const image = [...state.images.values()].find((i) => i.mappings.some((m) => m.snapshotId === s.id));
      if (image) throw new Ec2Error('InvalidSnapshot.InUse', `The snapshot ${s.id} is currently in use by ${image.id}`);
      // EBS keeps the data a child still needs: fold the parent's blocks into each child (an
      // export's successor and a snapshot of a volume created from it are both its children).
      for (const child of state.snapshots.values()) {
        if (child.parentId !== s.id) continue;
        for (const [i, d] of s.blocks) if (!child.blocks.has(i)) child.blocks.set(i, d);
        child.parentId = s.parentId;
      }
      state.snapshots.delete(s.id);
      for (const v of state.volumes.values()) if (v.lastSnapshotId === s.id) v.lastSnapshotId = s.parentId;
      state.changed();
      return { return: true };
    },

    DescribeSnapshots(f) {
      const ids = f.strings('SnapshotId');
      const owners = f.strings('Owner');
      let list = ids.length ? ids.map(snapshotOf) : [...state.snapshots.keys()].map((id) => state.snapshot(id)!);
      if (owners.length && !owners.some((o) => o === 'self' || o === OWNER_ID)) list = [];
      list = applyFilters(list, f.filters(), {
        'snapshot-id': (s) => [s.id],
        status: (s) => [s.status],
        'volume-id': (s) => [s.volumeId],
        'owner-id': () => [OWNER_ID],
        description: (s) => [s.description],
        'volume-size': (s) => [String(s.volumeSizeGiB)],
      });
      return { snapshotSet: list.map(snapshotXml) };
    },

    RegisterImage(f) {
      const name = f.required('Name');
      if (!/^[A-Za-z0-9()[\] ./\-'@_]{3,128}$/.test(name)) {
        throw new Ec2Error('InvalidAMIName.Malformed', `AMI names must be 3-128 characters of letters, digits, ( ) [ ] space . / - ' @ _ (got '${name}')`);
      }
      const dup = [...state.images.values()].find((i) => i.name === name && i.state === 'available');
      if (dup) throw new Ec2Error('InvalidAMIName.Duplicate', `AMI name ${name} is already in use by AMI ${dup.id}`);
      const mappings: ImageMapping[] = [];
      for (const p of f.members('BlockDeviceMapping')) {
        const deviceName = f.required(`${p}.DeviceName`);
        const snapshotId = f.get(`${p}.Ebs.SnapshotId`);
        if (!snapshotId) continue; // ephemeral or NoDevice mappings carry no data here
        const s = snapshotOf(snapshotId);
        if (s.status !== 'completed') throw new Ec2Error('IncorrectState', `Snapshot ${s.id} is in invalid state - ${s.status}`);
        const size = f.int(`${p}.Ebs.VolumeSize`) ?? s.volumeSizeGiB;
        if (size < s.volumeSizeGiB) {
          throw new Ec2Error('InvalidBlockDeviceMapping', `Volume of size ${size}GB is smaller than snapshot '${s.id}', expect size>= ${s.volumeSizeGiB}GB`);
        }
        mappings.push({ deviceName, snapshotId, volumeSizeGiB: size, volumeType: f.get(`${p}.Ebs.VolumeType`) ?? 'gp3', deleteOnTermination: f.bool(`${p}.Ebs.DeleteOnTermination`) ?? true });
      }
      const rootDeviceName = f.get('RootDeviceName') ?? mappings[0]?.deviceName;
      if (!rootDeviceName || !mappings.some((m) => m.deviceName === rootDeviceName)) {
        throw new Ec2Error('InvalidBlockDeviceMapping', `The root device ${rootDeviceName ?? '(none)'} needs a block device mapping with an EBS snapshot`);
      }
      const architecture = f.get('Architecture') ?? 'x86_64';
      if (!['i386', 'x86_64', 'arm64', 'x86_64_mac', 'arm64_mac'].includes(architecture)) {
        throw new Ec2Error('InvalidParameterValue', `Value (${architecture}) for parameter architecture is invalid.`);
      }
      const image: ImageRec = {
        id: newId('ami'),
        name,
        description: f.get('Description') ?? '',
        architecture,
        virtualizationType: f.get('VirtualizationType') ?? 'hvm',
        rootDeviceName,
        enaSupport: f.bool('EnaSupport') ?? false,
        state: 'available',
        creationDate: Date.now(),
        mappings,
        tags: f.tagSpec('image'),
      };
      state.images.set(image.id, image);
      state.changed();
      return { imageId: image.id };
    },

    DeregisterImage(f) {
      const image = imageOf(f.required('ImageId'));
      state.images.delete(image.id);
      state.changed();
      return { return: true };
    },

    DescribeImages(f) {
      const ids = f.strings('ImageId');
      const owners = f.strings('Owner');
      let list = ids.length ? ids.map(imageOf) : [...state.images.values()];
      if (owners.length && !owners.some((o) => o === 'self' || o === OWNER_ID)) list = [];
      list = applyFilters(list, f.filters(), {
        'image-id': (i) => [i.id],
        name: (i) => [i.name],
        state: (i) => [i.state],
        architecture: (i) => [i.architecture],
        'block-device-mapping.snapshot-id': (i) => i.mappings.map((m) => m.snapshotId),
      });
      return { imagesSet: list.map(imageXml) };
    },

    RunInstances(f) {
      const image = imageOf(f.required('ImageId'));
      const min = f.int('MinCount');
      const max = f.int('MaxCount');
      if (min === undefined) throw new Ec2Error('MissingParameter', 'The request must contain the parameter MinCount');
      if (max === undefined) throw new Ec2Error('MissingParameter', 'The request must contain the parameter MaxCount');
      if (min < 1 || max < min) throw new Ec2Error('InvalidParameterValue', `MinCount (${min}) must be at least 1 and at most MaxCount (${max})`);
      if (min > MAX_INSTANCES_PER_CALL) {
        throw new Ec2Error('InstanceLimitExceeded', `Your quota allows for ${MAX_INSTANCES_PER_CALL} more running instance(s). You requested at least ${min}`);
      }
      const count = Math.min(max, MAX_INSTANCES_PER_CALL);
      const clientToken = f.get('ClientToken') ?? null;
      if (clientToken) {
        const prior = [...state.instances.values()].filter((i) => i.clientToken === clientToken);
        if (prior.length) {
          if (prior[0]!.imageId !== image.id) {
            throw new Ec2Error('IdempotentParameterMismatch', `The client token ${clientToken} was used with other parameters; use a new token`);
          }
          if (ctx.launchFaults.get(prior[0]!.instanceType) === 'lost') throw answerLost();
          return reservationBody(prior);
        }
      }
      const subnet = subnetOf(f.get('SubnetId') ?? [...state.subnets.keys()][0]!);
      const privateIp = f.get('PrivateIpAddress');
      if (privateIp !== undefined) {
        if (count > 1) throw new Ec2Error('InvalidParameterCombination', 'PrivateIpAddress can only be given when launching one instance');
        const prefix = subnet.cidr.split('.').slice(0, 3).join('.');
        if (!/^\d+\.\d+\.\d+\.\d+$/.test(privateIp) || !privateIp.startsWith(`${prefix}.`)) {
          throw new Ec2Error('InvalidParameterValue', `Address ${privateIp} does not fall within the subnet's address range ${subnet.cidr}`);
        }
        const used = [...state.instances.values()].find((i) => i.privateIp === privateIp && i.subnetId === subnet.id && i.state !== 'terminated');
        if (used) throw new Ec2Error('InvalidIPAddress.InUse', `Address ${privateIp} is in use by ${used.id}`);
      }
      const groups = f.strings('SecurityGroupId');
      for (const g of groups) if (!/^sg-[0-9a-z]+$/.test(g)) throw new Ec2Error('InvalidGroup.NotFound', `The security group '${g}' does not exist`);
      const userData = f.get('UserData') ?? null;
      if (userData !== null && !/^[A-Za-z0-9+/=\s]*$/.test(userData)) throw new Ec2Error('InvalidParameterValue', 'Invalid BASE64 encoding of user data.');
      const instanceType = f.get('InstanceType') ?? DEFAULT_INSTANCE_TYPE;
      const launchFault = ctx.launchFaults.get(instanceType);
      if (launchFault === 'capacity') {
        throw new Ec2Error('InsufficientInstanceCapacity', `We currently do not have sufficient ${instanceType} capacity in the Availability Zone you requested (${subnet.availabilityZone}). Our system will be working on provisioning additional capacity. You can currently get ${instanceType} capacity by not specifying an Availability Zone in your request or choosing a different one.`, 500);
      }
      const reservationId = newId('r');
      const now = Date.now();
      const created: InstanceRec[] = [];
      for (let n = 0; n < count; n++) {
        const id = newId('i');
        const volumeTags = f.tagSpec('volume');
        const volumes = image.mappings.map((m) => {
          const snap = state.snapshot(m.snapshotId);
          if (!snap) throw new Ec2Error('InvalidSnapshot.NotFound', `The snapshot '${m.snapshotId}' of ${image.id} does not exist.`);
          const vol: VolumeRec = {
            id: newId('vol'),
            sizeGiB: m.volumeSizeGiB,
            snapshotId: snap.id,
            lastSnapshotId: snap.id,
            state: 'in-use',
            createTime: now,
            attachedTo: id,
            device: m.deviceName,
            deleteOnTermination: m.deleteOnTermination,
            volumeType: m.volumeType,
            tags: [...volumeTags],
            blocks: state.effectiveBlocks(snap),
          };
          state.volumes.set(vol.id, vol);
          return { device: m.deviceName, volumeId: vol.id, deleteOnTermination: m.deleteOnTermination };
        });
        const inst: InstanceRec = {
          id,
          reservationId,
          imageId: image.id,
          instanceType,
          subnetId: subnet.id,
          vpcId: subnet.vpcId,
          privateIp: privateIp ?? freeIp(subnet),
          securityGroupIds: groups,
          userData,
          keyName: f.get('KeyName') ?? null,
          clientToken,
          state: 'pending',
          transitionAt: now + ctx.instanceDelayMs,
          launchTime: now,
          volumes,
          rootDeviceName: image.rootDeviceName,
          architecture: image.architecture,
          tags: f.tagSpec('instance'),
          ...(launchFault === 'fail' ? { failsOnLaunch: true } : {}),
        };
        state.instances.set(id, inst);
        created.push(inst);
      }
      state.changed();
      if (launchFault === 'lost') throw answerLost();
      return reservationBody(created);
    },

    DescribeInstances(f) {
      const ids = f.strings('InstanceId');
      let list = ids.length ? ids.map(instanceOf) : [...state.instances.values()];
      list = applyFilters(list, f.filters(), {
        'instance-id': (i) => [i.id],
        'instance-state-name': (i) => [i.state],
        'instance-state-code': (i) => [String(INSTANCE_STATE_CODES[i.state])],
        'image-id': (i) => [i.imageId],
        'subnet-id': (i) => [i.subnetId],
        'vpc-id': (i) => [i.vpcId],
        'private-ip-address': (i) => [i.privateIp],
        'instance-type': (i) => [i.instanceType],
        'client-token': (i) => [i.clientToken],
        'reservation-id': (i) => [i.reservationId],
      });
      const byReservation = new Map<string, InstanceRec[]>();
      for (const i of list) byReservation.set(i.reservationId, [...(byReservation.get(i.reservationId) ?? []), i]);
      return { reservationSet: [...byReservation.values()].map((insts) => reservationBody(insts)) };
    },

    TerminateInstances(f) {
      const list = f.strings('InstanceId').map(instanceOf);
      if (list.length === 0) throw new Ec2Error('MissingParameter', 'The request must contain the parameter InstanceId');
      const now = Date.now();
      return {
        instancesSet: list.map((i) => {
          const previous = i.state;
          if (i.state !== 'terminated' && i.state !== 'shutting-down') {
            i.state = 'shutting-down';
            i.stateReason = { code: 'Client.UserInitiatedShutdown', message: 'Client.UserInitiatedShutdown: User initiated shutdown' };
            i.transitionAt = now + ctx.instanceDelayMs;
          }
          return { instanceId: i.id, currentState: stateXml(i.state), previousState: stateXml(previous) };
        }),
      };
    },

    StopInstances(f) {
      const list = f.strings('InstanceId').map(instanceOf);
      return {
        instancesSet: list.map((i) => {
          const previous = i.state;
          if (i.state === 'terminated' || i.state === 'shutting-down') throw new Ec2Error('IncorrectInstanceState', `The instance '${i.id}' is not in a state from which it can be stopped.`);
          if (i.state === 'pending' || i.state === 'running') {
            i.state = 'stopping';
            i.transitionAt = Date.now() + ctx.instanceDelayMs;
          }
          return { instanceId: i.id, currentState: stateXml(i.state), previousState: stateXml(previous) };
        }),
      };
    },

    StartInstances(f) {
      const list = f.strings('InstanceId').map(instanceOf);
      return {
        instancesSet: list.map((i) => {
          const previous = i.state;
          if (i.state === 'terminated' || i.state === 'shutting-down' || i.state === 'stopping') {
            throw new Ec2Error('IncorrectInstanceState', `The instance '${i.id}' is not in a state from which it can be started.`);
          }
          if (i.state === 'stopped') {
            i.state = 'pending';
            i.transitionAt = Date.now() + ctx.instanceDelayMs;
          }
          return { instanceId: i.id, currentState: stateXml(i.state), previousState: stateXml(previous) };
        }),
      };
    },

    CreateTags(f) {
      const ids = f.strings('ResourceId');
      const tags = f.tags('Tag');
      if (ids.length === 0) throw new Ec2Error('MissingParameter', 'The request must contain the parameter ResourceId');
      // Resolve all first: an unknown id changes nothing.
      const targets = ids.map((id): { tags: Tag[] } => {
        if (id.startsWith('snap-')) return snapshotOf(id);
        if (id.startsWith('ami-')) return imageOf(id);
        if (id.startsWith('i-')) return instanceOf(id);
        if (id.startsWith('vol-')) return volumeOf(id);
        if (id.startsWith('subnet-')) return subnetOf(id);
        throw new Ec2Error('InvalidID', `The ID '${id}' is not valid`);
      });
      for (const t of targets) mergeTags(t.tags, tags);
      state.changed();
      return { return: true };
    },

    DescribeVolumes(f) {
      const ids = f.strings('VolumeId');
      let list = ids.length ? ids.map(volumeOf) : [...state.volumes.values()].filter((v) => v.state !== 'deleted');
      list = applyFilters(list, f.filters(), {
        'volume-id': (v) => [v.id],
        status: (v) => [v.state],
        'snapshot-id': (v) => [v.snapshotId],
        'attachment.instance-id': (v) => [v.attachedTo],
        'attachment.device': (v) => [v.device],
        size: (v) => [String(v.sizeGiB)],
      });
      return { volumeSet: list.map(volumeXml) };
    },

    DescribeSubnets(f) {
      const ids = f.strings('SubnetId');
      let list = ids.length ? ids.map(subnetOf) : [...state.subnets.values()];
      list = applyFilters(list, f.filters(), {
        'subnet-id': (s) => [s.id],
        'vpc-id': (s) => [s.vpcId],
        'availability-zone': (s) => [s.availabilityZone],
        'cidr-block': (s) => [s.cidr],
        state: () => ['available'],
      });
      return { subnetSet: list.map(subnetXml) };
    },
  };

  /** A `lost` launch fault: the instances are launched, but the answer does not come back. */
  function answerLost(): Ec2Error {
    return new Ec2Error('InternalError', 'An internal error has occurred; retry the request', 500);
  }
  function stateXml(s: InstanceRec['state']): XmlObject {
    return { code: INSTANCE_STATE_CODES[s], name: s };
  }
  function reservationBody(insts: InstanceRec[]): XmlObject {
    return { reservationId: insts[0]!.reservationId, ownerId: OWNER_ID, groupSet: [], instancesSet: insts.map(instanceXml) };
  }
  /** The next address of the subnet no live instance uses (hosts .10 to .250). */
  function freeIp(subnet: SubnetRec): string {
    const prefix = subnet.cidr.split('.').slice(0, 3).join('.');
    const used = new Set([...state.instances.values()].filter((i) => i.subnetId === subnet.id && i.state !== 'terminated').map((i) => i.privateIp));
    for (let h = 10; h <= 250; h++) if (!used.has(`${prefix}.${h}`)) return `${prefix}.${h}`;
    throw new Ec2Error('InsufficientFreeAddressesInSubnet', `The subnet ${subnet.id} has no free addresses`);
  }

  app.post('/', async (req: FastifyRequest, reply) => {
    const raw = typeof req.body === 'string' ? req.body : Buffer.isBuffer(req.body) ? req.body.toString('utf8') : '';
    const form = new Form(new URLSearchParams(raw));
    const action = form.get('Action') ?? '';
    await prepare(ctx, req, 'ec2', action || 'Unknown');
    const handler = Object.prototype.hasOwnProperty.call(actions, action) ? actions[action] : undefined;
    if (!handler) throw new Ec2Error('InvalidAction', `The action ${action || '(none)'} is not valid for this web service.`);
    if (form.bool('DryRun')) throw new Ec2Error('DryRunOperation', 'Request would have succeeded, but DryRun flag is set.', 412);
    state.tickInstances();
    const body = await handler(form);
    state.tickInstances();
    const requestId = String(reply.getHeader('x-amzn-RequestId'));
    return reply.header('content-type', 'text/xml;charset=UTF-8').send(ec2Response(action, requestId, body));
  });
}
