/** The workflow commands as an operator runs them (compiled CLI, `npm run build` first). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync, mkdirSync, renameSync, statSync, readdirSync } from 'node:fs';
import { sameBytes } from '../helpers/files.js';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { initHome, cli, tempDir, pairedWithVolume } from '../helpers/appliance.js';
import { cli as cliText } from '../helpers/cli.js';
import { userInfo } from 'node:os';

const MiB = 1024 * 1024;

test('config check, status, retention, discover --write and cost from the command line', async (t) => {
  const work = tempDir(t, 'tandem-wf-cli-');
  const a = await initHome(t, 'onprem');
  const cfg = join(a.dir, 'config.yaml');

  // A bad config: exit 1, file:line: key, and nothing else runs on it.
  const good = readFileSync(cfg, 'utf8');
  writeFileSync(cfg, `${good}policies:\n  gold:\n    rpo: soon\n`);
  const bad = await cli(a, 'config', 'check');
  assert.equal(bad.code, 1);
  assert.equal(bad.json.error.code, 'ERR_CONFIG_INVALID');
  assert.deepEqual([bad.json.error.details.line, bad.json.error.details.key], [good.split('\n').length + 2, 'policies.gold.rpo']);
  assert.match(bad.stderr, /config\.yaml:\d+: policies\.gold\.rpo: "soon" is not a duration/);
  assert.equal((await cli(a, 'status')).code, 1, 'status refuses an invalid config');

  const images = join(work, 'images');
  mkdirSync(images);
  writeFileSync(join(images, 'app.img'), randomBytes(2 * MiB));
  writeFileSync(cfg, `${good}discovery:\n  paths: [${images}]\n  lvm: false\n  libvirt: false\n`);
  const checked = await cli(a, 'config', 'check');
  assert.equal(checked.code, 0, checked.stderr);
  assert.equal(checked.json.valid, true);

  // discover --write: the image is proposed, a starter policy and an assign rule are added.
  const disc = await cli(a, 'discover', '--write');
  assert.equal(disc.code, 0, disc.stderr);
  const app = disc.json.assets.find((x: { path: string }) => x.path === join(images, 'app.img'));
  assert.equal(app.name, 'app');
  assert.equal(app.nonZeroEstimate, 2 * MiB);
  assert.equal(app.proposedPolicy, 'standard');
  assert.ok(disc.json.written.commands.includes(`appliance volume add app --path ${join(images, 'app.img')}`));
  assert.equal((await cli(a, 'config', 'check')).code, 0);
  assert.deepEqual(disc.json.unsearched, []);

  // A discovery path that is missing or not a directory is named by discover and doctor (it
  // would otherwise look like a directory with no images in it), and the others still searched.
  const withImages = readFileSync(cfg, 'utf8');
  const searched = `paths: [${images}, ${join(work, 'typo')}, ${join(images, 'app.img')}]`;
  writeFileSync(cfg, withImages.replace(/paths:.*\n(\s+- .*\n)*/, `${searched}\n`));
  assert.match(readFileSync(cfg, 'utf8'), new RegExp(searched.replace(/[[\]]/g, '\\$&')));
  const unsearched = await cli(a, 'discover');
  assert.equal(unsearched.code, 0, unsearched.stderr);
  assert.ok(unsearched.json.assets.some((x: { path: string }) => x.path === join(images, 'app.img')));
  assert.deepEqual(unsearched.json.unsearched, [{ path: join(work, 'typo'), problem: 'does not exist' }, { path: join(images, 'app.img'), problem: 'is not a directory' }]);
  assert.match((await cliText(['--home', a.dir, 'discover'])).stdout, new RegExp(`not searched: discovery.paths entry ${join(work, 'typo')} does not exist \\(fix the path in config.yaml\\)`));
  const doc = await cli(a, 'doctor');
  const typo = doc.json.checks.find((c: { check: string }) => c.check === `discovery path ${join(work, 'typo')}`);
  assert.equal(typo?.status, 'warn', JSON.stringify(doc.json.checks));
  assert.match(typo.fix, /discovery\.paths in config\.yaml/);
  assert.ok(!doc.json.checks.some((c: { check: string }) => c.check === `discovery path ${images}`), 'a good path is not listed');
  writeFileSync(cfg, withImages);

  assert.equal((await cli(a, 'volume', 'add', 'app', '--path', join(images, 'app.img'))).code, 0);
  let st = await cli(a, 'status');
  assert.equal(st.code, 0, st.stderr);
  assert.equal(st.json.volumes[0].policy, 'standard');
  assert.equal(st.json.volumes[0].rpoState, 'BREACHED', 'protected, never snapshotted');
  for (let i = 0; i < 3; i++) assert.equal((await cli(a, 'snapshot', 'app')).code, 0);
  st = await cli(a, 'status', 'app');
  assert.equal(st.json.volumes[0].rpoState, 'OK');
  assert.equal((await cli(a, 'status', 'nope')).json.error.code, 'ERR_VOLUME_NOT_FOUND');

  // retention: hourly 24 keeps one per hour: the 3 snapshots of this minute collapse to the newest.
  const dry = await cli(a, 'retention', '--dry-run');
  assert.equal(dry.code, 0, dry.stderr);
  assert.equal(dry.json.volumes[0].deleted.length, 2);
  const applied = await cli(a, 'retention', 'app');
  assert.deepEqual(applied.json.volumes[0].deleted, dry.json.volumes[0].deleted);

  const cost = await cli(a, 'cost');
  assert.equal(cost.code, 0, cost.stderr);
  assert.equal(cost.json.prices.region, 'us-east-1');
  assert.ok(cost.json.dr.monthly > 0);
  assert.ok(cost.json.dr.lines.every((l: { explain: string }) => l.explain.length > 0));
});

