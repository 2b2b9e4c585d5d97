/**
 * A drill or a failover killed (kill -9) while it has things in EC2: the drill's instances and
 * image are torn down by the next drill, and a failover killed while its instance starts still
 * counts as failed over, so a rerun launches no second copy; and one whose waits EC2 refuses
 * (the role lost DescribeInstances) stops at once instead of polling to its time limit. The cloud
 * appliance's CLI runs them itself (no server), against the AWS emulator through the real SDK
 * clients; the emulator's holdAfter fault stops a command at a known point.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { rmSync, writeFileSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { cliJson, collect, spawnCli, type CliResult } from '../helpers/cli.js';
import { cloudConfig, startCloud, type CloudSetup } from './helpers.js';
import { isRefusal } from '../../appliance/recovery/ec2.js';

const MiB = 1024 * 1024;
const VOL = 'app-root';

let work: string;
let home: string;
let aws: CloudSetup['aws'];
let env: Record<string, string>;

interface EmulatedInstance { id: string; state: string; imageId: string; tags: Array<{ Key: string; Value: string }> }

async function ec2State(): Promise<{ instances: EmulatedInstance[]; images: Array<{ id: string }> }> {
  const r = await fetch(`${aws.url}/_emulator/state`);
  assert.ok(r.ok);
  return r.json() as never;
}

function tag(i: EmulatedInstance, key: string): string | undefined {
  return i.tags.find((t) => t.Key === key)?.Value;
}

async function ok(args: string[]): Promise<any> {
  const r = await cliJson(['--home', home, ...args], { env });
  assert.equal(r.code, 0, `appliance ${args.join(' ')} failed: ${r.stderr}`);
  return r.json;
}

/**
 * Start `args` and kill -9 it once EC2 holds an instance of a new run of `mode` and the command
 * waits for it to run. At known points, not by racing the instance's start: the emulator holds
 * the command's RunInstances, then (answering it with a server error the SDK retries, same client
 * token: the instance is launched) holds its first DescribeInstances after it, and the kill
 * lands there.
 */
