/**
 * Failover, drill and failback end to end: two real appliance processes on loopback, the
 * cloud one talking to the AWS emulator through the real SDK clients.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { sameBytes } from '../helpers/files.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { ChildProcess } from 'node:child_process';
import { request as httpsRequest } from 'node:https';
import { cliJson, spawnCli } from '../helpers/cli.js';
import { startAwsEmulator } from '../../emulators/aws/index.js';
import { cloudConfig } from './helpers.js';

const MiB = 1024 * 1024;
const BLOCK = 512 * 1024;
const SIZE = 16 * MiB;
const VOL = 'app-root';

let work: string;
let aws: Awaited<ReturnType<typeof startAwsEmulator>>;
let cloudEnv: Record<string, string>;
const servers: ChildProcess[] = [];
let onprem: string;
let cloud: string;
let image: string;

function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

async function serve(home: string, env: Record<string, string> = {}): Promise<string> {
  const child = spawnCli(['--home', home, 'serve', '--listen', '127.0.0.1:0'], { env });
  servers.push(child);
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const lines = createInterface({ input: child.stdout! });
  return new Promise((resolve, reject) => {
    child.on('exit', (c) => reject(new Error(`serve exited ${c}: ${err}`)));
    lines.on('line', (l) => {
      const m = /(https:\/\/\S+)/.exec(l);
      if (m) resolve(m[1]!);
    });
  });
}

async function ok(home: string, args: string[], env: Record<string, string> = {}): Promise<any> {
  const r = await cliJson(['--home', home, ...args], { env });
  assert.equal(r.code, 0, `appliance ${args.join(' ')} failed: ${r.stderr}`);
  return r.json;
}

async function emulator(path: string, body?: unknown): Promise<any> {
  const r = await fetch(`${aws.url}${path}`, body === undefined ? {} : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  if (!r.ok) assert.fail(`${path}: ${r.status} ${await r.text()}`);
  const type = r.headers.get('content-type') ?? '';
  return type.includes('json') ? r.json() : Buffer.from(await r.arrayBuffer());
}

async function readEc2Volume(id: string): Promise<Buffer> {
  const r = await emulator(`/_emulator/volumes/${id}/read?offset=0&length=${SIZE}`);
  return Buffer.isBuffer(r) ? r : Buffer.from(r.dataBase64 ?? r.data, 'base64');
}

before(async () => {
  work = mkdtempSync(join(tmpdir(), 'tandem-recovery-'));
  aws = await startAwsEmulator({ host: '127.0.0.1', port: 0 });
  cloudEnv = { AWS_REGION: 'us-east-1', AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test', AWS_ENDPOINT_URL_EBS: aws.url, AWS_ENDPOINT_URL_EC2: aws.url };
  image = join(work, 'app-root.img');
  const fd = openSync(image, 'w');
  writeSync(fd, randomBytes(10 * MiB), 0, 10 * MiB, 0);
  closeSync(fd);
  truncateSync(image, SIZE);
  onprem = join(work, 'onprem');
  cloud = join(work, 'cloud');
  const on = await ok(onprem, ['init', '--name', 'onprem']);
  const cl = await ok(cloud, ['init', '--name', 'cloud']);
  writeFileSync(join(cloud, 'config.yaml'), cloudConfig(VOL));
  const onUrl = await serve(onprem);
  const clUrl = await serve(cloud, cloudEnv);
  await ok(onprem, ['peer', 'add', 'cloud', '--url', clUrl, '--token', cl.token, '--fingerprint', cl.fingerprint]);
  await ok(cloud, ['peer', 'add', 'onprem', '--url', onUrl, '--token', on.token, '--fingerprint', on.fingerprint]);
  await ok(onprem, ['volume', 'add', VOL, '--path', image]);
  await ok(onprem, ['sync', VOL, '--peer', 'cloud']);
  await ok(cloud, ['ebs', 'export', VOL], cloudEnv);
});

after(async () => {
  for (const s of servers) s.kill('SIGKILL');
  await aws?.close();
  rmSync(work, { recursive: true, force: true });
});

test('a drill launches in the isolated subnet, passes, tears down, and leaves production and replication untouched', async () => {
  const volumeBefore = sha(readFileSync(image));
  const cloudSnapsBefore = await ok(cloud, ['snapshots', VOL]);
  const onSnapsBefore = await ok(onprem, ['snapshots', VOL]);

  const drill = await ok(cloud, ['drill', VOL], cloudEnv);
  assert.equal(drill.mode, 'drill');
  assert.equal(drill.status, 'torn-down');
  assert.ok(drill.checks.length >= 3 && drill.checks.every((c: { ok: boolean }) => c.ok), JSON.stringify(drill.checks));
  assert.equal(drill.servers[0].subnetId, 'subnet-0a1b2c3d4e5f60002');
  assert.notEqual(drill.servers[0].privateIp, '10.0.1.30', 'a drill must not take the production IP');

  // Torn down: the instance is terminated and the image is gone.
  const state = await emulator('/_emulator/state');
  const text = JSON.stringify(state);
  assert.ok(text.includes(drill.servers[0].instanceId), 'the emulator knows the drill instance');
  const inst = (state.instances ?? []).find((i: any) => (i.instanceId ?? i.InstanceId ?? i.id) === drill.servers[0].instanceId);
  if (inst) assert.match(JSON.stringify(inst), /terminated|shutting-down/);

  // Production and replication untouched.
  assert.equal(sha(readFileSync(image)), volumeBefore);
  assert.deepEqual(await ok(cloud, ['snapshots', VOL]), cloudSnapsBefore);
  assert.deepEqual(await ok(onprem, ['snapshots', VOL]), onSnapsBefore);
  const again = await ok(onprem, ['sync', VOL, '--peer', 'cloud']);
  assert.equal(again.blocksSent, 0, 'nothing changed, nothing to send after the drill');

  // The drill report is kept for status.
  const status = await ok(cloud, ['status', VOL]);
  assert.match(JSON.stringify(status), new RegExp(drill.id));
});

test('failover launches the plan with its IP, records the RTO; failback brings back only what changed in EC2, byte-exact', async () => {
  const fo = await ok(cloud, ['failover', VOL], cloudEnv);
  assert.equal(fo.status, 'active');
  const server = fo.servers[0];
  assert.equal(server.state, 'running');
  assert.equal(server.subnetId, 'subnet-0a1b2c3d4e5f60001');
  assert.equal(server.privateIp, '10.0.1.30');
  assert.ok(fo.rtoSeconds > 0 && fo.rtoSeconds < 120, `rto ${fo.rtoSeconds}`);
  const ec2Volume: string = server.disks[0].ec2VolumeId;
  assert.match(ec2Volume, /^vol-/);

  // The on-prem appliance is back while production runs in EC2: its stale copy must not become the newest.
  const cloudSnaps = await ok(cloud, ['snapshots', VOL]);
  const stale = await cliJson(['--home', onprem, 'sync', VOL, '--peer', 'cloud']);
  assert.equal(stale.code, 1, stale.stderr);
  assert.equal(stale.json.error.code, 'ERR_VOLUME_FAILED_OVER');
  assert.match(stale.json.error.message, /appliance failback app-root/);
  assert.deepEqual(await ok(cloud, ['snapshots', VOL]), cloudSnaps, 'the cloud committed nothing');

  // The server runs in EC2; two blocks change there. Meanwhile the on-prem copy diverged too.
  await emulator(`/_emulator/volumes/${ec2Volume}/write`, { offset: 2 * BLOCK + 100, dataBase64: randomBytes(4096).toString('base64') });
  await emulator(`/_emulator/volumes/${ec2Volume}/write`, { offset: 12 * BLOCK, dataBase64: randomBytes(BLOCK).toString('base64') });
  {
    const fd = openSync(image, 'r+');
    writeSync(fd, randomBytes(4096), 0, 4096, 7 * BLOCK);
    closeSync(fd);
  }
  await emulator('/_emulator/stats/reset', {});

  // The pull crosses the replication WAN: config.yaml's cap applies to it (announced), as to a sync.
  writeFileSync(join(onprem, 'config.yaml'), 'appliance: { name: onprem }\nreplication: { peer: cloud, bwlimit: 1GiB }\n');
  // The server keeps working in EC2 while the failback starts: it writes (into the two blocks
  // already changed) until its instance is stopped. --terminate stops it before the snapshot, so
  // every one of those writes comes home; none is lost with the terminated instance.
  const failback = cliJson(['--home', onprem, 'failback', VOL, '--peer', 'cloud', '--terminate']);
  let writes = 0;
  for (const deadline = Date.now() + 120_000; Date.now() < deadline; writes++) {
    const w = await fetch(`${aws.url}/_emulator/volumes/${ec2Volume}/write`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ offset: (writes % 2 === 0 ? 2 * BLOCK : 12 * BLOCK) + (writes % 100) * 4096, dataBase64: randomBytes(4096).toString('base64') }),
    });
    if (w.status === 409) break; // the instance is stopping: its workload writes no more
    assert.ok(w.ok, await w.text());
    await new Promise((r) => setTimeout(r, 10));
  }
  const run = await failback;
  assert.ok(writes > 0, 'the server wrote while the failback ran');
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stderr, /failback: i-\S+ is stopped/);
  assert.match(run.stderr, /failback: block traffic capped at 1\.0 GiB\/s now by config\.yaml replication\.bwlimit/);
  const fb = run.json;
  const stats = await emulator('/_emulator/stats');
  const gets = stats.GetSnapshotBlock ?? stats.operations?.GetSnapshotBlock ?? 0;
  assert.equal(gets, 2, `only the 2 blocks changed in EC2 are read from EBS (stats ${JSON.stringify(stats)})`);
  assert.equal(fb.prepare.blocksFetched, 2);

  const home = readFileSync(image);
  const inCloud = await readEc2Volume(ec2Volume);
  assert.equal(sha(home), sha(inCloud.subarray(0, SIZE)), 'on-prem equals the EC2 volume after failback');

  // The EBS snapshot the failback took of the EC2 volume is imported and nothing builds on it:
  // deleted, not left billed.
  assert.deepEqual(fb.complete.ebsSnapshotsDeleted, [fb.prepare.ec2SnapshotId]);
  assert.deepEqual(fb.complete.ebsSnapshotsLeft, []);
  const snaps = (await emulator('/_emulator/state')).snapshots as Array<{ id: string }>;
  assert.ok(!snaps.some((x) => x.id === fb.prepare.ec2SnapshotId), 'gone from EBS');
  assert.ok(snaps.some((x) => x.id === fb.prepare.baseEbsSnapshotId), 'the failover point, an export, stays');

  // Back into normal replication: the next sync is incremental (nothing to send).
  const next = await ok(onprem, ['sync', VOL, '--peer', 'cloud']);
  assert.equal(next.blocksSent, 0);
});

test('failover without a plan or without an export fails clearly and launches nothing', async () => {
  const r = await cliJson(['--home', cloud, 'failover', 'no-such-volume'], { env: cloudEnv });
  assert.equal(r.code, 1);
  assert.equal(r.json.error.code, 'ERR_PLAN_INVALID');
  const r2 = await cliJson(['--home', cloud, 'drill', VOL, '--point', '2001-01-01T00:00:00Z'], { env: cloudEnv });
  assert.equal(r2.code, 1);
  assert.equal(r2.json.error.code, 'ERR_EBS_NOT_EXPORTED');
  const r3 = await cliJson(['--home', cloud, 'drill', VOL, '--keep', 'soon'], { env: cloudEnv });
  assert.equal(r3.code, 2);
});

test('failback after the server in EC2 wrote past the protected size: refused and nothing written without --force; with --force the image grows to the EC2 volume', async () => {
  await ok(cloud, ['ebs', 'export', VOL], cloudEnv);
  const fo = await ok(cloud, ['failover', VOL], cloudEnv);
  const ec2Volume: string = fo.servers[0].disks[0].ec2VolumeId;
  // EBS volumes come in whole GiB: the server grew its filesystem into the space past SIZE.
  const past = SIZE + 3 * BLOCK;
  const written = randomBytes(BLOCK);
  await emulator(`/_emulator/volumes/${ec2Volume}/write`, { offset: past, dataBase64: written.toString('base64') });
  const before = readFileSync(image);

  const refused = await cliJson(['--home', onprem, 'failback', VOL, '--peer', 'cloud', '--terminate']);
  assert.equal(refused.code, 1, refused.stderr);
  assert.equal(refused.json.error.code, 'ERR_VOLUME_SIZE_MISMATCH');
  assert.match(refused.json.error.message, /nothing was written.*--force/);
  assert.ok(sameBytes(image, before), 'the on-prem volume is untouched');
  const vols = await ok(onprem, ['volume', 'list']);
  assert.equal(vols.find((v: { name: string }) => v.name === VOL).materializing, undefined, 'and not marked materializing');

  const fb = await ok(onprem, ['failback', VOL, '--peer', 'cloud', '--terminate', '--force']);
  assert.equal(fb.sync.applied.verified, true);
  const st = statSync(image);
  assert.equal(st.size, 1024 * MiB, 'the image now has the EC2 volume size');
  const home = Buffer.alloc(past + BLOCK);
  const fd = openSync(image, 'r');
  assert.equal(readSync(fd, home, 0, home.length, 0), home.length);
  closeSync(fd);
  const inCloud = await emulator(`/_emulator/volumes/${ec2Volume}/read?offset=0&length=${past + BLOCK}`);
  assert.equal(sha(home), sha(Buffer.isBuffer(inCloud) ? inCloud : Buffer.from(inCloud.dataBase64 ?? inCloud.data, 'base64')));
  assert.ok(home.subarray(past).equals(written));
  assert.ok(st.blocks * 512 <= home.length, 'past that the grown image is a hole (reads as zeros), as the EC2 volume is');
  const next = await ok(onprem, ['sync', VOL, '--peer', 'cloud']);
  assert.equal(next.blocksSent, 0, 'replication resumes incrementally at the new size');
  // The cloud appliance's audit log shows the steps the on-prem appliance had it run.
  const audit = await ok(cloud, ['audit', '--since', '1h']);
  const steps = (audit.entries as Array<{ command: string[]; exitCode: number }>).filter((e) => e.command[0] === '(peer API)').map((e) => e.command.slice(1, 3).join(' '));
  assert.ok(steps.includes('failback prepare') && steps.includes('failback complete'), JSON.stringify(steps));
});

test('a failover given up with --end: pushes are refused until then and taken again after; --terminate stops its instance', async () => {
  await ok(cloud, ['ebs', 'export', VOL], cloudEnv);
  const fo = await ok(cloud, ['failover', VOL], cloudEnv);
  const instance: string = fo.servers[0].instanceId;
  {
    const fd = openSync(image, 'r+');
    writeSync(fd, randomBytes(4096), 0, 4096, 3 * BLOCK);
    closeSync(fd);
  }
  const refused = await cliJson(['--home', onprem, 'sync', VOL, '--peer', 'cloud']);
  assert.equal(refused.code, 1, refused.stderr);
  assert.equal(refused.json.error.code, 'ERR_VOLUME_FAILED_OVER');
  const instancesBefore = JSON.stringify((await emulator('/_emulator/state')).instances);
  assert.match(instancesBefore, new RegExp(fo.servers[0].instanceId));
  const second = await cliJson(['--home', cloud, 'failover', VOL], { env: cloudEnv });
  assert.equal(second.code, 1, second.stderr);
  assert.equal(second.json.error.code, 'ERR_VOLUME_FAILED_OVER', 'a server that runs in EC2 is not launched twice');
  assert.equal(JSON.stringify((await emulator('/_emulator/state')).instances), instancesBefore, 'nothing was launched');

  const during = await ok(cloud, ['status', VOL]);
  assert.equal(during.volumes[0].failedOver?.run, fo.id, 'the cloud status names the failover the volume runs in');
  assert.equal(during.volumes[0].failedOver?.instanceId, instance);

  const usage = await cliJson(['--home', cloud, 'failover', '--end'], { env: cloudEnv });
  assert.equal(usage.code, 2, usage.stderr);
  const ended = await ok(cloud, ['failover', VOL, '--end', '--terminate'], cloudEnv);
  assert.equal(ended.run, fo.id);
  assert.deepEqual(ended.volumes, [VOL]);
  assert.deepEqual(ended.terminated, [instance]);
  const state = await emulator('/_emulator/state');
  const inst = (state.instances ?? []).find((i: any) => (i.instanceId ?? i.InstanceId ?? i.id) === instance);
  assert.match(JSON.stringify(inst), /terminated|shutting-down/);
  assert.equal((await ok(cloud, ['status', VOL])).volumes[0].failedOver, null);
  const again = await cliJson(['--home', cloud, 'failover', VOL, '--end'], { env: cloudEnv });
  assert.equal(again.code, 1, again.stderr);
  assert.equal(again.json.error.code, 'ERR_NOTHING_TO_SYNC');

  const push = await ok(onprem, ['sync', VOL, '--peer', 'cloud']);
  assert.equal(push.upToDate, false, 'replication resumes with the block changed on-prem meanwhile');
  assert.ok(push.blocksSent <= 1, 'only that block travels (the refused push may have sent it early)');
  const latest = (await ok(cloud, ['snapshots', VOL])).at(-1);
  assert.equal(latest.root, push.root);
});

test('a failback prepared again (a rerun after a failed pull) reads from EBS only what changed in EC2 since the last prepare, not every block changed since the failover', async () => {
  await ok(onprem, ['sync', VOL, '--peer', 'cloud']);
  await ok(cloud, ['ebs', 'export', VOL], cloudEnv);
  const fo = await ok(cloud, ['failover', VOL], cloudEnv);
  const ec2Volume: string = fo.servers[0].disks[0].ec2VolumeId;
  const peers = await ok(onprem, ['peer', 'list']);
  const url = new URL(peers.peers.find((p: { name: string }) => p.name === 'cloud').url);
  const token = readFileSync(join(cloud, 'token'), 'utf8').trim();
  const prepare = () =>
    new Promise<any>((resolve, reject) => {
      const req = httpsRequest({ host: url.hostname, port: url.port, path: '/v1/recovery/failback/prepare', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.on('data', (d) => (text += d));
        res.on('end', () => (res.statusCode === 200 ? resolve(JSON.parse(text)) : reject(new Error(`${res.statusCode} ${text}`))));
      });
      req.on('error', reject);
      req.end(JSON.stringify({ volume: VOL }));
    });
  for (const b of [1, 5, 9, 13]) await emulator(`/_emulator/volumes/${ec2Volume}/write`, { offset: b * BLOCK, dataBase64: randomBytes(4096).toString('base64') });
  const first = await prepare();
  assert.equal(first.blocksFetched, 4);
  assert.equal(first.baseEbsSnapshotId, fo.points[0].ebsSnapshotId, 'the first builds on the failover point');
  await emulator(`/_emulator/volumes/${ec2Volume}/write`, { offset: 7 * BLOCK, dataBase64: randomBytes(4096).toString('base64') });
  const second = await prepare();
  assert.equal(second.baseEbsSnapshotId, first.ec2SnapshotId, 'the second on the first');
  assert.equal(second.blocksFetched, 1, 'only the block written since');
  await ok(cloud, ['restore', `${VOL}@${second.snapshot.id}`, '--to', join(work, 'second.img')]);
  // The volume's size (an earlier test grew it), compared block by block with the SHA-256 the
  // emulator keeps each block of the EC2 volume under (reading 1 GiB through HTTP took 25-70 s).
  const { blockSize, digests } = await emulator(`/_emulator/volumes/${ec2Volume}/digests`);
  const restored = openSync(join(work, 'second.img'), 'r');
  try {
    assert.equal(fstatSync(restored).size, digests.length * blockSize, 'the snapshot has the EC2 volume\'s size');
    const chunk = Buffer.alloc(blockSize);
    digests.forEach((digest: string, i: number) => {
      assert.equal(readSync(restored, chunk, 0, blockSize, i * blockSize), blockSize);
      assert.equal(createHash('sha256').update(chunk).digest('hex'), digest, `the snapshot is the EC2 volume, byte for byte (block ${i})`);
    });
  } finally {
    closeSync(restored);
  }
  await ok(cloud, ['failover', VOL, '--end', '--terminate'], cloudEnv);
});