test('snapshots --hold keeps a snapshot from retention, --delete and volume remove until --release; --delete is all or none and spares the newest and bases unless --force', async (t) => {
  const work = tempDir(t, 'tandem-wf-holds-');
  const a = await initHome(t, 'onprem');
  const img = join(work, 'app.img');
  const contents: Buffer[] = [];
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    contents.push(randomBytes(MiB));
    writeFileSync(img, contents[i]!);
    if (i === 0) assert.equal((await cli(a, 'volume', 'add', 'app', '--path', img)).code, 0);
    const s = await cli(a, 'snapshot', 'app');
    assert.equal(s.code, 0, s.stderr);
    ids.push(s.json.snapshot.id);
  }
  const list = async () => (await cli(a, 'snapshots', 'app')).json.map((s: { id: string }) => s.id);

  const held = await cli(a, 'snapshots', 'app', '--hold', ids[0]!, '--reason', 'last clean point before the incident');
  assert.equal(held.code, 0, held.stderr);
  assert.equal(held.json.held.reason, 'last clean point before the incident');
  const listed = (await cli(a, 'snapshots', 'app')).json;
  assert.deepEqual(listed.map((s: { held: { reason: string } | null }) => s.held?.reason ?? null), ['last clean point before the incident', null, null, null, null]);

  // Retention keeps the held one and the newest.
  const cfg = join(a.dir, 'config.yaml');
  writeFileSync(cfg, `${readFileSync(cfg, 'utf8')}policies:\n  p:\n    rpo: 1h\n    retention: { last: 1 }\nassign:\n  - match: "*"\n    policy: p\n`);
  const ret = await cli(a, 'retention', 'app');
  assert.equal(ret.code, 0, ret.stderr);
  assert.deepEqual(await list(), [ids[0], ids[4]]);

  // Held: refused even with --force, and nothing else in the same command is deleted.
  for (let i = 5; i < 7; i++) {
    contents.push(randomBytes(MiB));
    writeFileSync(img, contents[i]!);
    const s = await cli(a, 'snapshot', 'app');
    ids.push(s.json.snapshot.id);
  }
  const before = await list();
  const refused = await cli(a, 'snapshots', 'app', '--delete', ids[4]!, ids[0]!, '--force');
  assert.equal(refused.code, 1);
  assert.equal(refused.json.error.code, 'ERR_SNAPSHOT_HELD');
  assert.match(refused.json.error.message, /last clean point before the incident.*--release/);
  assert.deepEqual(await list(), before, 'nothing was deleted');
  // An unknown id: nothing deleted either.
  const unknown = await cli(a, 'snapshots', 'app', '--delete', ids[4]!, '20260101T000000.000Z-000000');
  assert.equal(unknown.json.error.code, 'ERR_SNAPSHOT_NOT_FOUND');
  assert.deepEqual(await list(), before);
  // The newest is the latest recovery point: only with --force.
  const newest = await cli(a, 'snapshots', 'app', '--delete', ids[6]!);
  assert.equal(newest.code, 1);
  assert.equal(newest.json.error.code, 'ERR_SNAPSHOT_IN_USE');
  assert.match(newest.json.error.message, /newest/);
  const del = await cli(a, 'snapshots', 'app', '--delete', ids[4]!, ids[6]!, '--force');
  assert.equal(del.code, 0, del.stderr);
  assert.deepEqual(del.json.deleted, [ids[4], ids[6]]);
  assert.deepEqual(await list(), [ids[0], ids[5]]);
  assert.equal((await cli(a, 'gc')).code, 0);
  const out = join(work, 'held.img');
  assert.equal((await cli(a, 'restore', `app@${ids[0]}`, '--to', out)).code, 0);
  assert.ok(sameBytes(out, contents[0]!), 'the held snapshot restores exactly after gc');
  assert.equal((await cli(a, 'verify')).code, 0);

  // volume remove: refused while a snapshot is held; --force removes it with its holds.
  const rm = await cli(a, 'volume', 'remove', 'app');
  assert.equal(rm.code, 1);
  assert.equal(rm.json.error.code, 'ERR_SNAPSHOT_HELD');
  assert.deepEqual(await list(), [ids[0], ids[5]]);
  const rel = await cli(a, 'snapshots', 'app', '--release', ids[0]!);
  assert.equal(rel.json.released, true);
  assert.equal((await cli(a, 'snapshots', 'app', '--release', ids[0]!)).json.released, false);
  assert.equal((await cli(a, 'snapshots', 'app', '--hold', ids[5]!)).code, 0);
  assert.equal((await cli(a, 'volume', 'remove', 'app', '--force')).code, 0);
  assert.equal((await cli(a, 'volume', 'add', 'app', '--path', img)).code, 0);
  assert.equal((await cli(a, 'snapshot', 'app')).code, 0);
  assert.deepEqual((await cli(a, 'snapshots', 'app')).json.map((s: { held: unknown }) => s.held), [null], 'the removed volume\'s holds went with it');

  // Usage errors: exit 2, nothing done.
  for (const args of [['--hold', ids[5]!, '--release', ids[5]!], ['--reason', 'x'], ['--force'], ['--hold', ids[5]!, '--reason', 'a\nb']]) {
    const u = await cli(a, 'snapshots', 'app', ...args);
    assert.equal(u.code, 2, `${args.join(' ')}: ${u.stderr}`);
  }
  const missing = await cli(a, 'snapshots', 'app', '--hold', '20260101T000000.000Z-000000');
  assert.equal(missing.json.error.code, 'ERR_SNAPSHOT_NOT_FOUND');
});

