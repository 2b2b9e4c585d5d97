/**
 * The EC2 calls the DR workflows make, one small function per API call (like the EBS code).
 *
 * The client comes from the SDK's standard chain (AWS_REGION, credentials, and
 * AWS_ENDPOINT_URL_EC2 for another endpoint such as the emulator); nothing here reads
 * settings of its own. Every AWS failure is turned into a TandemError with advice.
 */
import {
  EC2Client,
  RegisterImageCommand,
  DeregisterImageCommand,
  RunInstancesCommand,
  DescribeInstancesCommand,
  DescribeImagesCommand,
  TerminateInstancesCommand,
  StopInstancesCommand,
  CreateSnapshotCommand,
  DeleteSnapshotCommand,
  DescribeSnapshotsCommand,
  waitUntilInstanceRunning,
  waitUntilInstanceTerminated,
  waitUntilInstanceStopped,
  waitUntilSnapshotCompleted,
  type BlockDeviceMapping,
  type Instance,
  type Snapshot,
  type Tag,
} from '@aws-sdk/client-ec2';
import { awsClientOptions } from '../../common/ca.js';
import { TandemError } from '../../common/errors.js';

/**
 * How EC2 is polled while a recovery waits on it (the SDK's waiters): a first look at once, the
 * next after 0.25 s, then backing off (with jitter) to one every 5 s, 10 s for a snapshot. An
 * instance that runs within seconds is seen within a quarter of one: the RTO a failover measures
 * is EC2's, not the poll's. A minimum of 1 s added up to a second to every launch, stop and
 * teardown. A 90 s start costs about 23 DescribeInstances, far under EC2's request limits.
 */
const POLL = { minDelay: 0.25, maxDelay: 5 } as const;

/**
 * Whether an error met while polling is a refusal that no later poll can change: access denied,
 * credentials EC2 no longer accepts, a request EC2 calls invalid. The SDK's waiters retry on every error until
 * their time limit, so an IAM role taken away during a failover's wait would be reported only
 * after 10 minutes (30 for a snapshot). Worth retrying: a server error (5xx), throttling, a
 * network failure, and `*.NotFound` (EC2 is eventually consistent: an instance just launched
 * may not be described yet).
 */
export function isRefusal(e: unknown): boolean {
  const err = e as { name?: string; message?: string; $metadata?: { httpStatusCode?: number } };
  const name = err.name ?? '';
  // Not a CredentialsProviderError: the instance role's credentials come from the instance
  // metadata service, whose hiccups pass; credentials that really expired draw a 4xx from EC2.
  const status = err.$metadata?.httpStatusCode;
  if (status === undefined || status < 400 || status >= 500) return false;
  return !/NotFound|Throttl|RequestLimitExceeded|LimitExceeded|TooManyRequests|RequestTimeout/.test(name);
}

type Waiter<I> = (params: { client: EC2Client; maxWaitTime: number; minDelay: number; maxDelay: number; abortSignal: AbortSignal }, input: I) => Promise<unknown>;

/**
 * Run one of the SDK's waiters, polling as POLL says, but stop at the first refusal (isRefusal)
 * and throw it, instead of polling on until `maxWaitTime`.
 */
async function waitFor<I>(ec2: EC2Client, until: Waiter<I>, input: I, maxWaitTime: number, maxDelay: number = POLL.maxDelay): Promise<void> {
  const abort = new AbortController();
  let refusal: unknown;
  const client = {
    config: ec2.config,
    send: async (command: Parameters<EC2Client['send']>[0]) => {
      try {
        return await ec2.send(command);
      } catch (e) {
        if (isRefusal(e)) {
          refusal = e;
          abort.abort();
        }
        throw e;
      }
    },
  } as unknown as EC2Client;
  try {
    await until({ client, maxWaitTime, minDelay: POLL.minDelay, maxDelay, abortSignal: abort.signal }, input);
  } catch (e) {
    throw refusal ?? e;
  }
}

