/** The EC2 Query API of the emulator, driven by the real @aws-sdk/client-ec2 (and client-ebs for reads). */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  CreateSnapshotCommand,
  CreateTagsCommand,
  DeleteSnapshotCommand,
  DeregisterImageCommand,
  DescribeImagesCommand,
  DescribeInstancesCommand,
  DescribeSnapshotsCommand,
  DescribeSubnetsCommand,
  DescribeVolumesCommand,
  RegisterImageCommand,
  RunInstancesCommand,
  TerminateInstancesCommand,
  waitUntilInstanceRunning,
  waitUntilInstanceTerminated,
  waitUntilSnapshotCompleted,
  type EC2Client,
} from '@aws-sdk/client-ec2';
import { GetSnapshotBlockCommand, ListChangedBlocksCommand, ListSnapshotBlocksCommand, StartSnapshotCommand } from '@aws-sdk/client-ebs';
import { createHash } from 'node:crypto';
import { BLOCK, block, emulator, rejects, writeSnapshot } from './helpers.js';

async function registerImage(ec2: EC2Client, name: string, rootSnap: string, dataSnap?: string): Promise<string> {
  const r = await ec2.send(new RegisterImageCommand({
    Name: name,
    Architecture: 'x86_64',
    RootDeviceName: '/dev/xvda',
    VirtualizationType: 'hvm',
    EnaSupport: true,
    BlockDeviceMappings: [
      { DeviceName: '/dev/xvda', Ebs: { SnapshotId: rootSnap, VolumeSize: 2, VolumeType: 'gp3', DeleteOnTermination: true } },
      ...(dataSnap ? [{ DeviceName: '/dev/xvdb', Ebs: { SnapshotId: dataSnap, DeleteOnTermination: false } }] : []),
    ],
    TagSpecifications: [{ ResourceType: 'image', Tags: [{ Key: 'tandem:plan', Value: 'web' }] }],
  }));
  assert.match(r.ImageId!, /^ami-[0-9a-f]{17}$/);
  return r.ImageId!;
}