test('doctor: all good on a working pair; a missing image, a refused token, an unknown replication peer and a stopped peer each fail with what to do; it changes nothing', async (t) => {
  const { a, b, sb, img } = await pairedWithVolume(t, 16);
  const cfg = join(a.dir, 'config.yaml');
  writeFileSync(cfg, `${readFileSync(cfg, 'utf8')}policies:\n  p: { rpo: 1h }\nassign:\n  - match: "*"\n    policy: p\nreplication: { peer: cloud }\n`);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const statusOf = (r: { json: { checks: Array<{ check: string; status: string; detail: string; fix?: string }> } }, name: string) => r.json.checks.find((c) => c.check === name);

  const good = await cli(a, 'doctor');
  assert.equal(good.code, 0, good.stdout);
  assert.equal(good.json.failed, 0);
  for (const name of ['config', 'certificate', 'store disk', 'volume vol', 'peer cloud', 'replication']) assert.equal(statusOf(good, name)?.status, 'ok', `${name}: ${JSON.stringify(statusOf(good, name))}`);
  assert.match(statusOf(good, 'certificate')!.detail, /valid for 36\d\d more days/, 'init makes a certificate valid ten years');
  assert.match(statusOf(good, 'peer cloud')!.detail, /clock [+-]\d+\.\d s from ours/, 'the clocks are compared (one machine here: within the warning)');
  assert.equal(statusOf(good, 'server')?.status, 'warn', 'policies, and no daemon to run them');

  renameSync(img, `${img}.moved`);
  assert.equal((await cli(b, 'token', 'rotate', '--grace', '0')).code, 0);
  writeFileSync(cfg, readFileSync(cfg, 'utf8').replace('replication: { peer: cloud }', 'replication: { peer: nope }'));
  await new Promise((r) => setTimeout(r, 1100)); // the running server takes the new token within a second
  const bad = await cli(a, 'doctor');
  assert.equal(bad.code, 1);
  assert.equal(bad.json.ok, false);
  assert.equal(statusOf(bad, 'volume vol')?.status, 'fail');
  assert.match(statusOf(bad, 'volume vol')!.detail, /ERR_VOLUME_UNREADABLE/);
  assert.equal(statusOf(bad, 'peer cloud')?.status, 'fail');
  assert.match(statusOf(bad, 'peer cloud')!.fix!, /peer update cloud --token/);
  assert.equal(statusOf(bad, 'replication')?.status, 'fail');
  assert.equal(bad.json.failed, 3);

  await sb.stop();
  const down = await cli(a, 'doctor');
  assert.match(statusOf(down, 'peer cloud')!.detail, /ERR_PEER_UNREACHABLE/);
  renameSync(`${img}.moved`, img);
  assert.equal(statusOf(await cli(a, 'doctor'), 'volume vol')?.status, 'ok', 'nothing was changed by the checks');
});

