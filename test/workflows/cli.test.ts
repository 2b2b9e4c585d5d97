/** The workflow commands as an operator runs them (compiled CLI, `npm run build` first). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync, mkdirSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { initHome, cli, tempDir } from '../helpers/appliance.js';

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