test('RegisterImage + RunInstances + DescribeInstances running + TerminateInstances', async (t) => {
  const { ebs, ec2 } = await emulator(t, { instanceDelayMs: 100 });
  const root = await writeSnapshot(ebs, 1, new Map([[0, block(1)]]));
  const data = await writeSnapshot(ebs, 1, new Map([[3, block(2)]]));
  const imageId = await registerImage(ec2, 'tandem-web-1', root, data);
  const images = await ec2.send(new DescribeImagesCommand({ ImageIds: [imageId] }));
  const img = images.Images![0]!;
  assert.equal(img.State, 'available');
  assert.equal(img.RootDeviceName, '/dev/xvda');
  assert.deepEqual(img.BlockDeviceMappings!.map((m) => m.Ebs!.SnapshotId), [root, data]);
  assert.deepEqual(img.Tags, [{ Key: 'tandem:plan', Value: 'web' }]);
  const dup = await rejects(registerImage(ec2, 'tandem-web-1', root));
  assert.equal(dup.name, 'InvalidAMIName.Duplicate');

  const run = await ec2.send(new RunInstancesCommand({
    ImageId: imageId,
    InstanceType: 't3.micro',
    MinCount: 1,
    MaxCount: 1,
    SubnetId: 'subnet-0a1b2c3d4e5f60001',
    SecurityGroupIds: ['sg-0123456789abcdef0'],
    PrivateIpAddress: '10.0.1.20',
    UserData: Buffer.from('#!/bin/sh\necho hi\n').toString('base64'),
    ClientToken: 'launch-1',
    TagSpecifications: [{ ResourceType: 'instance', Tags: [{ Key: 'Name', Value: 'web' }, { Key: 'tandem:drill', Value: 'd1' }] }],
  }));
  const inst = run.Instances![0]!;
  assert.match(inst.InstanceId!, /^i-[0-9a-f]{17}$/);
  assert.equal(inst.State!.Name, 'pending');
  assert.equal(inst.PrivateIpAddress, '10.0.1.20');
  assert.equal(inst.SubnetId, 'subnet-0a1b2c3d4e5f60001');
  const again = await ec2.send(new RunInstancesCommand({ ImageId: imageId, MinCount: 1, MaxCount: 1, ClientToken: 'launch-1' }));
  assert.equal(again.Instances![0]!.InstanceId, inst.InstanceId, 'the same ClientToken launches nothing new');

  await waitUntilInstanceRunning({ client: ec2, maxWaitTime: 20, minDelay: 1, maxDelay: 1 }, { InstanceIds: [inst.InstanceId!] });
  const byTag = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: 'tag:tandem:drill', Values: ['d1'] }] }));
  const found = byTag.Reservations!.flatMap((r) => r.Instances!);
  assert.deepEqual(found.map((i) => i.InstanceId), [inst.InstanceId]);
  const described = found[0]!;
  assert.equal(described.State!.Name, 'running');
  assert.equal(described.State!.Code, 16);
  assert.equal(described.InstanceType, 't3.micro');
  assert.deepEqual(described.SecurityGroups!.map((g) => g.GroupId), ['sg-0123456789abcdef0']);
  const devices = described.BlockDeviceMappings!.map((m) => [m.DeviceName, m.Ebs!.VolumeId]);
  assert.deepEqual(devices.map((d) => d[0]), ['/dev/xvda', '/dev/xvdb']);
  const vols = await ec2.send(new DescribeVolumesCommand({ Filters: [{ Name: 'attachment.instance-id', Values: [inst.InstanceId!] }] }));
  assert.equal(vols.Volumes!.length, 2);
  const rootVol = vols.Volumes!.find((v) => v.SnapshotId === root)!;
  assert.equal(rootVol.Size, 2);
  assert.equal(rootVol.State, 'in-use');
  const none = await ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: 'tag:tandem:drill', Values: ['other'] }] }));
  assert.equal(none.Reservations!.length, 0);

  const term = await ec2.send(new TerminateInstancesCommand({ InstanceIds: [inst.InstanceId!] }));
  assert.equal(term.TerminatingInstances![0]!.CurrentState!.Name, 'shutting-down');
  assert.equal(term.TerminatingInstances![0]!.PreviousState!.Name, 'running');
  await waitUntilInstanceTerminated({ client: ec2, maxWaitTime: 20, minDelay: 1, maxDelay: 1 }, { InstanceIds: [inst.InstanceId!] });
  const after = await ec2.send(new DescribeVolumesCommand({ VolumeIds: [devices[1]![1]!] }));
  assert.equal(after.Volumes![0]!.State, 'available', 'a volume with DeleteOnTermination=false survives');
  const gone = await rejects(ec2.send(new DescribeVolumesCommand({ VolumeIds: [devices[0]![1]!] })));
  assert.equal(gone.name, 'InvalidVolume.NotFound');

  await ec2.send(new DeregisterImageCommand({ ImageId: imageId }));
  const deregistered = await rejects(ec2.send(new DescribeImagesCommand({ ImageIds: [imageId] })));
  assert.equal(deregistered.name, 'InvalidAMIID.NotFound');
});