async function killOnceLaunched(args: string[], mode: string): Promise<EmulatedInstance> {
  const known = new Set((await ec2State()).instances.map((i) => i.id));
  const heldBefore = await held();
  assert.equal((await faults({ holdAfter: 0, actions: ['RunInstances'] })).status, 200);
  const child = spawnCli(['--home', home, ...args], { env });
  const done = collect(child);
  try {
    const heldAt = async (n: number, what: string) => {
      for (let i = 0; i < 3000 && child.exitCode === null && (await held()) < heldBefore + n; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(await held(), heldBefore + n, `the ${mode} reached ${what}`);
    };
    await heldAt(1, 'RunInstances');
    assert.equal((await faults({ holdAfter: 0, actions: ['DescribeInstances'] })).status, 200);
    await heldAt(2, 'its wait for the instance');
    child.kill('SIGKILL');
    const r = await done;
    assert.equal(r.signal, 'SIGKILL', `the ${mode} ended before it was killed: ${r.stderr}`);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    await faults({});
  }
  const inst = (await ec2State()).instances.find((i) => !known.has(i.id) && tag(i, 'tandem:mode') === mode);
  assert.ok(inst, `no ${mode} instance appeared`);
  return inst;
}

const faults = (body: unknown) => fetch(`${aws.url}/_emulator/faults`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
const held = async (): Promise<number> => ((await (await fetch(`${aws.url}/_emulator/stats`)).json()) as { held: number }).held;

/** A rerun of the failover refuses (ERR_VOLUME_FAILED_OVER, naming `instanceId`) and launches no second copy. */
async function rerunFindsFailedOver(instanceId: string): Promise<CliResult & { json: any }> {
  const again = await cliJson(['--home', home, 'failover', VOL], { env });
  assert.equal(again.code, 1, again.stderr);
  assert.equal(again.json.error.code, 'ERR_VOLUME_FAILED_OVER');
  assert.ok(again.json.error.message.includes(instanceId), again.json.error.message);
  const running = (await ec2State()).instances.filter((i) => tag(i, 'tandem:mode') === 'failover' && i.state !== 'terminated');
  assert.deepEqual(running.map((i) => i.id), [instanceId], 'one copy of the server runs in EC2');
  return again;
}

before(async () => {
  // Instances stay pending for 1.5 s, as EC2's do for a while.
  ({ work, home, aws, env } = await startCloud('tandem-interrupted-', 1500));
  writeFileSync(join(home, 'config.yaml'), cloudConfig(VOL));
  const image = join(work, 'app-root.img');
  writeRandom(image, 4 * MiB);
  await ok(['volume', 'add', VOL, '--path', image]);
  await ok(['snapshot', VOL]);
  await ok(['ebs', 'export', VOL]);
});

after(async () => {
  await aws?.close();
  rmSync(work, { recursive: true, force: true });
});

test('a drill killed with its instance up is torn down by the next drill, once', async () => {
  const left = await killOnceLaunched(['drill', VOL, '--keep', '30'], 'drill');
  const run = tag(left, 'tandem:run')!;
  let s = await ec2State();
  assert.match(s.instances.find((i) => i.id === left.id)!.state, /pending|running/, 'the killed drill left its instance');
  assert.ok(s.images.some((i) => i.id === left.imageId), 'and its image');

  const next = await cliJson(['--home', home, 'drill', VOL], { env });
  assert.equal(next.code, 0, next.stderr);
  assert.equal(next.json.status, 'torn-down');
  assert.ok(next.stderr.includes(`drill ${run} `) && next.stderr.includes('was interrupted before its teardown: tearing it down'), next.stderr);
  s = await ec2State();
  assert.equal(s.instances.find((i) => i.id === left.id)!.state, 'terminated');
  assert.ok(!s.images.some((i) => i.id === left.imageId), 'its image is deregistered');
  assert.equal(s.instances.filter((i) => tag(i, 'tandem:mode') === 'drill' && i.state !== 'terminated').length, 0, 'no drill instance is left running');

  // Recorded as torn down: the drill after that has nothing to tear down.
  const third = await cliJson(['--home', home, 'drill', VOL], { env });
  assert.equal(third.code, 0, third.stderr);
  assert.doesNotMatch(third.stderr, /interrupted/);
});

test('a failover killed while its instance starts counts as failed over: the rerun launches no second copy', async () => {
  const first = await killOnceLaunched(['failover', VOL], 'failover');
  await rerunFindsFailedOver(first.id);

  const status = await ok(['status', VOL]);
  assert.ok(JSON.stringify(status).includes(first.id), 'status names the instance the volume runs in');
  const end = await ok(['failover', VOL, '--end', '--terminate']);
  assert.deepEqual(end.terminated, [first.id]);
  assert.match((await ec2State()).instances.find((i) => i.id === first.id)!.state, /shutting-down|terminated/);
});

test('doctor names a killed drill; the daemon, when it starts, tears it down', async () => {
  const left = await killOnceLaunched(['drill', VOL, '--keep', '30'], 'drill');
  const doctor = await cliJson(['--home', home, 'doctor'], { env });
  const check = JSON.stringify(doctor.json);
  assert.ok(check.includes(`drill ${tag(left, 'tandem:run')}`) && check.includes('interrupted before its teardown'), check);
  const daemon = spawnCli(['--home', home, 'daemon', '--listen', '127.0.0.1:0'], { env });
  const exited = collect(daemon);
  try {
    const deadline = Date.now() + 60_000;
    let state = '';
    let imageLeft = true;
    while (Date.now() < deadline) {
      const s = await ec2State();
      state = s.instances.find((i) => i.id === left.id)!.state;
      imageLeft = s.images.some((i) => i.id === left.imageId);
      if (state === 'terminated' && !imageLeft) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(state, 'terminated', 'the daemon terminated the drill instance');
    assert.equal(imageLeft, false, 'and deregistered its image');
  } finally {
    daemon.kill('SIGTERM');
    const r = await exited;
    assert.match(r.stderr, /was interrupted before its teardown: tearing it down/);
  }
});

test('Ctrl-C during a drill --keep ends it now: torn down before the command exits', async () => {
  const child = spawnCli(['--home', home, 'drill', VOL, '--keep', '30', '--json'], { env });
  const done = collect(child);
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const deadline = Date.now() + 60_000;
  while (!err.includes('keeping the drill instances')) {
    assert.ok(Date.now() < deadline, `the drill never reached --keep: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill('SIGINT');
  const r = await done;
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /SIGINT: ending the drill now/);
  const run = JSON.parse(r.stdout) as { status: string; servers: Array<{ instanceId: string; imageId: string }> };
  assert.equal(run.status, 'torn-down');
  const s = await ec2State();
  assert.equal(s.instances.find((i) => i.id === run.servers[0]!.instanceId)!.state, 'terminated');
  assert.ok(!s.images.some((i) => i.id === run.servers[0]!.imageId));
});

/**
 * What a failover killed midway leaves, made by hand: its run recorded as active by a process
 * that is gone, its image registered from the volume's last export and, with `launched`, an
 * instance running from it; both tagged with the run.
 */
async function failoverLeftByKill(stamp: string, launched: boolean): Promise<{ runId: string; imageId: string; instanceId: string | null }> {
  const { Home } = await import('../../appliance/home.js');
  const { RUNS_NS } = await import('../../appliance/recovery/state.js');
  const { EC2Client, RunInstancesCommand, RegisterImageCommand } = await import('@aws-sdk/client-ec2');
  const runId = `failover-${stamp}-${randomBytes(3).toString('hex')}`;
  const ec2 = new EC2Client({ region: 'us-east-1', endpoint: aws.url, credentials: { accessKeyId: 'test', secretAccessKey: 'test' } });
  const store = await Home.load(home).openStore();
  try {
    const exported = (await store.getMeta<Array<{ ebsSnapshotId: string }>>('ebs-exports', VOL))?.at(-1)?.ebsSnapshotId;
    assert.ok(exported, 'the volume was exported');
    const tags = [{ Key: 'tandem:run', Value: runId }, { Key: 'tandem:mode', Value: 'failover' }, { Key: 'tandem:plan', Value: 'app' }];
    const image = await ec2.send(new RegisterImageCommand({ Name: runId, RootDeviceName: '/dev/xvda', Architecture: 'x86_64', VirtualizationType: 'hvm', BlockDeviceMappings: [{ DeviceName: '/dev/xvda', Ebs: { SnapshotId: exported } }], TagSpecifications: [{ ResourceType: 'image', Tags: tags }] }));
    const instanceId = launched
      ? (await ec2.send(new RunInstancesCommand({ ImageId: image.ImageId, InstanceType: 't3.small', MinCount: 1, MaxCount: 1, SubnetId: 'subnet-0a1b2c3d4e5f60001', TagSpecifications: [{ ResourceType: 'instance', Tags: tags }] }))).Instances![0]!.InstanceId!
      : null;
    await store.putMeta(RUNS_NS, runId, {
      id: runId, mode: 'failover', status: 'active', started: new Date().toISOString(), requestedPoint: null,
      points: [{ volume: VOL, ebsSnapshotId: exported, tandemSnapshot: 'x', pointTime: new Date().toISOString(), size: 4 * MiB }],
      servers: [], rtoSeconds: null, launchSeconds: null, checks: [], tornDown: null, error: null, owner: 'a process that was killed', images: [image.ImageId],
    });
    return { runId, imageId: image.ImageId!, instanceId };
  } finally {
    await store.close();
    ec2.destroy();
  }
}

test('a failover killed between RunInstances and its record: the rerun finds the instance by its tag, records it and launches no second copy', async () => {
  // The state a kill at that moment leaves: the run recorded by another process with no server,
  // and an instance in EC2 carrying the run's tags.
  const { runId, instanceId } = await failoverLeftByKill('20261206T000000Z', true);
  assert.ok(instanceId);
  const again = await rerunFindsFailedOver(instanceId);
  assert.match(again.stderr, new RegExp(`failover ${runId} was interrupted after it launched ${instanceId} \\(plan app\\): recorded`));
  const end = await ok(['failover', VOL, '--end', '--terminate']);
  assert.deepEqual(end.terminated, [instanceId]);
});

test('a failover killed between RegisterImage and RunInstances: the rerun deregisters the image it left (it would keep its export from retention), records it failed, and fails over', async () => {
  const { runId, imageId } = await failoverLeftByKill('20261206T000001Z', false);
  const again = await cliJson(['--home', home, 'failover', VOL], { env });
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, new RegExp(`failover ${runId} was interrupted with image\\(s\\) ${imageId} registered and no instance from them: deregistered`));
  assert.ok(!(await ec2State()).images.some((i) => i.id === imageId), 'the image is deregistered');
  const runs = await cliJson(['--home', home, 'failover', VOL, '--end', '--terminate'], { env });
  assert.equal(runs.code, 0, runs.stderr);
});

/**
 * Run `args` (a drill or a failover) with every DescribeInstances refused from its RunInstances
 * on: the emulator holds the RunInstances unanswered, the refusals are switched on, and that
 * answers the held request with a server error, which the SDK retries (same client token), so
 * the instance is launched with the command's wait for `running` certain to meet refusals (no
 * race with the instance's 1.5 s start). The command must end by itself, and soon.
 */
async function refusedWhileStarting(t: { after(fn: () => unknown): void }, args: string[], mode: string): Promise<{ r: Awaited<ReturnType<typeof collect>>; out: any; launched: EmulatedInstance }> {
  t.after(() => faults({}));
  const known = new Set((await ec2State()).instances.map((i) => i.id));
  const heldBefore = await held();
  assert.equal((await faults({ holdAfter: 0, actions: ['RunInstances'] })).status, 200);
  const child = spawnCli(['--home', home, ...args, '--json'], { env });
  const done = collect(child);
  t.after(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
  for (let i = 0; i < 3000 && child.exitCode === null && (await held()) === heldBefore; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(await held(), heldBefore + 1, `the ${mode} reached RunInstances`);
  assert.equal((await faults({ denyPercent: 100, actions: ['DescribeInstances'] })).status, 200);
  const t0 = Date.now();
  const limit = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const r = await done;
  clearTimeout(limit);
  assert.equal(r.signal, null, `the ${mode} ended by itself, before the 60 s limit of this test`);
  assert.ok(Date.now() - t0 < 20_000, `the ${mode} stopped ${Date.now() - t0} ms after the refusals began`);
  assert.equal(r.code, 1, r.stderr);
  const launched = (await ec2State()).instances.find((x) => !known.has(x.id) && tag(x, 'tandem:mode') === mode);
  assert.ok(launched, `the ${mode} launched its instance: ${r.stderr}`);
  return { r, out: JSON.parse(r.stdout), launched };
}

test('a drill whose EC2 polls are refused (the role lost DescribeInstances) stops at the first refusal with ERR_AWS_ACCESS_DENIED, not at the wait\'s 10-minute limit', async (t) => {
  const { r, out, launched } = await refusedWhileStarting(t, ['drill', VOL], 'drill');
  assert.equal(out.error.code, 'ERR_DRILL_FAILED', r.stdout);
  assert.match(out.error.message, /ERR_AWS_ACCESS_DENIED: waiting for i-[0-9a-f]+ to run: UnauthorizedOperation.*IAM/);
  // Its teardown terminated the instance and deregistered the image (neither needs
  // DescribeInstances), and says its own wait for the termination was refused too.
  assert.match(out.error.message, /its teardown failed too: ERR_AWS_ACCESS_DENIED: waiting for i-[0-9a-f]+ to terminate/);
  assert.doesNotMatch(out.error.message, /was torn down/);
  const s = await ec2State();
  assert.match(s.instances.find((i) => i.id === launched.id)!.state, /shutting-down|terminated/);
  assert.ok(!s.images.some((i) => i.id === launched.imageId), 'its image is deregistered');
  const doctor = await cliJson(['--home', home, 'doctor'], { env });
  assert.ok(JSON.stringify(doctor.json).includes('failed, and its teardown did not finish'), JSON.stringify(doctor.json));

  // With the permission back, the next drill finishes the teardown the failed one could not confirm.
  await faults({});
  const next = await cliJson(['--home', home, 'drill', VOL], { env });
  assert.equal(next.code, 0, next.stderr);
  assert.ok(next.stderr.includes('failed, and its teardown did not finish: tearing it down'), next.stderr);
  assert.equal((await ec2State()).instances.find((i) => i.id === launched.id)!.state, 'terminated');
});

test('a failover whose wait for `running` is refused stops at once; its instance counts as failed over, so the rerun launches no second copy', async (t) => {
  const { r, out, launched } = await refusedWhileStarting(t, ['failover', VOL], 'failover');
  assert.match(out.error.message, /ERR_AWS_ACCESS_DENIED: waiting for i-[0-9a-f]+ to run: UnauthorizedOperation/, r.stdout);
  assert.match(r.stderr, new RegExp(`${launched.id} is pending .*; it counts as failed over`));
  await faults({});
  await rerunFindsFailedOver(launched.id);
  const end = await ok(['failover', VOL, '--end', '--terminate']);
  assert.deepEqual(end.terminated, [launched.id]);
});

test('what stops an EC2 wait: refusals do; NotFound (eventual consistency), throttling, server and network errors are polled through', () => {
  const err = (name: string, status?: number) => Object.assign(new Error(name), { name, $metadata: status === undefined ? {} : { httpStatusCode: status } });
  for (const e of [err('UnauthorizedOperation', 403), err('AuthFailure', 401), err('Blocked', 403), err('InvalidInstanceID.Malformed', 400), err('ExpiredToken', 400)]) assert.equal(isRefusal(e), true, e.name);
  for (const e of [err('InvalidInstanceID.NotFound', 400), err('InvalidSnapshot.NotFound', 400), err('RequestLimitExceeded', 503), err('Throttling', 400), err('InternalError', 500), err('Unavailable', 503), err('ECONNRESET'), err('CredentialsProviderError')]) assert.equal(isRefusal(e), false, e.name);
});
