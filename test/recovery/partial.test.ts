/**
 * A failover in which one recovery plan cannot come up: EC2 has no capacity for its instance
 * type, or its instance terminates instead of running. The other plans still come up and count
 * as failed over (a rerun launches no second copy of them); the plan that failed leaves nothing in
 * EC2 and is launched later with `failover --plan`. The cloud appliance's CLI runs against the AWS
 * emulator (launch faults switched through its control route) through the real SDK clients.
 */
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync, writeFileSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { cli, cliJson } from '../helpers/cli.js';
import { startCloud, type CloudSetup } from './helpers.js';

const MiB = 1024 * 1024;

let work: string;
let home: string;
let aws: CloudSetup['aws'];
let env: Record<string, string>;

interface EmulatedInstance { id: string; state: string; imageId: string; tags: Array<{ Key: string; Value: string }> }
interface EmulatedImage { id: string; name: string }

async function ec2State(): Promise<{ instances: EmulatedInstance[]; images: EmulatedImage[] }> {
  const r = await fetch(`${aws.url}/_emulator/state`);
  assert.ok(r.ok);
  return r.json() as never;
}

async function launchFaults(faults: Record<string, string>): Promise<void> {
  const r = await fetch(`${aws.url}/_emulator/launch-faults`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(faults) });
  assert.ok(r.ok, await r.text());
}

function tag(i: EmulatedInstance, key: string): string | undefined {
  return i.tags.find((t) => t.Key === key)?.Value;
}

/** The failover instances alive in EC2, by plan. */
async function alive(): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  for (const i of (await ec2State()).instances) {
    if (tag(i, 'tandem:mode') !== 'failover' || i.state === 'terminated' || i.state === 'shutting-down') continue;
    const plan = tag(i, 'tandem:plan')!;
    out.set(plan, [...(out.get(plan) ?? []), i.id]);
  }
  return out;
}

async function ok(args: string[]): Promise<any> {
  const r = await cliJson(['--home', home, ...args], { env });
  assert.equal(r.code, 0, `appliance ${args.join(' ')} failed: ${r.stderr}`);
  return r.json;
}

async function failedOver(volume: string): Promise<{ run: string; instanceId: string } | null> {
  const s = await ok(['status', volume]);
  return s.volumes.find((v: { volume: string }) => v.volume === volume)?.failedOver ?? null;
}

before(async () => {
  ({ work, home, aws, env } = await startCloud('tandem-partial-', 300));
  // Two servers: web on a t3.small, db on an r5.large (the type the launch faults hit).
  writeFileSync(join(home, 'config.yaml'), `appliance:
  name: cloud
recovery:
  web:
    instanceType: t3.small
    subnet: subnet-0a1b2c3d4e5f60001
    securityGroups: [sg-0a1b2c3d]
    privateIp: 10.0.1.40
    rootVolume: { volume: web-root, device: /dev/xvda }
  db:
    instanceType: r5.large
    subnet: subnet-0a1b2c3d4e5f60001
    securityGroups: [sg-0a1b2c3d]
    privateIp: 10.0.1.41
    rootVolume: { volume: db-root, device: /dev/xvda }
`);
  for (const v of ['web-root', 'db-root']) {
    const image = join(work, `${v}.img`);
    writeRandom(image, 2 * MiB);
    await ok(['volume', 'add', v, '--path', image]);
    await ok(['snapshot', v]);
    await ok(['ebs', 'export', v]);
  }
});

afterEach(async () => {
  // Each test starts with no fault and nothing failed over.
  await launchFaults({});
  for (const v of ['web-root', 'db-root']) {
    if (await failedOver(v)) await ok(['failover', v, '--end', '--terminate']);
  }
});

after(async () => {
  await aws?.close();
  rmSync(work, { recursive: true, force: true });
});

test('no capacity for one plan: the other comes up and counts as failed over; `failover --plan` brings the rest up later', async () => {
  await launchFaults({ 'r5.large': 'capacity' });
  const r = await cliJson(['--home', home, 'failover'], { env });
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json.error.code, 'ERR_FAILOVER_PARTIAL', r.stderr);
  const message: string = r.json.error.message;
  assert.match(message, /web \(i-[0-9a-f]+, running\) runs in EC2 and counts as failed over/);
  assert.match(message, /db: .*InsufficientInstanceCapacity|db: .*capacity/);
  assert.ok(message.includes('`appliance failover --plan db`'), message);
  assert.match(r.stderr, /db: could not launch: .*; the other plans go on/);

  const up = await alive();
  assert.deepEqual([...up.keys()], ['web'], 'only web runs');
  const runId = r.json.error.details.run as string;
  assert.ok(!(await ec2State()).images.some((i) => i.name === `tandem-db-${runId}`), "db's image is deregistered");
  assert.equal((await failedOver('web-root'))?.instanceId, up.get('web')![0]);
  assert.equal(await failedOver('db-root'), null, 'db-root is not failed over');
  const text = await cli(['--home', home, 'status'], { env });
  assert.match(text.stdout, new RegExp(`failover ${runId} came up in part: db did not \\(db: .*InsufficientInstanceCapacity.*\\); \`appliance failover --plan db\` brings it up`));

  // Rerunning the whole failover would start a second web: refused, nothing launched.
  const again = await cliJson(['--home', home, 'failover'], { env });
  assert.equal(again.code, 1, again.stderr);
  assert.equal(again.json.error.code, 'ERR_VOLUME_FAILED_OVER');
  assert.deepEqual(await alive(), up);

  // With capacity back, the named command brings db up: one copy of each server.
  await launchFaults({});
  const db = await ok(['failover', '--plan', 'db']);
  assert.equal(db.status, 'active');
  const after = await alive();
  assert.deepEqual([...after.keys()].sort(), ['db', 'web']);
  assert.equal(after.get('web')!.length, 1);
  assert.equal(after.get('db')!.length, 1);
  assert.equal((await failedOver('db-root'))?.instanceId, after.get('db')![0]);
  assert.doesNotMatch((await cli(['--home', home, 'status'], { env })).stdout, /came up in part/, 'nothing is missing any more');
});

