/**
 * A manual `appliance snapshot` runs the pre/post hooks of the volume's group, like the daemon:
 * a failing pre hook aborts with ERR_HOOK_FAILED and no snapshot, and the post hook always runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync, appendFileSync } from 'node:fs';
import { join } from 'node:path';
import { rootCertificates } from 'node:tls';
import { cliJson, tempDir } from '../helpers/cli.js';

/** A home in `dir` with volume db (a 192 KiB image) in group erp, whose hooks are `hooks` (YAML lines). */
async function homeWithHooks(dir: string, hooks: string): Promise<string> {
  const home = join(dir, 'home');
  const img = join(dir, 'db.img');
  writeFileSync(img, randomBytes(3 * 65536));
  assert.equal((await cliJson(['--home', home, 'init', '--name', 'h'])).code, 0);
  assert.equal((await cliJson(['--home', home, 'volume', 'add', 'db', '--path', img, '--block-size', '64KiB'])).code, 0);
  appendFileSync(join(home, 'config.yaml'), `groups:\n  erp:\n    volumes: [db]\n    hooks:\n${hooks}`);
  return home;
}

test('manual snapshots run the group hooks; a failing pre hook takes no snapshot and still runs post', async (t) => {
  const dir = tempDir(t);
  const log = join(dir, 'hooks.log');
  const flag = join(dir, 'fail-pre');
  const home = await homeWithHooks(dir, `      pre: "test ! -e ${flag} && echo pre $TANDEM_VOLUME >> ${log}"
      post: "echo post $TANDEM_VOLUME >> ${log}"
      timeout: 10s
`);

  const ok = await cliJson(['--home', home, 'snapshot', 'db']);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(readFileSync(log, 'utf8'), 'pre db\npost db\n');

  writeFileSync(flag, '');
  const bad = await cliJson(['--home', home, 'snapshot', 'db']);
  assert.equal(bad.code, 1);
  assert.equal(bad.json.error.code, 'ERR_HOOK_FAILED');
  assert.equal(readFileSync(log, 'utf8'), 'pre db\npost db\npost db\n', 'post ran after the failed pre');
  const snaps = await cliJson(['--home', home, 'snapshots', 'db']);
  assert.equal(JSON.stringify(snaps.json).match(/"id"/g)?.length, 1, 'no second snapshot was taken');
  assert.ok(existsSync(flag));
});

test('hooks see NODE_EXTRA_CA_CERTS as the operator set it, though the launcher keeps it from Node', async (t) => {
  const dir = tempDir(t);
  const log = join(dir, 'env.log');
  const ca = join(dir, 'ca.pem');
  writeFileSync(ca, rootCertificates[0]!);
  const home = await homeWithHooks(dir, `      pre: 'echo "$NODE_EXTRA_CA_CERTS|\${TANDEM_EXTRA_CA_CERTS-unset}" >> ${log}'\n`);
  const ok = await cliJson(['--home', home, 'snapshot', 'db'], { env: { NODE_EXTRA_CA_CERTS: ca } });
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(readFileSync(log, 'utf8'), `${ca}|unset\n`);
});