test('CreateSnapshot of an instance volume after a write in EC2: ListChangedBlocks shows exactly that block', async (t) => {
  const { ebs, ec2, control } = await emulator(t, { instanceDelayMs: 0 });
  const base = await writeSnapshot(ebs, 1, new Map([[0, block(1)], [1, block(2)], [9, block(3)]]));
  const imageId = await registerImage(ec2, 'tandem-db-1', base);
  const run = await ec2.send(new RunInstancesCommand({ ImageId: imageId, MinCount: 1, MaxCount: 1 }));
  const volumeId = run.Instances![0]!.BlockDeviceMappings![0]!.Ebs!.VolumeId!;

  const payload = Buffer.from('changed in EC2 after failover');
  const offset = 5 * BLOCK + 1000;
  const w = await control(`/_emulator/volumes/${volumeId}/write`, { offset, dataBase64: payload.toString('base64') });
  assert.equal(w.blocksChanged, 1);
  const back = await control(`/_emulator/volumes/${volumeId}/read?offset=${offset}&length=${payload.length}`);
  assert.equal(Buffer.from(back.dataBase64, 'base64').toString(), payload.toString());

  const snap = await ec2.send(new CreateSnapshotCommand({
    VolumeId: volumeId,
    Description: 'failback point',
    TagSpecifications: [{ ResourceType: 'snapshot', Tags: [{ Key: 'tandem:volume', Value: 'db' }] }],
  }));
  await waitUntilSnapshotCompleted({ client: ec2, maxWaitTime: 20, minDelay: 1, maxDelay: 1 }, { SnapshotIds: [snap.SnapshotId!] });
  const d = await ec2.send(new DescribeSnapshotsCommand({ Filters: [{ Name: 'tag:tandem:volume', Values: ['db'] }] }));
  assert.deepEqual(d.Snapshots!.map((s) => [s.SnapshotId, s.VolumeId, s.State, s.VolumeSize]), [[snap.SnapshotId, volumeId, 'completed', 2]]);

  const changed = await ebs.send(new ListChangedBlocksCommand({ FirstSnapshotId: base, SecondSnapshotId: snap.SnapshotId! }));
  assert.deepEqual(changed.ChangedBlocks!.map((c) => c.BlockIndex), [5]);
  const r = await ebs.send(new GetSnapshotBlockCommand({ SnapshotId: snap.SnapshotId!, BlockIndex: 5, BlockToken: changed.ChangedBlocks![0]!.SecondBlockToken! }));
  const data = Buffer.from(await r.BlockData!.transformToByteArray());
  assert.equal(data.subarray(1000, 1000 + payload.length).toString(), payload.toString());
  assert.ok(data.subarray(0, 1000).equals(Buffer.alloc(1000)));

  // A second snapshot of the same volume is parented to the first: only the new change shows.
  await control(`/_emulator/volumes/${volumeId}/write`, { offset: 0, dataBase64: Buffer.from('x').toString('base64') });
  const snap2 = await ec2.send(new CreateSnapshotCommand({ VolumeId: volumeId }));
  const changed2 = await ebs.send(new ListChangedBlocksCommand({ FirstSnapshotId: snap.SnapshotId!, SecondSnapshotId: snap2.SnapshotId! }));
  assert.deepEqual(changed2.ChangedBlocks!.map((c) => c.BlockIndex), [0]);

  // An image's snapshot cannot be deleted; a leaf snapshot can.
  const inUse = await rejects(ec2.send(new DeleteSnapshotCommand({ SnapshotId: base })));
  assert.equal(inUse.name, 'InvalidSnapshot.InUse');
  await ec2.send(new DeleteSnapshotCommand({ SnapshotId: snap2.SnapshotId! }));
  const deleted = await rejects(ec2.send(new DescribeSnapshotsCommand({ SnapshotIds: [snap2.SnapshotId!] })));
  assert.equal(deleted.name, 'InvalidSnapshot.NotFound');
});

test('DeleteSnapshot of a parent with two children: each child keeps every block it read through it', async (t) => {
  const { ebs, ec2 } = await emulator(t, { instanceDelayMs: 0 });
  const parent = await writeSnapshot(ebs, 1, new Map([[0, block(1)], [1, block(2)]]));
  const left = await writeSnapshot(ebs, 1, new Map([[1, block(3)]]), parent);
  const right = await writeSnapshot(ebs, 1, new Map([[0, block(4)]]), parent);
  await ec2.send(new DeleteSnapshotCommand({ SnapshotId: parent }));
  const read = async (snapshotId: string): Promise<Map<number, string>> => {
    const out = new Map<number, string>();
    const list = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: snapshotId }));
    for (const b of list.Blocks ?? []) {
      const r = await ebs.send(new GetSnapshotBlockCommand({ SnapshotId: snapshotId, BlockIndex: b.BlockIndex!, BlockToken: b.BlockToken! }));
      out.set(b.BlockIndex!, createHash('sha256').update(await r.BlockData!.transformToByteArray()).digest('hex'));
    }
    return out;
  };
  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  assert.deepEqual(await read(left), new Map([[0, sha(block(1))], [1, sha(block(3))]]));
  assert.deepEqual(await read(right), new Map([[0, sha(block(4))], [1, sha(block(2))]]));
});