/** How long to wait for instances to reach `running`: EC2 usually takes 30-90 s; 10 min covers slow AMIs. */
export const RUNNING_WAIT_SECONDS = 600;
/** Terminations complete within a few minutes; a drill teardown waits at most this long. */
export const TERMINATED_WAIT_SECONDS = 600;
/** A stop waits for the OS to shut down: usually under a minute. */
export const STOPPED_WAIT_SECONDS = 600;
/** CreateSnapshot of a volume changed in EC2 completes in minutes for incremental data. */
export const SNAPSHOT_WAIT_SECONDS = 1800;

export function ec2Client(): EC2Client {
  return new EC2Client(awsClientOptions());
}

/** Map an SDK failure to a TandemError that says what to do. */
export function awsError(e: unknown, what: string): TandemError {
  if (e instanceof TandemError) return e;
  const err = e as { name?: string; Code?: string; message?: string; $metadata?: { httpStatusCode?: number } };
  const name = err.name ?? err.Code ?? 'Error';
  const msg = `${what}: ${name}: ${err.message ?? String(e)}`;
  if (name === 'CredentialsProviderError' || /Region is missing|credential/i.test(err.message ?? '')) {
    return new TandemError('ERR_AWS_CREDENTIALS', `${msg}; set AWS_REGION and credentials (environment, profile or instance role)`, { cause: e });
  }
  if (name === 'UnauthorizedOperation' || name === 'AuthFailure' || name === 'AccessDeniedException') {
    return new TandemError('ERR_AWS_ACCESS_DENIED', `${msg}; grant the appliance's IAM role this action (README: IAM policy)`, { cause: e });
  }
  if (/NotFound|Malformed/.test(name)) return new TandemError('ERR_AWS_NOT_FOUND', `${msg}; check the id`, { cause: e });
  if (/^Invalid|Validation|MissingParameter|Unsupported/.test(name)) {
    return new TandemError('ERR_AWS_VALIDATION', `${msg}; check the recovery plan in config.yaml`, { cause: e });
  }
  if (/Throttl|RequestLimitExceeded/.test(name)) return new TandemError('ERR_AWS_THROTTLED', `${msg}; retry later`, { cause: e });
  return new TandemError('ERR_AWS_FAILED', msg, { cause: e });
}

export function tags(t: Record<string, string>): Tag[] {
  return Object.entries(t).map(([Key, Value]) => ({ Key, Value }));
}

export interface ImageDisk {
  readonly device: string;
  readonly snapshotId: string;
  readonly sizeGiB: number;
}

/** RegisterImage from EBS snapshots: the first disk is the root device. Returns the AMI id. */
export async function registerImage(
  ec2: EC2Client,
  p: { name: string; description: string; disks: readonly ImageDisk[]; architecture: 'x86_64' | 'arm64'; tags: Record<string, string> },
): Promise<string> {
  const mappings: BlockDeviceMapping[] = p.disks.map((d) => ({
    DeviceName: d.device,
    Ebs: { SnapshotId: d.snapshotId, VolumeSize: d.sizeGiB, VolumeType: 'gp3', DeleteOnTermination: true },
  }));
  try {
    const r = await ec2.send(new RegisterImageCommand({
      Name: p.name,
      Description: p.description,
      Architecture: p.architecture,
      RootDeviceName: p.disks[0]!.device,
      BlockDeviceMappings: mappings,
      VirtualizationType: 'hvm',
      EnaSupport: true,
      TagSpecifications: [{ ResourceType: 'image', Tags: tags(p.tags) }],
    }));
    if (!r.ImageId) throw new TandemError('ERR_AWS_FAILED', 'RegisterImage returned no ImageId');
    return r.ImageId;
  } catch (e) {
    throw awsError(e, 'RegisterImage');
  }
}

/**
 * What a recovery run left in EC2, found by its tag `tandem:run` (set atomically by RunInstances
 * and RegisterImage): instances not yet terminated, and images.
 */
export async function resourcesOfRun(ec2: EC2Client, runId: string): Promise<{ instances: string[]; images: string[]; described: Instance[] }> {
  const byRun = { Name: 'tag:tandem:run', Values: [runId] };
  try {
    const r = await ec2.send(new DescribeInstancesCommand({ Filters: [byRun, { Name: 'instance-state-name', Values: ['pending', 'running', 'stopping', 'stopped'] }] }));
    const described = (r.Reservations ?? []).flatMap((res) => res.Instances ?? []).filter((i) => i.InstanceId !== undefined);
    const instances = described.map((i) => i.InstanceId!);
    const img = await ec2.send(new DescribeImagesCommand({ Owners: ['self'], Filters: [byRun] }));
    const images = (img.Images ?? []).map((i) => i.ImageId).filter((id): id is string => id !== undefined);
    return { instances, images, described };
  } catch (e) {
    throw awsError(e, `finding the instances and images of ${runId}`);
  }
}

