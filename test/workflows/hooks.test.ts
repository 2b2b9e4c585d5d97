import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { withHooks } from '../../appliance/hooks.js';
import { isTandemError } from '../../common/errors.js';

function tmp(t: { after(fn: () => void): void }): string {
  const d = mkdtempSync(join(tmpdir(), 'tandem-hooks-'));
  t.after(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

test('pre, then the snapshot, then post, in order, with the environment', async (t) => {
  const d = tmp(t);
  const log = join(d, 'log');
  const r = await withHooks({ pre: `echo pre $TANDEM_GROUP >> ${log}`, post: `echo post $TANDEM_HOOK >> ${log}`, timeoutMs: 5000 }, async () => {
    assert.equal(readFileSync(log, 'utf8'), 'pre erp\n');
    return 'snap-1';
  }, { env: { TANDEM_GROUP: 'erp' } });
  assert.equal(r, 'snap-1');
  assert.equal(readFileSync(log, 'utf8'), 'pre erp\npost post\n');
});

test('a failing pre hook aborts the snapshot cleanly and the post hook still runs', async (t) => {
  const d = tmp(t);
  let ran = false;
  await assert.rejects(
    withHooks({ pre: 'echo cannot freeze >&2; exit 3', post: `touch ${join(d, 'thawed')}`, timeoutMs: 5000 }, async () => { ran = true; }),
    (e: unknown) => {
      assert.ok(isTandemError(e, 'ERR_HOOK_FAILED'));
      assert.match(e.message, /pre hook `echo cannot freeze >&2; exit 3` exited with status 3; output: cannot freeze: no snapshot was taken; the post hook ran/);
      assert.equal(e.details.snapshotTaken, false);
      return true;
    },
  );
  assert.equal(ran, false);
  assert.ok(existsSync(join(d, 'thawed')));
});

test('a hook that hangs is killed at its timeout', async () => {
  const t0 = Date.now();
  await assert.rejects(withHooks({ pre: 'sleep 30', post: null, timeoutMs: 300 }, async () => 1), (e: unknown) => {
    assert.ok(isTandemError(e, 'ERR_HOOK_FAILED'));
    assert.match(e.message, /did not finish within/);
    return true;
  });
  assert.ok(Date.now() - t0 < 10_000);
});

test('a failing post hook after a successful snapshot reports it but keeps the result', async () => {
  await assert.rejects(withHooks({ pre: null, post: 'exit 1', timeoutMs: 5000 }, async () => ({ id: 'snap-9' })), (e: unknown) => {
    assert.ok(isTandemError(e, 'ERR_HOOK_FAILED'));
    assert.match(e.message, /snapshot itself succeeded and is kept/);
    assert.deepEqual(e.details.result, { id: 'snap-9' });
    return true;
  });
});

test('post runs when the snapshot itself fails, and the snapshot error is what is thrown', async (t) => {
  const d = tmp(t);
  await assert.rejects(withHooks({ pre: 'true', post: `touch ${join(d, 'post')}`, timeoutMs: 5000 }, async () => { throw new Error('disk gone'); }), /disk gone/);
  assert.ok(existsSync(join(d, 'post')));
});
