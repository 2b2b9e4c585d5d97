import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseConfig, loadConfig, policyFor, hooksForVolume, groupOf, globMatch, defaultParsed, keepDefaultConfig } from '../../appliance/config/index.js';
import { isTandemError, type TandemError } from '../../common/errors.js';
import { replicationRate, hasSchedule } from '../../appliance/config/bwlimit.js';
import { ROOT } from '../helpers/cli.js';

const GOOD = `# comment
appliance:
  name: onprem
policies:
  gold:
    rpo: 15m
    rto: 1h
    retention: { hourly: 24, daily: 7, weekly: 4 }
    export: ebs
  bronze:
    rpo: 1d
assign:
  - match: "db-*"
    policy: gold
  - tag: prod
    policy: gold
  - match: "*"
    policy: bronze
groups:
  erp:
    volumes: [db-root, db-data]
    hooks: { pre: "true", post: "true", timeout: 30s }
replication: { peer: cloud }
alerts: { webhook: "http://127.0.0.1:9/hook" }
recovery:
  erp:
    instanceType: m6i.large
    subnet: subnet-0abc
    securityGroups: [sg-0abc]
    rootVolume: { volume: db-root, device: /dev/sda1 }
`;

function invalid(text: string): TandemError {
  try {
    parseConfig(text, '/home/x/config.yaml');
  } catch (e) {
    assert.ok(isTandemError(e, 'ERR_CONFIG_INVALID'), String(e));
    return e;
  }
  assert.fail('expected ERR_CONFIG_INVALID');
}

test('a valid config normalizes durations, policies, groups and keeps recovery plans as written', () => {
  const c = parseConfig(GOOD, 'config.yaml');
  assert.equal(c.policies.gold!.rpoMs, 15 * 60_000);
  assert.equal(c.policies.gold!.rtoMs, 3_600_000);
  assert.deepEqual(c.policies.gold!.retention, { hourly: 24, daily: 7, weekly: 4 });
  assert.equal(c.policies.gold!.export, 'ebs');
  assert.equal(c.policies.bronze!.rtoMs, null);
  assert.equal(c.groups.erp!.hooks!.timeoutMs, 30_000);
  assert.equal(c.replication!.peer, 'cloud');
  assert.equal(c.recovery.erp!.instanceType, 'm6i.large');
  assert.equal(c.recovery.erp!.rootVolume.volume, 'db-root');
});

test('config errors name the file, line and key', () => {
  const e = invalid(GOOD.replace('rpo: 15m', 'rpo: 5x'));
  assert.match(e.message, /^config\.yaml:6: policies\.gold\.rpo: "5x" is not a duration \(write e\.g\. 15m, 1h\)/);
  assert.deepEqual([e.details.file, e.details.line, e.details.key], ['/home/x/config.yaml', 6, 'policies.gold.rpo']);

  const typo = invalid(GOOD.replace('    rto: 1h', '    rtoo: 1h'));
  assert.equal(typo.details.line, 7);
  assert.equal(typo.details.key, 'policies.gold.rtoo');
  assert.match(typo.message, /unknown key "rtoo"/);

  const badPlan = invalid(GOOD.replace('subnet: subnet-0abc', 'subnet: net-1'));
  assert.equal(badPlan.details.key, 'recovery.erp.subnet');
  assert.equal(badPlan.details.line, 28);

  const missing = invalid('appliance: {}\n');
  assert.equal(missing.details.key, 'appliance.name');
  assert.match(missing.message, /is required/);

  const syntax = invalid('appliance:\n  name: [x\n');
  assert.match(syntax.message, /^config\.yaml:\d+: YAML syntax/);
});

test('cross references are checked: unknown policy, volume in two groups, assign rule shape', () => {
  const e = invalid(GOOD.replace('policy: bronze', 'policy: silver'));
  assert.equal(e.details.key, 'assign.2.policy');
  assert.equal(e.details.line, 18);
  assert.match(e.message, /policy "silver" is not defined/);

  const two = invalid(GOOD.replace('replication:', '  other:\n    volumes: [db-data]\nreplication:'));
  assert.equal(two.details.key, 'groups.other.volumes.0');
  assert.match(two.message, /already in group "erp"/);

  const shape = invalid(GOOD.replace('  - tag: prod\n', '  - tag: prod\n    match: "x"\n'));
  assert.equal(shape.details.key, 'assign.1');
  assert.match(shape.message, /exactly one of `match`/);

  const hook = invalid(GOOD.replace('timeout: 30s', 'timeout: soon'));
  assert.equal(hook.details.key, 'groups.erp.hooks.timeout');
});