export async function deregisterImage(ec2: EC2Client, imageId: string): Promise<void> {
  try {
    await ec2.send(new DeregisterImageCommand({ ImageId: imageId }));
  } catch (e) {
    throw awsError(e, `DeregisterImage ${imageId}`);
  }
}

export interface LaunchSpec {
  readonly imageId: string;
  readonly instanceType: string;
  readonly subnetId?: string;
  readonly securityGroupIds?: readonly string[];
  readonly privateIp?: string;
  readonly userData?: string;
  readonly keyName?: string;
  readonly tags: Record<string, string>;
  /** Idempotency token: a retried launch does not start a second instance. */
  readonly clientToken: string;
}

/** RunInstances for one recovered server. Returns the instance id. */
export async function runInstance(ec2: EC2Client, s: LaunchSpec): Promise<string> {
  try {
    const r = await ec2.send(new RunInstancesCommand({
      ImageId: s.imageId,
      InstanceType: s.instanceType as never,
      MinCount: 1,
      MaxCount: 1,
      SubnetId: s.subnetId,
      SecurityGroupIds: s.securityGroupIds ? [...s.securityGroupIds] : undefined,
      PrivateIpAddress: s.privateIp,
      UserData: s.userData === undefined ? undefined : Buffer.from(s.userData).toString('base64'),
      KeyName: s.keyName,
      ClientToken: s.clientToken,
      TagSpecifications: [
        { ResourceType: 'instance', Tags: tags(s.tags) },
        { ResourceType: 'volume', Tags: tags(s.tags) },
      ],
    }));
    const id = r.Instances?.[0]?.InstanceId;
    if (!id) throw new TandemError('ERR_AWS_FAILED', 'RunInstances returned no instance');
    return id;
  } catch (e) {
    throw awsError(e, 'RunInstances');
  }
}

export async function waitRunning(ec2: EC2Client, ids: readonly string[]): Promise<void> {
  try {
    await waitFor(ec2, waitUntilInstanceRunning, { InstanceIds: [...ids] }, RUNNING_WAIT_SECONDS);
  } catch (e) {
    throw awsError(e, `waiting for ${ids.join(', ')} to run`);
  }
}

export async function describeInstances(ec2: EC2Client, ids: readonly string[]): Promise<Instance[]> {
  try {
    const r = await ec2.send(new DescribeInstancesCommand({ InstanceIds: [...ids] }));
    return (r.Reservations ?? []).flatMap((res) => res.Instances ?? []);
  } catch (e) {
    throw awsError(e, 'DescribeInstances');
  }
}

/** StopInstances, then wait until each is `stopped`: its OS has shut down and flushed its disks. */
export async function stopInstances(ec2: EC2Client, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return;
  try {
    await ec2.send(new StopInstancesCommand({ InstanceIds: [...ids] }));
    await waitFor(ec2, waitUntilInstanceStopped, { InstanceIds: [...ids] }, STOPPED_WAIT_SECONDS);
  } catch (e) {
    throw awsError(e, `StopInstances ${ids.join(', ')}`);
  }
}

export async function terminateInstances(ec2: EC2Client, ids: readonly string[], wait: boolean): Promise<void> {
  if (ids.length === 0) return;
  try {
    await ec2.send(new TerminateInstancesCommand({ InstanceIds: [...ids] }));
  } catch (e) {
    throw awsError(e, `TerminateInstances ${ids.join(', ')}`);
  }
  if (wait) await waitTerminated(ec2, ids);
}

/** Wait until each instance is `terminated`. */
export async function waitTerminated(ec2: EC2Client, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return;
  try {
    await waitFor(ec2, waitUntilInstanceTerminated, { InstanceIds: [...ids] }, TERMINATED_WAIT_SECONDS);
  } catch (e) {
    throw awsError(e, `waiting for ${ids.join(', ')} to terminate`);
  }
}

