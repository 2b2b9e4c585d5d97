/**
 * `npm run demo`: a whole DR scenario on this machine, with no AWS and no Docker.
 *
 * An on-prem appliance and a cloud appliance run as real processes on loopback, the cloud one
 * talking to the AWS emulator (EBS direct API + EC2) in this process. The story:
 * replicate a volume, change it and replicate again, export to EBS, drill, heal bit rot in the
 * cloud store with the on-prem copy, fail over, change data "in EC2", fail back, and check that
 * the on-prem volume equals the one in the cloud.
 *
 * Every step goes through the `appliance` CLI exactly as an operator would type it, and is
 * checked; the demo exits non-zero at the first failed step, naming it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, openSync, writeSync, closeSync, readFileSync, appendFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';

/** The `appliance` command as operators run it (bin/appliance, package.json's "bin"). */
const CLI = resolve(__dirname, '../../../bin/appliance');
const MiB = 1024 * 1024;
const BLOCK = 512 * 1024;
/** Small enough to run in seconds, large enough that "only what changed travels" shows. */
const VOLUME_SIZE = 64 * MiB;
const VOLUME = 'web-root';

const t0 = performance.now();
const work = mkdtempSync(join(tmpdir(), 'tandem-demo-'));
const children: ChildProcess[] = [];
let stepNo = 0;
const STEPS = 11;

function say(s: string): void {
  process.stdout.write(s + '\n');
}
function step(title: string): void {
  stepNo++;
  say(`\n[${stepNo}/${STEPS}] ${title}`);
}
function detail(s: string): void {
  say(`      ${s}`);
}
function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

class DemoFailure extends Error {}

function check(ok: boolean, what: string): void {
  if (!ok) throw new DemoFailure(what);
}

const awsEnv = {
  AWS_REGION: 'us-east-1',
  AWS_ACCESS_KEY_ID: 'demo',
  AWS_SECRET_ACCESS_KEY: 'demo',
};