test('shutdown.grace: 30 s by default, a duration otherwise; anything else is refused with its key', () => {
  assert.equal(parseConfig(GOOD, 'config.yaml').shutdown.graceMs, 30_000);
  assert.equal(parseConfig(`${GOOD}shutdown: { grace: 1m30s }\n`, 'config.yaml').shutdown.graceMs, 90_000);
  const bad = invalid(`${GOOD}shutdown: { grace: soon }\n`);
  assert.equal(bad.details.key, 'shutdown.grace');
  assert.match(bad.message, /"soon" is not a duration/);
  assert.equal(invalid(`${GOOD}shutdown: { grace: 0s }\n`).details.key, 'shutdown.grace');
  assert.equal(invalid(`${GOOD}shutdown: { timeout: 10s }\n`).details.key, 'shutdown.timeout');
});

test('verify: defaults to a weekly scheduled verify at 100 MiB/s healing from the replication peer; every, off, bwlimit and repair are checked; so is replication.bwlimit', () => {
  // It heals from the replication peer unless told otherwise.
  assert.deepEqual(parseConfig(GOOD, 'config.yaml').verify, { everyMs: 7 * 86_400_000, bytesPerSecond: 100 * 1024 * 1024, repairPeer: 'cloud' });
  assert.deepEqual(parseConfig(`${GOOD}verify: { every: 1d, bwlimit: 20MiB, repair: onprem }\n`, 'config.yaml').verify, { everyMs: 86_400_000, bytesPerSecond: 20 * 1024 * 1024, repairPeer: 'onprem' });
  assert.equal(parseConfig(`${GOOD}verify: { every: "off", repair: "off" }\n`, 'config.yaml').verify.everyMs, null);
  assert.equal(parseConfig(`${GOOD}verify: { repair: "off" }\n`, 'config.yaml').verify.repairPeer, null);
  assert.equal(parseConfig('appliance: { name: a }\n', 'config.yaml').verify.repairPeer, null);
  const every = invalid(`${GOOD}verify: { every: sometimes }\n`);
  assert.equal(every.details.key, 'verify.every');
  assert.match(every.message, /"sometimes" is not a duration/);
  const rate = invalid(`${GOOD}verify: { bwlimit: fast }\n`);
  assert.equal(rate.details.key, 'verify.bwlimit');
  assert.match(rate.message, /"fast" is not a rate/);
  const zero = invalid(`${GOOD}verify: { bwlimit: 0 }\n`);
  assert.equal(zero.details.key, 'verify.bwlimit');
  const repl = invalid(GOOD.replace('replication: { peer: cloud }', 'replication: { peer: cloud, bwlimit: 10 Mbit }'));
  assert.equal(repl.details.key, 'replication.bwlimit');
  assert.equal(repl.details.line, 23);
});

test('every problem is reported in one pass, in line order', () => {
  const e = invalid(GOOD.replace('rpo: 15m', 'rpo: 15').replace('rpo: 1d', 'rpoo: 1d'));
  const problems = e.details.problems as Array<{ line: number; key: string }>;
  assert.ok(problems.length >= 2);
  assert.deepEqual(problems.map((p) => p.line), [...problems.map((p) => p.line)].sort((a, b) => a - b));
});