test('support-bundle: a .tar.gz of doctor, status, volumes, snapshots, peers, config and audit log, with no token, key or URL secret; run here or forwarded to the server', async (t) => {
  const { a, b, dir } = await pairedWithVolume(t, 16);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  writeFileSync(join(a.dir, 'config.yaml'), 'appliance: { name: onprem }\nalerts: { webhook: "https://ops:hunter2@hooks.example.com/hook/T0K3N?sig=abc" }\n');
  const secrets = [a.token, b.token, readFileSync(join(a.dir, 'admin.token'), 'utf8').trim(), (await cli(a, 'token', 'show', '--monitor')).json.token, 'hunter2', 'T0K3N', 'sig=abc'];
  const key = readFileSync(join(a.dir, 'tls', 'key.pem'), 'utf8').split('\n')[1]!;

  const to = join(dir, 'bundle.tar.gz');
  const r = await cli(a, 'support-bundle', '--to', to);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(statSync(to).mode & 0o777, 0o600);
  const out = join(dir, 'extracted');
  mkdirSync(out);
  execFileSync('tar', ['-xzf', to, '-C', out]); // the system's tar reads it
  const files = readdirSync(out).sort();
  assert.deepEqual(files, ['audit.json', 'config-check.json', 'config.yaml', 'doctor.json', 'manifest.json', 'peer-list.json', 'snapshots-vol.json', 'status.json', 'tls-show.json', 'volume-list.json']);
  const all = files.map((f) => readFileSync(join(out, f), 'utf8')).join('\n');
  for (const s of [...secrets, key]) assert.ok(!all.includes(s), `the bundle holds a secret (${s.slice(0, 6)}…)`);
  assert.match(readFileSync(join(out, 'config.yaml'), 'utf8'), /https:\/\/hooks\.example\.com\/…/);
  assert.equal(JSON.parse(readFileSync(join(out, 'snapshots-vol.json'), 'utf8')).length, 1);
  assert.equal(JSON.parse(readFileSync(join(out, 'peer-list.json'), 'utf8')).peers[0].name, 'cloud');
  const manifest = JSON.parse(readFileSync(join(out, 'manifest.json'), 'utf8'));
  assert.equal(manifest.appliance.name, 'onprem');
  assert.ok(manifest.commands.every((c: { exitCode: number }) => c.exitCode === 0 || c.exitCode === 1));

  // On the served appliance the command runs in its server; an existing file is not overwritten.
  const served = join(dir, 'cloud.tar.gz');
  assert.equal((await cli(b, 'support-bundle', '--to', served)).code, 0);
  assert.ok(execFileSync('tar', ['-tzf', served], { encoding: 'utf8' }).includes('snapshots-vol.json'));
  const again = await cli(b, 'support-bundle', '--to', served);
  assert.equal(again.code, 2);
});