test('an instance that terminates instead of running: its plan is not failed over and its image is gone; the other plan is', async () => {
  await launchFaults({ 'r5.large': 'fail' });
  const r = await cliJson(['--home', home, 'failover'], { env });
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json.error.code, 'ERR_FAILOVER_PARTIAL', r.stderr);
  assert.match(r.json.error.message, /db: its instance i-[0-9a-f]+ is terminated instead of running: Server\.InternalError: Internal error on launch/);
  const runId = r.json.error.details.run as string;
  const dead = (await ec2State()).instances.find((i) => tag(i, 'tandem:run') === runId && tag(i, 'tandem:plan') === 'db')!;
  assert.equal(dead.state, 'terminated');
  assert.ok(!(await ec2State()).images.some((i) => i.id === dead.imageId), "db's image is deregistered");
  assert.deepEqual([...(await alive()).keys()], ['web']);
  assert.ok(await failedOver('web-root'));
  assert.equal(await failedOver('db-root'), null);

  // The run records what came up and what did not.
  const { Home } = await import('../../appliance/home.js');
  const { RUNS_NS } = await import('../../appliance/recovery/state.js');
  const store = await Home.load(home).openStore();
  try {
    const run = await store.getMeta<{ status: string; failedPlans: string[]; servers: Array<{ plan: string }>; error: string }>(RUNS_NS, runId);
    assert.equal(run?.status, 'active');
    assert.deepEqual(run.failedPlans, ['db']);
    assert.deepEqual(run.servers.map((x) => x.plan), ['web']);
    assert.match(run.error, /^db: its instance/);
  } finally {
    await store.close();
  }
});

test('RunInstances launched db but its answers were lost: the instance EC2 holds is the db server, not a failure, and no second copy starts', async () => {
  await launchFaults({ 'r5.large': 'lost' });
  const r = await cliJson(['--home', home, 'failover'], { env });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.status, 'active');
  assert.match(r.stderr, /db: EC2 launched i-[0-9a-f]+ though RunInstances failed \(.*InternalError.*\): it is this plan's server/);
  const up = await alive();
  assert.deepEqual([...up.keys()].sort(), ['db', 'web']);
  assert.equal(up.get('db')!.length, 1, 'the retries with the client token launched no second db');
  assert.deepEqual(r.json.servers.map((x: { plan: string; instanceId: string }) => [x.plan, x.instanceId]).sort(), [['db', up.get('db')![0]], ['web', up.get('web')![0]]]);
  assert.equal((await failedOver('db-root'))?.instanceId, up.get('db')![0]);
  await launchFaults({});
  const again = await cliJson(['--home', home, 'failover', '--plan', 'db'], { env });
  assert.equal(again.json.error.code, 'ERR_VOLUME_FAILED_OVER', 'a rerun of db would start a second copy: refused');
});

test('no plan comes up: the failover is failed, nothing of it is left in EC2, and a rerun launches every plan', async () => {
  await launchFaults({ 't3.small': 'capacity', 'r5.large': 'fail' });
  const r = await cliJson(['--home', home, 'failover'], { env });
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json.error.code, 'ERR_FAILOVER_FAILED', r.stderr);
  assert.match(r.json.error.message, /brought no server up: .*Nothing of it is left in EC2, and no volume counts as failed over/);
  const runId = r.json.error.details.run as string;
  const s = await ec2State();
  assert.ok(!s.images.some((i) => i.name.endsWith(runId)), 'its images are deregistered');
  assert.ok(!s.instances.some((i) => tag(i, 'tandem:run') === runId && i.state !== 'terminated'));
  assert.equal(await failedOver('web-root'), null);
  assert.equal(await failedOver('db-root'), null);

  await launchFaults({});
  const again = await ok(['failover']);
  assert.equal(again.status, 'active');
  assert.ok(again.rtoSeconds > 0);
  const up = await alive();
  assert.deepEqual([...up.keys()].sort(), ['db', 'web']);
});