/** Run `appliance ARGS --json` for a home; returns the parsed document (throws on exit != 0). */
async function appliance(home: string, args: string[], env: Record<string, string> = {}, okCodes: readonly number[] = [0]): Promise<any> {
  const child = spawn(CLI, ['--home', home, '--json', ...args], {
    env: { ...process.env, ...env, CI: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const code: number = await new Promise((r) => child.on('close', (c) => r(c ?? 1)));
  appendFileSync(join(work, 'demo.log'), `$ appliance --home ${home} ${args.join(' ')}\n${out}${err}\n`);
  if (!okCodes.includes(code)) {
    throw new DemoFailure(`\`appliance ${args.join(' ')}\` exited ${code}:\n${(err || out).trim()}`);
  }
  return out.trim() ? JSON.parse(out) : {};
}

/** Start `appliance serve` and wait for the URL it prints. */
async function serve(home: string, env: Record<string, string> = {}): Promise<string> {
  const child = spawn(CLI, ['--home', home, 'serve', '--listen', '127.0.0.1:0'], {
    env: { ...process.env, ...env, CI: 'true' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  child.stderr.on('data', (d) => appendFileSync(join(work, 'demo.log'), `[serve ${home}] ${d}`));
  const lines = createInterface({ input: child.stdout });
  return new Promise((resolveUrl, reject) => {
    const timer = setTimeout(() => reject(new DemoFailure(`appliance serve (${home}) printed no URL within 20 s`)), 20_000);
    child.on('exit', (c) => reject(new DemoFailure(`appliance serve (${home}) exited ${c}; see ${join(work, 'demo.log')}`)));
    lines.on('line', (line) => {
      const m = /(https:\/\/[^\s]+)/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolveUrl(m[1]!);
      }
    });
  });
}

function fileHash(path: string, length: number): string {
  const data = readFileSync(path);
  return createHash('sha256').update(data.subarray(0, length)).digest('hex');
}

async function emulatorRead(url: string, volumeId: string, offset: number, length: number): Promise<Buffer> {
  const r = await fetch(`${url}/_emulator/volumes/${volumeId}/read?offset=${offset}&length=${length}`);
  check(r.ok, `emulator read of ${volumeId} answered ${r.status}`);
  const type = r.headers.get('content-type') ?? '';
  if (type.includes('json')) {
    const j = (await r.json()) as { dataBase64?: string; data?: string };
    return Buffer.from(j.dataBase64 ?? j.data ?? '', 'base64');
  }
  return Buffer.from(await r.arrayBuffer());
}

async function emulatorWrite(url: string, volumeId: string, offset: number, data: Buffer): Promise<void> {
  const r = await fetch(`${url}/_emulator/volumes/${volumeId}/write`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ offset, dataBase64: data.toString('base64') }),
  });
  check(r.ok, `emulator write to ${volumeId} answered ${r.status}: ${await r.text()}`);
}

async function main(): Promise<void> {
  say('Tandem demo: replicate, drill, fail over and fail back one server, on this machine.');
  say(`(work directory ${work}; every command's output is in demo.log there)`);

  step('An on-prem server disk: a 64 MiB image file');
  const image = join(work, 'web-root.img');
  {
    const fd = openSync(image, 'w');
    // 48 MiB of data, then 16 MiB never written (zeros): zero blocks are never stored or sent.
    for (let off = 0; off < 48 * MiB; off += 4 * MiB) writeSync(fd, randomBytes(4 * MiB), 0, 4 * MiB, off);
    closeSync(fd);
    const { truncateSync } = await import('node:fs');
    truncateSync(image, VOLUME_SIZE);
  }
  detail(`${image}: 48 MiB of data, 16 MiB of zeros`);

  step('The AWS emulator (EBS direct API + EC2) on loopback');
  const { startAwsEmulator } = await import('../../emulators/aws/index.js');
  const aws = await startAwsEmulator({ host: '127.0.0.1', port: 0 });
  closeEmulator = () => aws.close();
  const cloudEnv = { ...awsEnv, AWS_ENDPOINT_URL_EBS: aws.url, AWS_ENDPOINT_URL_EC2: aws.url };
  detail(`listening on ${aws.url}`);

  step('Two appliances: on-prem and cloud, paired over HTTPS with pinned certificates');
  const onprem = join(work, 'onprem');
  const cloud = join(work, 'cloud');
  const onInit = await appliance(onprem, ['init', '--name', 'onprem']);
  const clInit = await appliance(cloud, ['init', '--name', 'cloud']);
  writeFileSync(join(cloud, 'config.yaml'), `appliance:
  name: cloud
recovery:
  web:
    instanceType: t3.medium
    subnet: subnet-0a1b2c3d4e5f60001
    securityGroups: [sg-0a1b2c3d]
    privateIp: 10.0.1.20
    rootVolume: { volume: ${VOLUME}, device: /dev/xvda }
    tags: { Role: web }
    drill:
      subnet: subnet-0a1b2c3d4e5f60002
      securityGroups: [sg-0d1e2f3a]
`);
  await appliance(cloud, ['config', 'check']);
  // On-prem: a policy for the server's disk, replicated to the cloud appliance.
  writeFileSync(join(onprem, 'config.yaml'), `appliance:
  name: onprem
policies:
  web: { rpo: 15m, rto: 1h }
assign:
  - { match: "*", policy: web }
replication: { peer: cloud }
`);
  await appliance(onprem, ['config', 'check']);
  const onUrl = await serve(onprem);
  const clUrl = await serve(cloud, cloudEnv);
  await appliance(onprem, ['peer', 'add', 'cloud', '--url', clUrl, '--token', clInit.token, '--fingerprint', clInit.fingerprint]);
  await appliance(cloud, ['peer', 'add', 'onprem', '--url', onUrl, '--token', onInit.token, '--fingerprint', onInit.fingerprint]);
  await appliance(onprem, ['volume', 'add', VOLUME, '--path', image]);
  detail(`onprem ${onUrl}  ·  cloud ${clUrl}  ·  volume ${VOLUME} added`);

  step('Replicate: first sync sends every non-zero block once');
  let t = performance.now();
  const s1 = await appliance(onprem, ['sync', VOLUME, '--peer', 'cloud']);
  detail(`${s1.blocksSent} blocks, ${(s1.bytesSent / MiB).toFixed(1)} MiB on the wire in ${seconds(performance.now() - t)}`);
  check(s1.blocksSent === 96, `the first sync should send the 96 non-zero blocks, sent ${s1.blocksSent}`);

  step('Change 1 % of the disk on-prem and replicate again: only the changed blocks travel');
  {
    const fd = openSync(image, 'r+');
    for (const block of [3, 40, 77]) writeSync(fd, randomBytes(4096), 0, 4096, block * BLOCK + 1234);
    closeSync(fd);
  }
  t = performance.now();
  const s2 = await appliance(onprem, ['sync', VOLUME, '--peer', 'cloud']);
  detail(`${s2.blocksSent} blocks sent (3 changed) in ${seconds(performance.now() - t)}`);
  check(s2.blocksSent === 3, `the incremental sync should send 3 blocks, sent ${s2.blocksSent}`);
  const prodHash = fileHash(image, VOLUME_SIZE);

  step('Cloud: export the replica as an incremental EBS snapshot');
  t = performance.now();
  const ex = await appliance(cloud, ['ebs', 'export', VOLUME], cloudEnv);
  detail(`${ex.ebsSnapshotId}: ${ex.blocksUploaded} blocks uploaded in ${seconds(performance.now() - t)}`);

  step('Drill: launch a copy in the isolated subnet, check it, tear it down');
  t = performance.now();
  const drill = await appliance(cloud, ['drill', VOLUME], cloudEnv);
  for (const c of drill.checks) detail(`check ${c.ok ? 'ok' : 'FAILED'}: ${c.name} (${c.detail})`);
  detail(`drill ${drill.id}: RTO ${drill.rtoSeconds} s, torn down ${drill.tornDown ? 'yes' : 'no'}`);
  check(drill.status === 'torn-down', `the drill should end torn down, is ${drill.status}`);
  check(fileHash(image, VOLUME_SIZE) === prodHash, 'the drill changed the production volume');
  const s3 = await appliance(onprem, ['sync', VOLUME, '--peer', 'cloud']);
  check(s3.blocksSent === 0, `replication after the drill should find nothing to send, sent ${s3.blocksSent}`);
  detail('production volume unchanged; replication after the drill: nothing to send');
  // The push learned the DR site's export, measured launch and drill: on-prem status estimates from them.
  const status = (await appliance(onprem, ['status', VOLUME])).volumes[0];
  check(status.lastDrill?.id === drill.id && status.lastExport?.ebsSnapshotId === ex.ebsSnapshotId, `on-prem status should show the cloud's drill and export: ${JSON.stringify(status)}`);
  detail(`on-prem status: RPO ${status.rpoState}, RTO ${status.rtoState}: estimate ${seconds(status.rtoEstimateMs)} (${status.rtoBasis})`);

  step('Bit rot in the cloud store: verify finds it, on-prem heals it with its copy');
  {
    // One byte flipped in the record of block 20 in the cloud appliance's packs.
    const block = readFileSync(image).subarray(20 * BLOCK, 21 * BLOCK);
    const packs = join(cloud, 'store', 'packs');
    const name = readdirSync(packs).find((n) => readFileSync(join(packs, n)).includes(block));
    check(name !== undefined, 'block 20 should be in the cloud store');
    const at = readFileSync(join(packs, name!)).indexOf(block) + 4321;
    const fd = openSync(join(packs, name!), 'r+');
    writeSync(fd, Buffer.from([block[4321]! ^ 0x40]), 0, 1, at);
    closeSync(fd);
  }
  const bad = await appliance(cloud, ['verify'], {}, [0, 1]);
  const damaged = new Set(bad.problems.map((p: { hash: string }) => p.hash));
  detail(`cloud verify: ${bad.problems.map((p: { code: string; blockIndex: number; snapshot: string }) => `${p.code} at block ${p.blockIndex} of snapshot ${p.snapshot}`).join(', ')}`);
  check(damaged.size === 1 && bad.problems.every((p: { blockIndex: number }) => p.blockIndex === 20), `the cloud verify should find block 20 damaged, found ${JSON.stringify(bad.problems)}`);
  const healed = await appliance(onprem, ['repair', '--peer', 'cloud', '--push']);
  const again = await appliance(cloud, ['verify']);
  detail(`on-prem sent ${healed.blocksSent} good copy; cloud verify again: ${again.problems.length} problems`);
  check(healed.blocksRepaired === 1 && again.ok === true, 'the cloud store should be whole after the repair');

  step('Disaster: fail over to EC2');
  t = performance.now();
  const fo = await appliance(cloud, ['failover', VOLUME], cloudEnv);
  const server = fo.servers[0];
  detail(`${server.instanceId} ${server.state} at ${server.privateIp} in ${server.subnetId}; measured RTO ${fo.rtoSeconds} s`);
  check(server.state === 'running', `the failover instance should be running, is ${server.state}`);
  const ec2Volume: string = server.disks[0].ec2VolumeId;

  step('The server runs in EC2 for a while; the on-prem site comes back with a stale disk');
  const changes = [5, 41, 100];
  for (const block of changes) await emulatorWrite(aws.url, ec2Volume, block * BLOCK + 77, randomBytes(8192));
  detail(`wrote to blocks ${changes.join(', ')} of ${ec2Volume}`);
  {
    // A last write on-prem that never reached the cloud before the site went down.
    const fd = openSync(image, 'r+');
    writeSync(fd, randomBytes(4096), 0, 4096, 60 * BLOCK + 512);
    closeSync(fd);
  }
  const stale = await appliance(onprem, ['sync', VOLUME, '--peer', 'cloud'], {}, [1]);
  detail(`on-prem replication is refused while the server runs in EC2: ${stale.error?.code}`);
  check(stale.error?.code === 'ERR_VOLUME_FAILED_OVER', `a push during the failover should be refused, got ${JSON.stringify(stale)}`);

  step('Fail back: bring only the changes home, verify, resume replication');
  t = performance.now();
  const fb = await appliance(onprem, ['failback', VOLUME, '--peer', 'cloud', '--terminate']);
  detail(`EC2 snapshot ${fb.prepare.ec2SnapshotId}: ${fb.prepare.blocksFetched} changed blocks read from EBS`);
  detail(`pulled ${fb.sync.blocksSent} blocks, wrote ${fb.sync.applied?.blocksWritten ?? '?'} blocks on-prem in ${seconds(performance.now() - t)}`);
  detail(`what on-prem held before (its late write too) is kept as snapshot ${fb.sync.applied?.keptAs}`);
  check(fb.prepare.blocksFetched === changes.length, `failback should read ${changes.length} changed blocks from EBS, read ${fb.prepare.blocksFetched}`);
  check(fb.sync.applied?.blocksWritten === changes.length + 1, `failback should write the ${changes.length} blocks changed in EC2 and the one changed on-prem, wrote ${fb.sync.applied?.blocksWritten}`);
  check(typeof fb.sync.applied?.keptAs === 'string', 'failback should keep what it overwrote as a snapshot');
  const cloudCopy = await emulatorRead(aws.url, ec2Volume, 0, VOLUME_SIZE);
  const cloudHash = createHash('sha256').update(cloudCopy).digest('hex');
  const homeHash = fileHash(image, VOLUME_SIZE);
  detail(`on-prem ${homeHash.slice(0, 16)}…  cloud ${cloudHash.slice(0, 16)}…`);
  check(homeHash === cloudHash, 'the on-prem volume differs from the cloud volume after failback');
  const s4 = await appliance(onprem, ['sync', VOLUME, '--peer', 'cloud']);
  detail(`next replication: ${s4.blocksSent} blocks to send (incremental again)`);
  check(s4.blocksSent === 0, `replication right after failback should send nothing, sent ${s4.blocksSent}`);

  say(`\nDone in ${seconds(performance.now() - t0)}: the on-prem volume equals the cloud one.`);
}

/** Closes the AWS emulator (its server would keep the demo alive after a failed step). */
let closeEmulator: (() => Promise<void>) | null = null;

async function cleanup(): Promise<void> {
  await closeEmulator?.().catch(() => undefined);
  for (const c of children) c.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 300));
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  if (process.exitCode === 0 || process.exitCode === undefined) rmSync(work, { recursive: true, force: true });
}

void (async () => {
  try {
    await main();
    process.exitCode = 0;
  } catch (e) {
    process.exitCode = 1;
    say(`\nDEMO FAILED at step ${stepNo}: ${e instanceof DemoFailure ? e.message : (e as Error).stack}`);
    say(`(kept ${work} for inspection)`);
  } finally {
    await cleanup();
  }
})();