test('pause and resume: usage and unknown volumes change nothing; a pause is in status, doctor and the audit log until resumed', async (t) => {
  const a = await initHome(t, 'paused');
  const dir = tempDir(t, 'tandem-pause-');
  for (const v of ['a1', 'a2']) {
    writeFileSync(join(dir, `${v}.img`), randomBytes(MiB));
    assert.equal((await cli(a, 'volume', 'add', v, '--path', join(dir, `${v}.img`))).code, 0);
  }
  for (const args of [[], ['a1', '--all'], ['a1', '--for', 'soon'], ['a1', '--for', '31d'], ['a1', '--reason', ' ']]) {
    const r = await cli(a, 'pause', ...args);
    assert.equal(r.code, 2, `pause ${args.join(' ')}: ${r.stderr}`);
  }
  const unknown = await cli(a, 'pause', 'a1', 'nope');
  assert.equal(unknown.json.error.code, 'ERR_VOLUME_NOT_FOUND');
  assert.ok((await cli(a, 'status')).json.volumes.every((v: { paused: unknown }) => v.paused === null), 'nothing paused');

  const before = Date.now();
  const p = await cli(a, 'pause', 'a1', '--for', '2h', '--reason', 'disk swap');
  assert.equal(p.code, 0, p.stderr);
  const got = p.json.paused[0];
  assert.deepEqual([got.volume, got.paused.by, got.paused.reason], ['a1', userInfo().username, 'disk swap']);
  assert.ok(Math.abs(Date.parse(got.paused.until) - (before + 2 * 3_600_000)) < 60_000);
  const text = await cliText(['--home', a.dir, 'status']);
  assert.match(text.stdout, new RegExp(`a1: scheduled jobs paused by ${userInfo().username} (just now|\\d+s ago), until ${got.paused.until}: disk swap`));
  const status = await cli(a, 'status');
  assert.deepEqual(status.json.volumes.map((v: { volume: string; paused: { reason: string } | null }) => [v.volume, v.paused?.reason ?? null]), [['a1', 'disk swap'], ['a2', null]]);
  const doctor = await cli(a, 'doctor');
  const check = doctor.json.checks.find((c: { check: string }) => c.check === 'scheduled jobs of a1');
  assert.equal(check?.status, 'warn', JSON.stringify(doctor.json.checks));
  assert.match(check.fix, /appliance resume a1/);

  // A volume removed while paused and added again under its name starts afresh.
  assert.equal((await cli(a, 'volume', 'remove', 'a1')).code, 0);
  assert.equal((await cli(a, 'volume', 'add', 'a1', '--path', join(dir, 'a1.img'))).code, 0);
  assert.equal((await cli(a, 'status', 'a1')).json.volumes[0].paused, null, 'not paused after remove and add');
  assert.deepEqual((await cli(a, 'pause', '--all')).json.paused.map((x: { volume: string }) => x.volume), ['a1', 'a2']);
  const resumed = await cli(a, 'resume', '--all');
  assert.deepEqual(resumed.json.resumed.map((x: { volume: string; paused: { until: string | null } }) => [x.volume, x.paused.until]), [['a1', null], ['a2', null]]);
  assert.deepEqual((await cli(a, 'resume', 'a1')).json.resumed, [], 'nothing was paused');
  assert.ok((await cli(a, 'status')).json.volumes.every((v: { paused: unknown }) => v.paused === null));
  const audit = (await cli(a, 'audit')).json.entries
    .filter((e: { exitCode: number }) => e.exitCode === 0)
    .map((e: { command: string[] }) => e.command.filter((w) => !w.startsWith('/') && w !== '--home' && w !== '--json').slice(0, 2).join(' '));
  assert.deepEqual(audit.filter((c: string) => /^(pause|resume)/.test(c)), ['pause a1', 'pause --all', 'resume --all', 'resume a1']);
});
