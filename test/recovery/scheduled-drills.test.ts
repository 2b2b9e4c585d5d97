/**
 * Scheduled drills: the cloud appliance's daemon drills a recovery plan with `drill.every` when it
 * is due (here at once: never drilled, and exported), runs its check, tears it down, and POSTs
 * `drill_failed` to the alert webhook when the drill fails. A real daemon process, the AWS
 * emulator and a webhook receiver on loopback.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { rmSync, writeFileSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { cliJson, collect, spawnCli } from '../helpers/cli.js';
import { cloudConfig, startCloud, type CloudSetup } from './helpers.js';

const VOL = 'app-root';
let setup: CloudSetup;
let hook: Server;
let hookUrl: string;
const received: any[] = [];

before(async () => {
  setup = await startCloud('tandem-scheduled-drills-', 300);
  const image = join(setup.work, 'app-root.img');
  writeRandom(image, 2 * 1024 * 1024);
  for (const args of [['volume', 'add', VOL, '--path', image], ['snapshot', VOL], ['ebs', 'export', VOL]]) {
    const r = await cliJson(['--home', setup.home, ...args], { env: setup.env });
    assert.equal(r.code, 0, r.stderr);
  }
  hook = createServer((req, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      received.push(JSON.parse(body));
      res.end('ok');
    });
  });
  await new Promise<void>((r) => hook.listen(0, '127.0.0.1', () => r()));
  hookUrl = `http://127.0.0.1:${(hook.address() as AddressInfo).port}/tandem`;
});

after(async () => {
  hook?.close();
  await setup?.aws.close();
  rmSync(setup.work, { recursive: true, force: true });
});

function config(check: string, every = '1d'): void {
  writeFileSync(join(setup.home, 'config.yaml'), cloudConfig(VOL).replace(
    'drill: { subnet: subnet-0a1b2c3d4e5f60002, securityGroups: [sg-0d1e2f3a] }',
    `drill:\n      subnet: subnet-0a1b2c3d4e5f60002\n      securityGroups: [sg-0d1e2f3a]\n      every: ${every}\n      check: ${check}`,
  ) + `alerts:\n  webhook: ${hookUrl}\n`);
}

async function drillReports(): Promise<Array<{ id: string; passed: boolean; plans?: string[]; tornDown: string | null }>> {
  const { Home } = await import('../../appliance/home.js');
  const store = await Home.load(setup.home).openStore();
  try {
    return (await store.listMeta<any>('drills')).map(([, r]) => r);
  } finally {
    await store.close();
  }
}

/** Run the daemon until `done(log)` holds (bounded), then stop it with SIGTERM; returns its log. */
async function daemonUntil(done: (log: string) => boolean): Promise<string> {
  const d = spawnCli(['--home', setup.home, 'daemon', '--listen', '127.0.0.1:0'], { env: setup.env });
  const ended = collect(d);
  let log = '';
  d.stderr!.on('data', (c) => (log += c));
  const deadline = Date.now() + 60_000;
  try {
    while (!done(log)) {
      assert.ok(Date.now() < deadline && d.exitCode === null, `not done in time: ${log}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  } finally {
    d.kill('SIGTERM');
    await ended;
  }
  return log;
}

async function liveDrillInstances(): Promise<number> {
  const state = await (await fetch(`${setup.aws.url}/_emulator/state`)).json() as { instances: Array<{ state: string; tags: Array<{ Key: string; Value: string }> }> };
  return state.instances.filter((i) => i.tags.some((t) => t.Key === 'tandem:mode' && t.Value === 'drill') && i.state !== 'terminated' && i.state !== 'shutting-down').length;
}

test('a plan due for its drill is drilled by the daemon: launched, checked, torn down; not again before it is due', async () => {
  config('{ command: "test -n \\"$TANDEM_INSTANCE_ID\\"", interval: 1s }');
  const log = await daemonUntil((l) => l.includes('scheduled drill passed and was torn down'));
  assert.match(log, /scheduled drill started/);
  const reports = await drillReports();
  assert.equal(reports.length, 1, 'one drill');
  assert.equal(reports[0]!.passed, true);
  assert.deepEqual(reports[0]!.plans, ['app']);
  assert.ok(reports[0]!.tornDown);
  assert.equal(await liveDrillInstances(), 0);
  const status = await cliJson(['--home', setup.home, 'status', VOL], { env: setup.env });
  assert.equal(status.json.volumes[0].lastDrill.passed, true, 'status shows the drill');

  // Drilled less than a day ago: a restarted daemon does not drill it again.
  const again = await daemonUntil((l) => l.includes('daemon started'));
  await new Promise((r) => setTimeout(r, 1500));
  assert.doesNotMatch(again, /scheduled drill started/);
  assert.equal((await drillReports()).length, 1);
});

test('a scheduled drill that fails its check alerts the webhook with the failing check, and is torn down', async () => {
  // Due again at once: its last drill is more than a second old.
  config('{ command: "echo the app did not answer; exit 3", timeout: 2s, interval: 1s }', '1s');
  received.length = 0;
  const log = await daemonUntil(() => received.some((a) => a.event === 'drill_failed'));
  assert.match(log, /scheduled drill failed/);
  const alert = received.find((a) => a.event === 'drill_failed');
  assert.equal(alert.plan, 'app');
  assert.equal(alert.appliance, 'cloud');
  assert.match(alert.run, /^drill-/);
  const check = alert.checks.find((c: { name: string }) => c.name === 'app check');
  assert.equal(check.ok, false);
  assert.match(check.detail, /exited 3: the app did not answer/);
  assert.equal(await liveDrillInstances(), 0, 'torn down');
  const doctor = await cliJson(['--home', setup.home, 'doctor'], { env: setup.env });
  const warn = doctor.json.checks.find((c: { check: string }) => c.check === 'drill of app');
  assert.equal(warn?.status, 'warn', JSON.stringify(doctor.json.checks));
  assert.match(warn.detail, /failed: app check: .*exited 3/);
});