test('policyFor: explicit policy, then assign rules by glob or tag, in order', () => {
  const c = parseConfig(GOOD, 'config.yaml');
  const vol = (name: string, extra: { policy?: string; tags?: string[] } = {}) => ({ name, ...extra });
  assert.equal(policyFor(c, vol('db-root'))!.name, 'gold');
  assert.equal(policyFor(c, vol('web', { tags: ['prod'] }))!.name, 'gold');
  assert.equal(policyFor(c, vol('web'))!.name, 'bronze');
  assert.equal(policyFor(c, vol('db-x', { policy: 'bronze' }))!.name, 'bronze');
  assert.equal(policyFor(c, vol('db-x', { policy: 'nope' })), null);
  const none = parseConfig('appliance: { name: a }\n', 'config.yaml');
  assert.equal(policyFor(none, vol('db-root')), null);
  assert.equal(groupOf(c, 'db-data')!.name, 'erp');
  assert.equal(hooksForVolume(c, 'db-data')!.pre, 'true');
  assert.equal(hooksForVolume(c, 'web'), null);
  assert.ok(globMatch('db-?', 'db-1') && !globMatch('db-?', 'db-12') && globMatch('a.b*', 'a.bc') && !globMatch('a.b', 'axb'));
});

test('loadConfig reads HOME/config.yaml; the default config written by init validates', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-cfg-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const { Home } = await import('../../appliance/home.js');
  const home = await Home.init(join(dir, 'h'), 'onprem');
  const c = await loadConfig(home);
  assert.equal(c.appliance.name, 'onprem');
  writeFileSync(home.paths.config, GOOD);
  assert.equal((await loadConfig(home.dir)).policies.gold!.rpoMs, 900_000);
  await assert.rejects(loadConfig(join(dir, 'absent')), (e: unknown) => isTandemError(e, 'ERR_CONFIG_INVALID'));
});

test('a validated config is kept parsed in HOME/run/config.json: a command with config.yaml unchanged loads no parser; an edit, an invalid edit or a damaged copy is parsed anew', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-cfg-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const { Home } = await import('../../appliance/home.js');
  const home = await Home.init(join(dir, 'h'), 'onprem');
  writeFileSync(home.paths.config, GOOD);
  const kept = join(home.paths.run, 'config.json');
  const first = await loadConfig(home);
  assert.ok(existsSync(kept), 'kept after the first load');
  assert.deepEqual(await loadConfig(home), first, 'the kept copy reads back equal');
  // A new process (the CLI's case): the kept copy is used and neither YAML nor TypeBox is loaded.
  const probe = `const { loadConfig } = require(${JSON.stringify(join(ROOT, 'dist/appliance/config/index.js'))});
    loadConfig(process.argv[1]).then((c) => console.log(JSON.stringify({ rpo: c.policies.gold?.rpoMs ?? null, parsers: Object.keys(require.cache).filter((k) => /node_modules[/](yaml|@sinclair)[/]/.test(k)).length })));`;
  const run = () => JSON.parse(execFileSync(process.execPath, ['-e', probe, home.dir], { encoding: 'utf8' })) as { rpo: number | null; parsers: number };
  const distKept = run(); // the build's parser has its own fingerprint: parsed once more, then kept
  assert.equal(distKept.rpo, 900_000);
  assert.deepEqual(run(), { rpo: 900_000, parsers: 0 });
  // An edit is seen at once.
  writeFileSync(home.paths.config, GOOD.replace('rpo: 15m', 'rpo: 5m'));
  assert.equal((await loadConfig(home)).policies.gold!.rpoMs, 300_000);
  const edited = run();
  assert.equal(edited.rpo, 300_000);
  assert.ok(edited.parsers > 0, 'the edit was parsed');
  // An invalid edit is refused, never answered from the kept copy.
  writeFileSync(home.paths.config, GOOD.replace('rpo: 15m', 'rpo: soon'));
  await assert.rejects(loadConfig(home), (e: unknown) => isTandemError(e, 'ERR_CONFIG_INVALID'));
  // A damaged copy is parsed over.
  writeFileSync(home.paths.config, GOOD);
  writeFileSync(kept, '{"key": "trunc');
  assert.equal((await loadConfig(home)).policies.gold!.rpoMs, 900_000);
  assert.equal(JSON.parse(readFileSync(kept, 'utf8')).config.policies.gold.rpoMs, 900_000);
});