/** CreateSnapshot of an EC2 volume and wait until it is completed. Returns the snapshot id. */
export async function snapshotVolume(ec2: EC2Client, volumeId: string, description: string, t: Record<string, string>): Promise<string> {
  try {
    const r = await ec2.send(new CreateSnapshotCommand({
      VolumeId: volumeId,
      Description: description,
      TagSpecifications: [{ ResourceType: 'snapshot', Tags: tags(t) }],
    }));
    if (!r.SnapshotId) throw new TandemError('ERR_AWS_FAILED', 'CreateSnapshot returned no SnapshotId');
    await waitFor(ec2, waitUntilSnapshotCompleted, { SnapshotIds: [r.SnapshotId] }, SNAPSHOT_WAIT_SECONDS, 10);
    return r.SnapshotId;
  } catch (e) {
    throw awsError(e, `CreateSnapshot of ${volumeId}`);
  }
}

/** Of `snapshotIds`, those an image of this account maps (DeleteSnapshot would refuse them: InvalidSnapshot.InUse). */
export async function snapshotsInImages(ec2: EC2Client, snapshotIds: readonly string[]): Promise<Set<string>> {
  const out = new Set<string>();
  // DescribeImages filters take up to 200 values.
  for (let i = 0; i < snapshotIds.length; i += 200) {
    const ids = snapshotIds.slice(i, i + 200);
    try {
      const r = await ec2.send(new DescribeImagesCommand({ Owners: ['self'], Filters: [{ Name: 'block-device-mapping.snapshot-id', Values: [...ids] }] }));
      for (const img of r.Images ?? []) for (const m of img.BlockDeviceMappings ?? []) if (m.Ebs?.SnapshotId && ids.includes(m.Ebs.SnapshotId)) out.add(m.Ebs.SnapshotId);
    } catch (e) {
      throw awsError(e, 'DescribeImages');
    }
  }
  return out;
}

/** DeleteSnapshot: `gone` when EBS no longer has it, `in-use` when an image maps it (it stays). */
export async function deleteEbsSnapshot(ec2: EC2Client, snapshotId: string): Promise<'deleted' | 'gone' | 'in-use'> {
  try {
    await ec2.send(new DeleteSnapshotCommand({ SnapshotId: snapshotId }));
    return 'deleted';
  } catch (e) {
    const name = (e as { name?: string }).name ?? '';
    if (name === 'InvalidSnapshot.NotFound') return 'gone';
    if (name === 'InvalidSnapshot.InUse') return 'in-use';
    throw awsError(e, `DeleteSnapshot ${snapshotId}`);
  }
}

/** DescribeSnapshots of this account with `filters`, every page. */
export async function describeSnapshots(ec2: EC2Client, filters: Array<{ Name: string; Values: string[] }>): Promise<Snapshot[]> {
  const out: Snapshot[] = [];
  let token: string | undefined;
  for (let page = 0; page < 1000; page++) {
    let r;
    try {
      r = await ec2.send(new DescribeSnapshotsCommand({ OwnerIds: ['self'], Filters: filters, MaxResults: 1000, NextToken: token }));
    } catch (e) {
      throw awsError(e, 'DescribeSnapshots');
    }
    out.push(...(r.Snapshots ?? []));
    token = r.NextToken;
    if (!token) break;
  }
  return out;
}

/** The EBS snapshots of this account tagged with recovery run `runId` (failback's snapshots of the EC2 volumes). */
export async function snapshotsOfRun(ec2: EC2Client, runId: string): Promise<Array<{ ebsSnapshotId: string; volume: string; volumeSizeGiB: number }>> {
  const out: Array<{ ebsSnapshotId: string; volume: string; volumeSizeGiB: number }> = [];
  for (const snap of await describeSnapshots(ec2, [{ Name: 'tag:tandem:run', Values: [runId] }])) {
    const volume = snap.Tags?.find((t) => t.Key === 'tandem:volume')?.Value;
    if (snap.SnapshotId && volume) out.push({ ebsSnapshotId: snap.SnapshotId, volume, volumeSizeGiB: snap.VolumeSize ?? 0 });
  }
  return out;
}