test('unknown ids and bad requests answer with EC2’s error codes', async (t) => {
  const { ebs, ec2 } = await emulator(t);
  const cases: Array<[() => Promise<unknown>, string]> = [
    [() => ec2.send(new DescribeSnapshotsCommand({ SnapshotIds: ['snap-0123456789abcdef0'] })), 'InvalidSnapshot.NotFound'],
    [() => ec2.send(new DescribeImagesCommand({ ImageIds: ['ami-0123456789abcdef0'] })), 'InvalidAMIID.NotFound'],
    [() => ec2.send(new DescribeInstancesCommand({ InstanceIds: ['i-0123456789abcdef0'] })), 'InvalidInstanceID.NotFound'],
    [() => ec2.send(new RunInstancesCommand({ ImageId: 'ami-0123456789abcdef0', MinCount: 1, MaxCount: 1 })), 'InvalidAMIID.NotFound'],
    [() => ec2.send(new TerminateInstancesCommand({ InstanceIds: ['i-0123456789abcdef0'] })), 'InvalidInstanceID.NotFound'],
    [() => ec2.send(new CreateSnapshotCommand({ VolumeId: 'vol-0123456789abcdef0' })), 'InvalidVolume.NotFound'],
    [() => ec2.send(new DescribeInstancesCommand({ InstanceIds: ['web-1'] })), 'InvalidInstanceID.Malformed'],
    [() => ec2.send(new CreateTagsCommand({ Resources: ['snap-0123456789abcdef0'], Tags: [{ Key: 'a', Value: 'b' }] })), 'InvalidSnapshot.NotFound'],
    [() => ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: 'no-such-filter', Values: ['x'] }] })), 'InvalidParameterValue'],
  ];
  for (const [call, code] of cases) {
    const e = await call().then(() => ({ name: 'no error' }), (x: unknown) => x as any);
    assert.equal(e.name, code);
    assert.equal(e.$metadata.httpStatusCode, 400);
  }
  const pending = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1 }));
  const e = await rejects(registerImage(ec2, 'from-pending', pending.SnapshotId!));
  assert.equal(e.name, 'IncorrectState');
});

test('subnets are seeded (one isolated), CreateTags tags them, unknown subnet-* ids are accepted', async (t) => {
  const { ec2 } = await emulator(t);
  const all = await ec2.send(new DescribeSubnetsCommand({}));
  assert.ok(all.Subnets!.length >= 2);
  const isolated = await ec2.send(new DescribeSubnetsCommand({ Filters: [{ Name: 'tag:Name', Values: ['isolated'] }] }));
  assert.equal(isolated.Subnets!.length, 1);
  const id = isolated.Subnets![0]!.SubnetId!;
  await ec2.send(new CreateTagsCommand({ Resources: [id], Tags: [{ Key: 'tandem:drill', Value: 'yes' }] }));
  const tagged = await ec2.send(new DescribeSubnetsCommand({ Filters: [{ Name: 'tag:tandem:drill', Values: ['y*'] }] }));
  assert.deepEqual(tagged.Subnets!.map((s) => s.SubnetId), [id]);
  const custom = await ec2.send(new DescribeSubnetsCommand({ SubnetIds: ['subnet-0feedfacefeedface'] }));
  assert.equal(custom.Subnets![0]!.SubnetId, 'subnet-0feedfacefeedface');
  assert.equal(custom.Subnets![0]!.State, 'available');
});

test('EC2 throttling answers RequestLimitExceeded; a wrong region answers AuthFailure', async (t) => {
  const { ec2, control } = await emulator(t, {}, { maxAttempts: 1 });
  await control('/_emulator/faults', { throttlePercent: 100 });
  const e = await rejects(ec2.send(new DescribeSubnetsCommand({})));
  assert.equal(e.name, 'RequestLimitExceeded');
  await control('/_emulator/faults', { throttlePercent: 0 });
  const ok = await ec2.send(new DescribeSubnetsCommand({}));
  assert.ok(ok.Subnets!.length >= 2);

  const other = await emulator(t, {}, { region: 'eu-west-1', maxAttempts: 1 });
  const auth = await rejects(other.ec2.send(new DescribeSubnetsCommand({})));
  assert.equal(auth.name, 'AuthFailure');
  assert.match(auth.message, /eu-west-1/);
});
