/**
 * `appliance ebs` as a real process against the AWS emulator: export, list, import, kill -9
 * during an export, and the errors an operator meets first (credentials, region, unknown id).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, cliJson, spawnCli, collect } from '../helpers/cli.js';
import { Store } from '../../store/index.js';
import { importSnapshot } from '../../appliance/ebs/index.js';
import { assertSnapshotBytes, awsEnv, emulator, fillBlock, makeImage, nonZeroBlocks, tmp, type Emulator } from './helpers.js';

let emu: Emulator;
before(async () => { emu = await emulator(); });
after(async () => { await emu.close(); });

const env = () => awsEnv(emu.url);

async function setup(t: { after(fn: () => void): void }, img: Buffer): Promise<{ home: string; image: string }> {
  const dir = tmp(t);
  const home = join(dir, 'home');
  const image = join(dir, 'vol.img');
  writeFileSync(image, img);
  for (const args of [['init', '--name', 'cloud'], ['volume', 'add', 'db', '--path', image], ['snapshot', 'db']]) {
    const r = await cli([...args, '--home', home]);
    assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
  }
  return { home, image };
}

test('ebs export prints the EBS snapshot id, ebs list shows the mapping, ebs import reads it back', async (t) => {
  const img = makeImage(12, { seed: 21 });
  const { home } = await setup(t, img);
  await emu.resetStats();
  const r = await cli(['ebs', 'export', 'db', '--description', 'nightly', '--home', home], { env: env() });
  assert.equal(r.code, 0, r.stderr);
  const id = r.stdout.trim();
  assert.match(id, /^snap-[0-9a-f]+$/);
  assert.doesNotMatch(r.stderr, /Warning/, "the SDK's Node version notice is not in the operator's output (common/ca.ts)");
  assert.equal((await emu.stats()).operations.PutSnapshotBlock, nonZeroBlocks(img));
  const list = await cliJson(['ebs', 'list', 'db', '--home', home]);
  assert.equal(list.code, 0);
  assert.equal(list.json.exports.length, 1);
  assert.equal(list.json.exports[0].ebsSnapshotId, id);
  const again = await cliJson(['ebs', 'export', 'db', '--home', home], { env: env() });
  assert.equal(again.json.ebsSnapshotId, id, 'exporting the same snapshot again answers the same EBS snapshot');
  assert.equal(again.json.blocksUploaded, 0);
  const imp = await cliJson(['ebs', 'import', id, '--volume', 'copy', '--home', home], { env: env() });
  assert.equal(imp.code, 0, imp.stderr);
  assert.equal(imp.json.blocksFetched, nonZeroBlocks(img));
  assert.equal(imp.json.snapshot.volume, 'copy');
});

test('kill -9 during an export: the rerun completes the same pending snapshot or a clean one, never a partial one', async (t) => {
  let img = makeImage(40, { seed: 23, zeroEvery: 1000 });
  const { home, image } = await setup(t, img);
  t.after(() => emu.faults({}));
  const TRIALS = 4;
  let resumed = 0;
  for (let trial = 0; trial < TRIALS; trial++) {
    if (trial > 0) {
      img = Buffer.from(img);
      for (let i = trial; i < 40; i += 3) fillBlock(img, i, 100 + trial);
      writeFileSync(image, img);
      assert.equal((await cli(['snapshot', 'db', '--home', home])).code, 0);
    }
    await emu.resetStats();
    // The emulator confirms a trial-dependent number of blocks (of 40, then 13 changed), holds
    // the next one unanswered, and the export is killed there: no race with a fast export.
    const target = 2 + trial * 2;
    await emu.faults({ holdAfter: target, actions: ['PutSnapshotBlock'] });
    const child = spawnCli(['ebs', 'export', 'db', '--home', home], { env: env() });
    const done = collect(child);
    for (let i = 0; i < 2000 && child.exitCode === null && (await emu.stats()).held < 1; i++) await new Promise((r) => setTimeout(r, 10));
    child.kill('SIGKILL');
    const killed = await done;
    assert.equal(killed.signal, 'SIGKILL', `the export ended before it was killed: ${killed.stderr}`);
    assert.equal((await emu.stats()).operations.PutSnapshotBlock, target);
    await emu.faults({});
    assert.equal((await emu.stats()).operations.CompleteSnapshot ?? 0, 0, 'the killed export did not complete a snapshot');
    const rerun = await cliJson(['ebs', 'export', 'db', '--home', home], { env: env() });
    assert.equal(rerun.code, 0, rerun.stderr);
    if (rerun.json.resumed) resumed++;
    // The completed snapshot is whole: another appliance (a fresh store) imports it byte for byte.
    const checkDir = tmp(t);
    const other = await Store.open(checkDir);
    try {
      const imp = await importSnapshot(other, rerun.json.ebsSnapshotId, 'db');
      await assertSnapshotBytes(other, imp.snapshot, img);
    } finally {
      await other.close();
    }
  }
  // Each kill came after the pending EBS snapshot was recorded (blocks were confirmed), so each rerun resumes it.
  assert.equal(resumed, TRIALS, `every rerun resumed the pending EBS snapshot (${resumed} of ${TRIALS})`);
  const list = await cliJson(['ebs', 'list', 'db', '--home', home]);
  assert.equal(list.json.exports.length, TRIALS);
  assert.equal(list.json.pending, null);
});

test('missing credentials, a wrong region and an unknown snapshot id are clear errors', async (t) => {
  const { home } = await setup(t, makeImage(2));
  const dir = tmp(t);
  const noCreds = { ...env(), AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '', AWS_SESSION_TOKEN: '', AWS_PROFILE: '', HOME: dir, AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'), AWS_CONFIG_FILE: join(dir, 'none'), AWS_CONTAINER_CREDENTIALS_RELATIVE_URI: '', AWS_CONTAINER_CREDENTIALS_FULL_URI: '', AWS_WEB_IDENTITY_TOKEN_FILE: '' };
  const a = await cli(['ebs', 'export', 'db', '--home', home], { env: noCreds });
  assert.equal(a.code, 1);
  assert.match(a.stderr, /ERR_AWS_CREDENTIALS/);
  assert.match(a.stderr, /AWS_ACCESS_KEY_ID/);
  const noRegion = await cli(['ebs', 'export', 'db', '--home', home], { env: { ...env(), AWS_REGION: '', AWS_DEFAULT_REGION: '', HOME: dir, AWS_CONFIG_FILE: join(dir, 'none') } });
  assert.equal(noRegion.code, 1);
  assert.match(noRegion.stderr, /ERR_AWS_CREDENTIALS.*AWS_REGION/);
  const wrong = await cli(['ebs', 'export', 'db', '--home', home], { env: { ...env(), AWS_REGION: 'eu-west-3' } });
  assert.equal(wrong.code, 1);
  assert.match(wrong.stderr, /ERR_AWS_CREDENTIALS/);
  assert.match(wrong.stderr, /AWS_REGION/);
  const unknown = await cli(['ebs', 'import', 'snap-0fedcba9876543210', '--volume', 'x', '--home', home], { env: env() });
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /ERR_AWS_NOT_FOUND.*snap-0fedcba9876543210/);
  const list = await cliJson(['ebs', 'list', 'db', '--home', home]);
  assert.deepEqual(list.json.exports, [], 'failed exports record nothing');
});
