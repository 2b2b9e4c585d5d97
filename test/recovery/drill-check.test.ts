/**
 * A drill's own check of the recovered server (config `recovery.PLAN.drill.check`): a command run
 * on the cloud appliance once the instance runs, retried until it passes or its timeout; the drill
 * passes only if it does. Here the check reads the drill instance's root volume through the EC2
 * emulator and looks for what the on-prem server wrote before the snapshot, as an operator's
 * check would open a database or ask a health URL.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cliJson, collect, spawnCli } from '../helpers/cli.js';
import { cloudConfig, startCloud, type CloudSetup } from './helpers.js';

const MiB = 1024 * 1024;
const VOL = 'app-root';
const MARKER = 'TANDEM-DRILL-OK!';

let setup: CloudSetup;
let checker: string;

before(async () => {
  setup = await startCloud('tandem-drill-check-', 300);
  const image = join(setup.work, 'app-root.img');
  writeFileSync(image, Buffer.concat([Buffer.from(MARKER), randomBytes(4 * MiB - MARKER.length)]));
  // The check: the first bytes of the drill instance's root disk, read through the emulator.
  checker = join(setup.work, 'check.cjs');
  writeFileSync(checker, `
const root = process.env.TANDEM_EC2_VOLUMES.split(' ')[0].split('=')[1];
fetch(process.env.AWS_ENDPOINT_URL_EC2 + '/_emulator/volumes/' + root + '/read?offset=0&length=${MARKER.length}')
  .then((r) => r.json())
  .then((j) => {
    const got = Buffer.from(j.dataBase64, 'base64').toString();
    console.log(process.env.TANDEM_PLAN + ' ' + process.env.TANDEM_INSTANCE_ID + ' ' + process.env.TANDEM_PRIVATE_IP + ' reads ' + got);
    process.exit(got === process.argv[2] ? 0 : 1);
  });
`);
  for (const args of [['volume', 'add', VOL, '--path', image], ['snapshot', VOL], ['ebs', 'export', VOL]]) {
    const r = await cliJson(['--home', setup.home, ...args], { env: setup.env });
    assert.equal(r.code, 0, r.stderr);
  }
});

after(async () => {
  await setup?.aws.close();
  rmSync(setup.work, { recursive: true, force: true });
});

function withCheck(check: string): void {
  writeFileSync(join(setup.home, 'config.yaml'), cloudConfig(VOL).replace(
    'drill: { subnet: subnet-0a1b2c3d4e5f60002, securityGroups: [sg-0d1e2f3a] }',
    `drill:\n      subnet: subnet-0a1b2c3d4e5f60002\n      securityGroups: [sg-0d1e2f3a]\n      check:\n${check}`,
  ));
}

async function drill(): Promise<{ code: number | null; json: any; stderr: string }> {
  return cliJson(['--home', setup.home, 'drill', VOL], { env: setup.env });
}

test('the check finds on the drill instance what the server wrote: the drill passes, and says so', async () => {
  withCheck(`        command: node ${checker} ${MARKER}\n        timeout: 30s\n        interval: 1s\n`);
  const r = await drill();
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.status, 'torn-down');
  const c = r.json.checks.find((x: { name: string }) => x.name === 'app check');
  assert.ok(c?.ok, JSON.stringify(r.json.checks));
  assert.match(c.detail, new RegExp(`passed on attempt 1 after [0-9.]+ s: app i-[0-9a-f]+ 10\\.0\\.2\\.\\d+ reads ${MARKER}`));
});

test('a check that passes once the server has booted: tried again every interval', async () => {
  const booted = join(setup.work, 'booted');
  rmSync(booted, { force: true });
  withCheck(`        command: "test -e ${booted} || { touch ${booted}; echo still booting; exit 1; }"\n        timeout: 30s\n        interval: 1s\n`);
  const r = await drill();
  assert.equal(r.code, 0, r.stderr);
  const c = r.json.checks.find((x: { name: string }) => x.name === 'app check');
  assert.match(c.detail, /passed on attempt 2/);
  assert.match(r.stderr, /app check: attempt 1 exited 1: still booting; again in 1 s/);
});

test('a check that never passes fails the drill, which is still torn down', async () => {
  withCheck(`        command: node ${checker} SOMETHING-ELSE\n        timeout: 3s\n        interval: 1s\n`);
  const r = await drill();
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json.error.code, 'ERR_DRILL_FAILED');
  assert.match(r.json.error.message, /failed its checks: app check/);
  const report = r.json.error.details.report;
  const c = report.checks.find((x: { name: string }) => x.name === 'app check');
  assert.match(c.detail, /did not pass in \d+ attempt\(s\) over [0-9.]+ s \(timeout 3s\); the last exited 1: app i-[0-9a-f]+ \S+ reads TANDEM-DRILL-OK!/);
  assert.ok(report.tornDown, 'torn down');
  const state = await (await fetch(`${setup.aws.url}/_emulator/state`)).json() as { instances: Array<{ state: string; tags: Array<{ Key: string; Value: string }> }> };
  assert.ok(state.instances.filter((i) => i.tags.some((t) => t.Key === 'tandem:mode' && t.Value === 'drill')).every((i) => i.state === 'terminated' || i.state === 'shutting-down'));
  const status = await cliJson(['--home', setup.home, 'status', VOL], { env: setup.env });
  assert.equal(status.json.volumes[0].lastDrill.passed, false, 'status shows the failed drill');
});

test('config check names a check timeout that is not a duration', async () => {
  withCheck(`        command: "true"\n        timeout: soon\n`);
  const r = await cliJson(['--home', setup.home, 'config', 'check'], { env: setup.env });
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.json.error.code, 'ERR_CONFIG_INVALID');
  assert.match(r.json.error.message, /config\.yaml:\d+: recovery\.app\.drill\.check\.timeout: "soon" is not a duration/);
  const d = await drill();
  assert.equal(d.json.error.code, 'ERR_CONFIG_INVALID', 'a drill is refused before it launches anything');
});

test('drill.keepMinutes in the plan keeps the instances up as --keep does (Ctrl-C ends it)', async () => {
  withCheck(`        command: "true"\n      keepMinutes: 5\n`);
  const child = spawnCli(['--home', setup.home, 'drill', VOL, '--json'], { env: setup.env });
  const done = collect(child);
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const deadline = Date.now() + 60_000;
  while (!err.includes('keeping the drill instances for 5 min')) {
    assert.ok(Date.now() < deadline && child.exitCode === null, `the drill did not keep its instances: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill('SIGINT');
  const r = await done;
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).status, 'torn-down');
});