test("init keeps the default config.yaml's Config, made without the parser: it equals the parser's, and a new home's first command loads no parser", async (t) => {
  const { defaultConfig } = await import('../../appliance/home.js');
  for (const name of ['onprem', 'vm', 'cloud-2', 'a.b_c', 'Site1']) {
    assert.deepEqual(defaultParsed(name, '/h/config.yaml'), parseConfig(defaultConfig(name), '/h/config.yaml'), name);
  }
  const dir = mkdtempSync(join(tmpdir(), 'tandem-cfg-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  // A name YAML reads as another value is not kept: its file is parsed (and refused) as written.
  keepDefaultConfig(join(dir, 'n'), defaultConfig('123'), '123');
  assert.ok(!existsSync(join(dir, 'n', 'run', 'config.json')));
  // The CLI's init and a later process of the same build: the kept copy's key matches.
  const home = join(dir, 'h');
  execFileSync(join(ROOT, 'bin', 'appliance'), ['--home', home, 'init', '--name', 'fresh'], { stdio: 'ignore' });
  const probe = `const { loadConfig } = require(${JSON.stringify(join(ROOT, 'dist/appliance/config/index.js'))});
    loadConfig(process.argv[1]).then((c) => console.log(JSON.stringify({ name: c.appliance.name, parsers: Object.keys(require.cache).filter((k) => /node_modules[/](yaml|@sinclair)[/]/.test(k)).length })));`;
  assert.deepEqual(JSON.parse(execFileSync(process.execPath, ['-e', probe, home], { encoding: 'utf8' })), { name: 'fresh', parsers: 0 });
});

test('replication.schedule: the first window holding the local time gives the cap, windows run past midnight, 0 lifts the cap; bad days, times and rates are named', () => {
  const cfg = parseConfig(GOOD.replace('replication: { peer: cloud }', `replication:
  peer: cloud
  bwlimit: 100MiB
  schedule:
    - { days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00", bwlimit: 10MiB }
    - { days: [Sat], bwlimit: 0 }
    - { days: [sun], from: "22:00", to: "06:00", bwlimit: 1MiB }`), 'config.yaml');
  const at = (iso: string) => replicationRate(cfg.replication, new Date(iso)); // local time: no Z
  const MiB = 1024 * 1024;
  assert.equal(at('2026-12-07T08:00:00'), 10 * MiB, 'Monday 08:00: business hours');
  assert.equal(at('2026-12-07T17:59:00'), 10 * MiB);
  assert.equal(at('2026-12-07T18:00:00'), 100 * MiB, 'Monday 18:00: the default');
  assert.equal(at('2026-12-07T07:59:00'), 100 * MiB);
  assert.equal(at('2026-12-05T12:00:00'), 0, 'Saturday: no cap');
  assert.equal(at('2026-12-06T23:00:00'), 1 * MiB, 'Sunday evening');
  assert.equal(at('2026-12-07T05:59:00'), 1 * MiB, 'the Monday morning after it');
  assert.equal(at('2026-12-07T06:00:00'), 100 * MiB);
  assert.equal(at('2026-12-08T05:00:00'), 100 * MiB, 'Tuesday morning: Monday is not one of its days');
  assert.equal(hasSchedule(cfg.replication), true);
  assert.equal(replicationRate(parseConfig(GOOD, 'config.yaml').replication, new Date()), 0, 'no bwlimit: no cap');

  const bad = (w: string) => invalid(GOOD.replace('replication: { peer: cloud }', `replication:\n  peer: cloud\n  schedule:\n    - ${w}`));
  const day = bad('{ days: [monday], bwlimit: 1MiB }');
  assert.equal(day.details.key, 'replication.schedule.0.days');
  assert.match(day.message, /"monday" is not a day/);
  const time = bad('{ from: "8am", to: "18:00", bwlimit: 1MiB }');
  assert.equal(time.details.key, 'replication.schedule.0.from');
  assert.match(time.message, /"8am" is not a time of day/);
  assert.equal(bad('{ from: "25:00", bwlimit: 1MiB }').details.key, 'replication.schedule.0.from');
  assert.equal(bad('{ from: "08:00", to: "08:00", bwlimit: 1MiB }').details.key, 'replication.schedule.0.to');
  const rate = bad('{ bwlimit: fast }');
  assert.equal(rate.details.key, 'replication.schedule.0.bwlimit');
  assert.match(rate.message, /"fast" is not a rate/);
  assert.equal(bad('{ from: "08:00" }').details.key, 'replication.schedule.0.bwlimit');
});
