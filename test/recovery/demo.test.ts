/**
 * `npm run demo` is the README's first command: run it as the operator would (the compiled
 * demo, a real process) and check it tells the whole story and exits 0.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { ROOT } from '../helpers/cli.js';

test('the demo runs the whole DR scenario and ends with equal volumes', () => {
  const r = spawnSync(process.execPath, [join(ROOT, 'dist', 'appliance', 'demo', 'main.js')], {
    cwd: ROOT,
    env: { ...process.env, CI: 'true' },
    encoding: 'utf8',
    timeout: 180_000,
  });
  assert.equal(r.status, 0, `demo failed:\n${r.stdout}\n${r.stderr}`);
  for (let i = 1; i <= 11; i++) assert.match(r.stdout, new RegExp(`\\[${i}/11\\]`));
  assert.match(r.stdout, /the on-prem volume equals the cloud one/);
  assert.match(r.stdout, /measured RTO/);
  assert.match(r.stdout, /on-prem sent 1 good copy; cloud verify again: 0 problems/);
});
