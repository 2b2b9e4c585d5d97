/**
 * Faults between two real appliances: wrong token, wrong fingerprint, concurrent syncs of one
 * volume, and a proxy that corrupts or truncates the block stream (kill -9: kill.test.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { appendFileSync, closeSync, cpSync, existsSync, openSync, readFileSync, renameSync, rmSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { createSecureContext } from 'node:tls';
import { Home } from '../../appliance/home.js';
import { createServer, request as httpsRequest, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Transform } from 'node:stream';
import { setTimeout as delay } from 'node:timers/promises';
import { HEADER_BYTES } from '../../sync/framing.js';
import { blake3 } from '../../store/hash.js';
import { makeNode } from '../../store/tree.js';
import { DIST_MAIN, cli as cliText, collect, smallTmpfs, spawnCli } from '../helpers/cli.js';
import { SOURCES_NS } from '../../appliance/sources.js';
import { cli, diagnose, initHome, pair, pairedWithVolume, peerClient, startCli, startServe, tempDir, type TestHome } from '../helpers/appliance.js';

const BS = 64 * 1024;


/** A well-formed SHA-256 fingerprint of no appliance here (what a pinned peer that was replaced would show). */
function otherFingerprint(): string {
  return randomBytes(32).toString('hex').toUpperCase().match(/../g)!.join(':');
}

/** Wait (bounded) until `cond` holds, checking every `everyMs`. */
async function until(cond: () => boolean | Promise<boolean>, what: string, limitMs = 20_000, everyMs = 25): Promise<void> {
  const end = Date.now() + limitMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await delay(everyMs);
  }
}

test('wrong token gets 401 and changes nothing; a wrong fingerprint is refused before any request is sent', async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 4);
  const status = (path: string, token?: string) =>
    new Promise<{ code: number; body: any }>((resolve, reject) => {
      const req = httpsRequest(new URL(path, sb.url), { rejectUnauthorized: false, headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
        let s = '';
        res.on('data', (d) => (s += d));
        res.on('end', () => resolve({ code: res.statusCode!, body: JSON.parse(s) }));
      });
      req.on('error', reject);
      req.end();
    });
  assert.equal((await status('/v1/health')).code, 200);
  const none = await status('/v1/volumes/vol/snapshots/latest');
  assert.equal(none.code, 401);
  assert.equal(none.body.error.code, 'ERR_UNAUTHORIZED');
  assert.equal((await status('/v1/stats', 'x'.repeat(43))).code, 401);
  assert.equal((await status('/v1/stats', b.token)).code, 200);

  const bad = await cli(a, 'peer', 'add', 'other', '--url', sb.url, '--token', 'y'.repeat(43), '--fingerprint', b.fingerprint);
  assert.equal(bad.code, 1);
  assert.equal(bad.json.error.code, 'ERR_UNAUTHORIZED');
  const list = await cli(a, 'peer', 'list');
  assert.deepEqual(list.json.peers.map((p: { name: string }) => p.name), ['cloud'], 'a refused peer add stores nothing');
  assert.ok(!list.stdout.includes(b.token), 'peer list never prints a token');

  const wrongFp = otherFingerprint(); // another certificate's
  assert.equal((await cli(a, 'peer', 'add', 'impostor', '--url', sb.url, '--token', b.token, '--fingerprint', wrongFp, '--no-check')).code, 0);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const before = await peerB.stats();
  const r = await cli(a, 'sync', 'vol', '--peer', 'impostor');
  assert.equal(r.code, 1);
  assert.equal(r.json.error.code, 'ERR_PEER_FINGERPRINT');
  const after = await peerB.stats();
  assert.equal(after.requests, before.requests, 'no request reached the server');

  assert.equal((await cli(a, 'peer', 'remove', 'impostor')).code, 0);
  const gone = await cli(a, 'peer', 'remove', 'impostor');
  assert.equal(gone.json.error.code, 'ERR_PEER_NOT_FOUND');
  const badFp = await cli(a, 'peer', 'add', 'x', '--url', sb.url, '--token', b.token, '--fingerprint', 'AB:CD');
  assert.equal(badFp.code, 2, 'a malformed fingerprint is a usage error');
  assert.equal(badFp.json.error.code, 'ERR_USAGE');
  const base64 = await cli(a, 'peer', 'add', 'x', '--url', sb.url, '--token', b.token, '--fingerprint', `SHA256:${Buffer.from(b.fingerprint.replace(/:/g, ''), 'hex').toString('base64')}`);
  assert.equal(base64.code, 2, 'a base64 digest is not taken for hex');
  // The same digest as openssl prints it, and with a sha256: prefix, pairs as the plain form does.
  const openssl = await cli(a, 'peer', 'add', 'x', '--url', sb.url, '--token', b.token, '--fingerprint', `sha256 Fingerprint=${b.fingerprint}`);
  assert.equal(openssl.code, 0, openssl.stderr);
  const prefixed = await cli(a, 'peer', 'add', 'y', '--url', sb.url, '--token', b.token, '--fingerprint', `sha256:${b.fingerprint.replace(/:/g, '').toLowerCase()}`);
  assert.equal(prefixed.code, 0, prefixed.stderr);
  const pinned = (await cli(a, 'peer', 'list')).json.peers.filter((p: { name: string }) => p.name === 'x' || p.name === 'y');
  assert.deepEqual(pinned.map((p: { fingerprint: string }) => p.fingerprint), [b.fingerprint, b.fingerprint]);
  assert.equal((await cli(a, 'peer', 'remove', 'x')).code, 0);
  assert.equal((await cli(a, 'peer', 'remove', 'y')).code, 0);
  const http = await cli(a, 'peer', 'add', 'x', '--url', sb.url.replace('https', 'http'), '--token', b.token, '--fingerprint', b.fingerprint);
  assert.equal(http.code, 2, 'peers are reached over https only');
});

/** `appliance sync vol --peer cloud` on `a`: 'ok', or the error code. */
async function syncOutcome(a: TestHome, ...more: string[]): Promise<string> {
  const r = await cli(a, 'sync', 'vol', '--peer', 'cloud', ...more);
  return r.code === 0 ? 'ok' : r.json?.error?.code;
}

test('tls rotate --now: a running server serves the new certificate within a second; the peer is refused before any data until peer update pins it', async (t) => {
  const { a, b } = await pairedWithVolume(t, 16);
  assert.equal(await syncOutcome(a), 'ok');
  const rot = await cli(b, 'tls', 'rotate', '--now'); // forwarded to b's running server
  assert.equal(rot.code, 0, rot.stderr);
  assert.equal(rot.json.previous, b.fingerprint);
  assert.notEqual(rot.json.fingerprint, b.fingerprint);
  await delay(1300);
  assert.equal(await syncOutcome(a), 'ERR_PEER_FINGERPRINT');
  const stale = await cli(a, 'peer', 'update', 'cloud', '--fingerprint', b.fingerprint);
  assert.equal(stale.json.error.code, 'ERR_PEER_FINGERPRINT', 'the old pin is checked and refused');
  const up = await cli(a, 'peer', 'update', 'cloud', '--fingerprint', rot.json.fingerprint);
  assert.equal(up.code, 0, up.stderr);
  assert.deepEqual(up.json.changed, ['fingerprint']);
  assert.equal(await syncOutcome(a), 'ok');
  assert.equal((await cli(b, 'tls', 'show')).json.fingerprint, rot.json.fingerprint);
  assert.equal((await cli(b, 'volume', 'list')).code, 0, "b's own commands still reach its server");
});

test('a TLS rotation cut short between its renames is finished by the next command; a lone new key is dropped once it is old', async (t) => {
  const a = await initHome(t, 'tls-cut');
  const home = Home.load(a.dir);
  const fp = await home.prepareTlsRotation();
  renameSync(`${home.paths.tlsKey}.next`, home.paths.tlsKey); // cut short: the new key in place, the old certificate
  const shown = await cli(a, 'tls', 'show');
  assert.equal(shown.json.fingerprint, fp);
  assert.doesNotThrow(() => createSecureContext(Home.load(a.dir).tls()), 'the key and the certificate match');
  assert.equal(existsSync(`${home.paths.tlsCert}.next`), false);
  // A new key alone: a rotation still writing its certificate is left alone; one cut short long ago is dropped.
  const lone = `${home.paths.tlsKey}.next`;
  writeFileSync(lone, 'a rotation writing its certificate now');
  assert.equal((await cli(a, 'tls', 'show')).json.fingerprint, fp);
  assert.equal(existsSync(lone), true);
  const old = new Date(Date.now() - 120_000);
  utimesSync(lone, old, old);
  assert.equal((await cli(a, 'tls', 'show')).json.fingerprint, fp);
  assert.equal(existsSync(lone), false);
});

test('tls rotate stages a certificate the peer learns (peer update) and takes with the old one; --activate breaks no sync; the peer then pins the new one alone', async (t) => {
  const { a, b } = await pairedWithVolume(t, 16);
  assert.equal(await syncOutcome(a), 'ok');
  const oldPair = Home.load(b.dir).tls();
  const staged = await cli(b, 'tls', 'rotate'); // forwarded to b's running server
  assert.equal(staged.code, 0, staged.stderr);
  assert.equal(staged.json.activated, false);
  assert.notEqual(staged.json.fingerprint, b.fingerprint);
  await delay(1300);
  // (A dry run: a sync's lock answer would tell a of the staging, and a would follow it, as the next test shows.)
  assert.equal(await syncOutcome(a, '--dry-run'), 'ok', 'b still serves the certificate a pins');
  let shown = (await cli(b, 'tls', 'show')).json;
  assert.equal(shown.fingerprint, b.fingerprint);
  assert.equal(shown.staged.fingerprint, staged.json.fingerprint);
  assert.deepEqual(shown.staged.takenBy, []);

  // a learns the staged certificate from b's health answer (pinned to the old one) and tells b.
  const learned = await cli(a, 'peer', 'update', 'cloud');
  assert.equal(learned.code, 0, learned.stderr);
  assert.deepEqual([learned.json.certificate, learned.json.acknowledged], ['learned', true]);
  let pins = (await cli(a, 'peer', 'list')).json.peers[0];
  assert.deepEqual([pins.fingerprint, pins.nextFingerprint], [b.fingerprint, staged.json.fingerprint]);
  shown = (await cli(b, 'tls', 'show')).json;
  assert.deepEqual(shown.staged.takenBy.map((p: { name: string }) => p.name), ['onprem']);
  assert.equal((await cli(a, 'peer', 'update', 'cloud')).json.certificate, 'none', 'learned once');

  // b serves it: a's next sync is taken with no pin changed by hand.
  const act = await cli(b, 'tls', 'rotate', '--activate');
  assert.equal(act.code, 0, act.stderr);
  assert.deepEqual([act.json.fingerprint, act.json.previous], [staged.json.fingerprint, b.fingerprint]);
  await delay(1300);
  const taken = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(taken.code, 0, `the staged certificate is taken: ${taken.stderr}`);
  assert.equal(taken.json.certificate, 'moved', 'and the sync pins it alone');
  shown = (await cli(b, 'tls', 'show')).json;
  assert.deepEqual([shown.fingerprint, shown.staged], [staged.json.fingerprint, null]);
  const again = await cli(b, 'tls', 'rotate', '--activate');
  assert.equal(again.json.error.code, 'ERR_TLS_NOT_STAGED');
  assert.equal((await cli(b, 'tls', 'rotate', '--activate', '--now')).code, 2);

  // a pins the new certificate alone: the old pair served again is refused.
  const moved = await cli(a, 'peer', 'update', 'cloud');
  assert.equal(moved.json.certificate, 'none', 'moved by the sync already');
  pins = (await cli(a, 'peer', 'list')).json.peers[0];
  assert.deepEqual([pins.fingerprint, pins.nextFingerprint], [staged.json.fingerprint, undefined]);
  writeFileSync(join(b.dir, 'tls', 'key.pem'), oldPair.key);
  writeFileSync(join(b.dir, 'tls', 'cert.pem'), oldPair.cert);
  await delay(1300);
  assert.equal(await syncOutcome(a), 'ERR_PEER_FINGERPRINT', 'the old certificate is no longer taken');
});

test("a manual sync follows the peer's certificate rotation as the daemon does: the staging it learns from the lock answer, the activation from the certificate served", async (t) => {
  const { a, b, img } = await pairedWithVolume(t, 16);
  assert.equal(await syncOutcome(a), 'ok');
  const staged = (await cli(b, 'tls', 'rotate')).json.fingerprint as string;
  const learned = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(learned.code, 0, learned.stderr);
  assert.equal(learned.json.certificate, 'learned');
  assert.ok(learned.stderr.includes(`note: cloud staged certificate ${staged}: taken as well from now on, so its activation breaks no sync (it was told)`), learned.stderr);
  let pins = (await cli(a, 'peer', 'list')).json.peers[0];
  assert.deepEqual([pins.fingerprint, pins.nextFingerprint], [b.fingerprint, staged]);
  assert.deepEqual((await cli(b, 'tls', 'show')).json.staged.takenBy.map((p: { name: string }) => p.name), ['onprem']);
  const quiet = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(quiet.json.certificate, undefined, 'learned once');

  assert.equal((await cli(b, 'tls', 'rotate', '--activate')).code, 0);
  await delay(1300);
  writeFileSync(img, randomBytes(BS), { flag: 'r+' });
  const moved = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(moved.code, 0, moved.stderr);
  assert.deepEqual([moved.json.certificate, moved.json.blocksSent], ['moved', 1]);
  assert.match(moved.stderr, new RegExp(`note: cloud now serves certificate ${staged}: pinned alone`));
  pins = (await cli(a, 'peer', 'list')).json.peers[0];
  assert.deepEqual([pins.fingerprint, pins.nextFingerprint], [staged, undefined]);
  // A pull follows the same way: b stages again, a's --reverse learns it.
  const again = (await cli(b, 'tls', 'rotate')).json.fingerprint as string;
  const pulled = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(pulled.code, 0, pulled.stderr);
  assert.equal(pulled.json.certificate, 'learned');
  assert.equal((await cli(a, 'peer', 'list')).json.peers[0].nextFingerprint, again);
});

test('a staged certificate the peer replaced or dropped is followed; an activation cut short is finished by the next command', async (t) => {
  const { a, b } = await pairedWithVolume(t, 16);
  const first = (await cli(b, 'tls', 'rotate')).json.fingerprint;
  assert.equal((await cli(a, 'peer', 'update', 'cloud')).json.certificate, 'learned');
  const second = (await cli(b, 'tls', 'rotate')).json;
  assert.equal(second.replacedStaged, first);
  const relearned = await cli(a, 'peer', 'update', 'cloud');
  assert.deepEqual([relearned.json.certificate, relearned.json.peer.nextFingerprint], ['learned', second.fingerprint]);
  // The staged files removed by hand: b stages nothing; a drops the pin it learned.
  const home = Home.load(b.dir);
  rmSync(`${home.paths.tlsCert}.staged`);
  const dropped = await cli(a, 'peer', 'update', 'cloud');
  assert.deepEqual([dropped.json.certificate, dropped.json.peer.nextFingerprint], ['dropped', undefined]);
  assert.equal(await syncOutcome(a), 'ok');

  // Cut short after the new pair is in place, before the staged files went: the next load cleans up.
  const third = (await cli(b, 'tls', 'rotate')).json.fingerprint;
  const h = Home.load(b.dir);
  writeFileSync(`${h.paths.tlsKey}.next`, readFileSync(`${h.paths.tlsKey}.staged`));
  writeFileSync(`${h.paths.tlsCert}.next`, readFileSync(`${h.paths.tlsCert}.staged`));
  const shown = (await cli(b, 'tls', 'show')).json;
  assert.deepEqual([shown.fingerprint, shown.staged], [third, null]);
  assert.equal(existsSync(`${h.paths.tlsKey}.staged`), false);
});

test("a peer's token opens the peer protocol, not the other appliance's commands: POST /v1/cli with it is 403 and runs nothing", async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 16);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const peerB = peerClient(b, sb); // what the paired appliance holds: b's peer token
  t.after(() => peerB.close());
  await assert.rejects(
    peerB.request('POST', '/v1/cli', { argv: ['node', 'appliance', '--home', b.dir, 'volume', 'remove', 'vol'] }),
    (e: { code?: string; message?: string }) => e.code === 'ERR_FORBIDDEN' && /admin token/.test(e.message ?? ''),
  );
  // Nor by another spelling of the path: the router decodes %XX and cuts at '#' before matching.
  const raw = (token: string, method: string, path: string, body?: unknown) =>
    new Promise<{ status: number; body: string }>((resolve, reject) => {
      const u = new URL(sb.url);
      const req = httpsRequest({ host: u.hostname, port: u.port, path, method, rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) } }, (res) => {
        let text = '';
        res.on('data', (d) => (text += d));
        res.on('end', () => resolve({ status: res.statusCode!, body: text }));
      });
      req.on('error', reject);
      req.end(body ? JSON.stringify(body) : undefined);
    });
  for (const path of ['/v1/%63li', '/v1/cl%69', '/v1/cli#x', '/v1/cli?x=1']) {
    const r = await raw(b.token, 'POST', path, { argv: ['node', 'appliance', '--home', b.dir, 'volume', 'remove', 'vol'] });
    assert.equal(r.status, 403, `${path}: ${r.body}`);
    assert.match(r.body, /ERR_FORBIDDEN/);
  }
  const monitor = readFileSync(join(b.dir, 'monitor.token'), 'utf8').trim();
  for (const path of ['/v1/stats', '/v1/%73tats']) assert.equal((await raw(monitor, 'GET', path)).status, 403, path);
  const snaps = await cli(b, 'snapshots', 'vol'); // b's own CLI sends the admin token: forwarded as before
  assert.equal(snaps.code, 0, snaps.stderr);
  assert.equal(snaps.json.length, 1, 'the volume and its snapshot are still there');
  // b's admin token (the wrong file pasted at a `peer add`) opens nothing a peer uses, so it is
  // never kept by a peer, which could then run commands on b.
  const admin = readFileSync(join(b.dir, 'admin.token'), 'utf8').trim();
  for (const [method, path] of [['GET', '/v1/stats'], ['POST', '/v1/volumes/vol/lock'], ['GET', '/v1/volumes/vol/snapshots/latest']] as const) {
    const r = await raw(admin, method, path, method === 'POST' ? { holder: 'x' } : undefined);
    assert.equal(r.status, 403, `${method} ${path}: ${r.body}`);
    assert.match(r.body, /ERR_FORBIDDEN.*admin token/);
  }
  for (const token of [admin, monitor]) {
    const added = await cli(a, 'peer', 'add', 'wrong', '--url', sb.url, '--token', token, '--fingerprint', b.fingerprint);
    assert.notEqual(added.code, 0, 'refused');
    assert.equal(added.json.error.code, 'ERR_FORBIDDEN', added.stderr);
  }
  assert.ok(!JSON.stringify((await cli(a, 'peer', 'list')).json).includes('"wrong"'), 'no peer record was kept');
});

test('token rotations at once run one after the other: each replaced token stays taken through its grace (a second rotation does not cut the first one\'s short); --grace 0 revokes them all; a grace over a year is refused', async (t) => {
  const b = await initHome(t, 'cloud');
  // Two CLI processes at once (no server yet: each runs its rotation itself), three times.
  const given = [b.token];
  for (let round = 0; round < 3; round++) {
    const runs = await Promise.all([0, 1].map(() => cli(b, 'token', 'rotate', '--grace', '24h')));
    for (const r of runs) {
      assert.equal(r.code, 0, r.stderr);
      given.push(r.json.token);
    }
  }
  assert.equal(new Set(given).size, 7);
  const sb = await startServe(t, b);
  /** Whether the running server takes `token` (GET /v1/stats with it). */
  const taken = async (token: string): Promise<boolean> => {
    const p = peerClient({ ...b, token }, sb);
    try {
      await p.stats();
      return true;
    } catch (e) {
      if ((e as { code?: string }).code !== 'ERR_UNAUTHORIZED') throw e;
      return false;
    } finally {
      await p.close();
    }
  };
  for (const token of given) assert.ok(await taken(token), `a token printed or replaced is taken: ${token.slice(0, 6)}`);
  const revoke = await cli(b, 'token', 'rotate', '--grace', '0'); // sent to the server
  assert.equal(revoke.code, 0, revoke.stderr);
  await delay(1500); // the server reads the token files again within a second
  for (const token of given) assert.equal(await taken(token), false, 'revoked');
  assert.ok(await taken(revoke.json.token));
  const tooLong = await cli(b, 'token', 'rotate', '--grace', '99999999999999d');
  assert.equal(tooLong.code, 2, tooLong.stderr);
  assert.equal(tooLong.json.error.code, 'ERR_USAGE');
  await delay(1500);
  assert.ok(await taken(revoke.json.token), 'the refused rotation changed nothing');
});

test('token rotate: the old token is taken through its grace period, then refused; peer update gives the peer the new one, checked first; --grace 0 revokes at once', async (t) => {
  const { a, b } = await pairedWithVolume(t, 16);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const syncCode = () => syncOutcome(a);

  // Rotated in the running server (the command is forwarded to it): the old token still works.
  const rot = await cli(b, 'token', 'rotate', '--grace', '1h');
  assert.equal(rot.code, 0, rot.stderr);
  assert.notEqual(rot.json.token, b.token);
  assert.ok(Date.parse(rot.json.previousUntil) > Date.now() + 3_000_000);
  assert.equal(await syncCode(), 'ok', 'the old token is taken during the grace period');
  const shown = await cli(b, 'token', 'show');
  assert.deepEqual([shown.json.token, shown.json.previousStillTaken], [rot.json.token, true]);

  // A wrong token is refused by the check and changes nothing; the right one is recorded.
  const before = (await cli(a, 'peer', 'list')).json.peers;
  const bad = await cli(a, 'peer', 'update', 'cloud', '--token', 'z'.repeat(43));
  assert.equal(bad.code, 1, bad.stderr);
  assert.equal(bad.json.error.code, 'ERR_UNAUTHORIZED');
  assert.deepEqual((await cli(a, 'peer', 'list')).json.peers, before, 'nothing changed');
  const up = await cli(a, 'peer', 'update', 'cloud', '--token', rot.json.token);
  assert.equal(up.code, 0, up.stderr);
  assert.deepEqual(up.json.changed, ['token']);
  assert.equal(await syncCode(), 'ok');
  assert.equal((await cli(a, 'peer', 'update', 'nope', '--token', rot.json.token)).json.error.code, 'ERR_PEER_NOT_FOUND');
  assert.equal((await cli(a, 'peer', 'update', 'cloud', '--no-check')).code, 2, 'nothing to change and nothing to check is a usage error');

  // --grace 0 (a leaked token): refused within a second, whatever the grace of the one before.
  const revoked = await cli(b, 'token', 'rotate', '--grace', '0');
  assert.equal(revoked.json.previousUntil, null);
  await delay(1100);
  assert.equal(await syncCode(), 'ERR_UNAUTHORIZED');
  assert.equal((await cli(a, 'peer', 'update', 'cloud', '--token', revoked.json.token)).code, 0);
  assert.equal(await syncCode(), 'ok');

  // A grace period ends by itself.
  const short = await cli(b, 'token', 'rotate', '--grace', '2s');
  assert.equal(await syncCode(), 'ok');
  await delay(3100);
  assert.equal(await syncCode(), 'ERR_UNAUTHORIZED', 'the grace period is over');
  assert.equal((await cli(a, 'peer', 'update', 'cloud', '--token', short.json.token)).code, 0);
  assert.equal(await syncCode(), 'ok');
  assert.equal((await cli(b, 'token', 'rotate', '--grace', 'soon')).code, 2);
});

test('a peer that refuses the sync (token, certificate) stops the scan at once: an error within a round trip, no local snapshot', async (t) => {
  // 256 MiB of blocks new to the store: the scan writes them all, which takes far longer than a
  // round trip to the peer (early sending asks about the first 16 blocks, 1 MiB, at once).
  const { a, b, sb, dir } = await pairedWithVolume(t, 4096);
  const snapshots = async () => ((await cli(a, 'snapshots', 'vol')).json as unknown[]).length;
  const stale = 'y'.repeat(43);
  assert.equal((await cli(a, 'peer', 'add', 'stale', '--url', sb.url, '--token', stale, '--fingerprint', b.fingerprint, '--no-check')).code, 0);
  assert.equal((await cli(a, 'peer', 'add', 'impostor', '--url', sb.url, '--token', b.token, '--fingerprint', otherFingerprint(), '--no-check')).code, 0);

  const refused = await cli(a, 'sync', 'vol', '--peer', 'stale');
  assert.equal(refused.code, 1, refused.stderr);
  assert.equal(refused.json.error.code, 'ERR_UNAUTHORIZED');
  assert.match(refused.json.error.message, /refused our token/);
  assert.equal(await snapshots(), 0, 'the scan stopped when early sending met the 401: no local snapshot');

  // A wrong certificate is known when the warm-up handshake ends, before any request.
  const impostor = await cli(a, 'sync', 'vol', '--peer', 'impostor');
  assert.equal(impostor.code, 1, impostor.stderr);
  assert.equal(impostor.json.error.code, 'ERR_PEER_FINGERPRINT');
  assert.equal(await snapshots(), 0, 'the scan stopped at the handshake: no local snapshot');

  // Nothing new to send (a pre hook holds the scan back, as a filesystem freeze can): early
  // sending asks nothing, so the probe finds out. TANDEM_PEER_PROBE_MS=0 sends it at once.
  const log = join(dir, 'hooks.log');
  const config = join(a.dir, 'config.yaml');
  const plain = readFileSync(config, 'utf8');
  appendFileSync(config, `groups:\n  g:\n    volumes: [vol]\n    hooks:\n      pre: "echo pre >> ${log}; sleep 30"\n      post: "echo post >> ${log}"\n      timeout: 60s\n`);
  const started = Date.now();
  const probed = await collect(spawnCli(['--home', a.dir, '--json', 'sync', 'vol', '--peer', 'stale'], { env: { TANDEM_PEER_PROBE_MS: '0' } }));
  const secs = (Date.now() - started) / 1000;
  assert.equal(probed.code, 1, probed.stderr);
  assert.equal(JSON.parse(probed.stdout).error.code, 'ERR_UNAUTHORIZED', 'the refusal is reported, not the pre hook it stopped');
  assert.ok(secs < 20, `the 30 s pre hook was stopped by the refusal (${secs.toFixed(1)} s)`);
  // Under load the refusal can come before the pre hook's shell has written anything.
  assert.match(readFileSync(log, 'utf8'), /^(pre\n)?post\n$/, 'the post hook ran after the stopped pre hook');
  assert.equal(await snapshots(), 0);

  // The same sync to the right peer goes through (the refusals changed nothing).
  writeFileSync(config, plain);
  const ok = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(await snapshots(), 1);

  // A peer that does not answer is no refusal: the operator is told at once, the scan goes on
  // and its snapshot is kept (a local restore point), and the sync fails when it tries again.
  const closed = createServer();
  closed.listen(0, '127.0.0.1');
  await once(closed, 'listening');
  const port = (closed.address() as AddressInfo).port;
  await new Promise<void>((r) => closed.close(() => r()));
  assert.equal((await cli(a, 'peer', 'add', 'down', '--url', `https://127.0.0.1:${port}`, '--token', b.token, '--fingerprint', b.fingerprint, '--no-check')).code, 0);
  const down = await cli(a, 'sync', 'vol', '--peer', 'down');
  assert.equal(down.code, 1, down.stderr);
  assert.equal(down.json.error.code, 'ERR_PEER_UNREACHABLE');
  assert.match(down.stderr, /note: peer down does not answer \(ECONNREFUSED\): the scan goes on/);
  assert.equal(await snapshots(), 2, 'the scan went on: its snapshot is kept');
});

test('a push the peer would refuse for this volume (another appliance is its source, another block size) stops during the scan: the probe asks with the lock request', async (t) => {
  const { a, b, sb, dir } = await pairedWithVolume(t, 4096);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const snapshots = async () => ((await cli(a, 'snapshots', 'vol')).json as unknown[]).length;
  const probeNow = { env: { TANDEM_PEER_PROBE_MS: '0' } };
  // Another site replicates a volume of the same name to b first.
  const site2 = await initHome(t, 'site2');
  await pair(site2, 'cloud', b, sb);
  const img2 = join(dir, 'site2.img');
  writeRandom(img2, 16 * 64 * 1024);
  assert.equal((await cli(site2, 'volume', 'add', 'vol', '--path', img2, '--block-size', '64KiB')).code, 0);
  assert.equal((await cli(site2, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const before = await peerB.stats();
  const taken = await collect(spawnCli(['--home', a.dir, '--json', 'sync', 'vol', '--peer', 'cloud'], probeNow));
  assert.equal(taken.code, 1, taken.stderr);
  assert.equal(JSON.parse(taken.stdout).error.code, 'ERR_VOLUME_NAME_TAKEN');
  assert.equal(await snapshots(), 0, 'the scan stopped at the refusal: no local snapshot');
  const after = await peerB.stats();
  assert.ok(after.blocksReceived - before.blocksReceived < 4096 / 2, `far fewer blocks than the volume travelled (${after.blocksReceived - before.blocksReceived} of 4096)`);

  // The name is free again; a replicates, then registers the volume anew with another block size.
  assert.equal((await cli(b, 'volume', 'remove', 'vol')).code, 0);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const onB = (await cli(b, 'snapshots', 'vol')).json;
  const img = (await cli(a, 'volume', 'list')).json.find((v: { name: string }) => v.name === 'vol').path as string;
  assert.equal((await cli(a, 'volume', 'remove', 'vol')).code, 0);
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', '128KiB')).code, 0);
  const other = await collect(spawnCli(['--home', a.dir, '--json', 'sync', 'vol', '--peer', 'cloud'], probeNow));
  assert.equal(other.code, 1, other.stderr);
  const err = JSON.parse(other.stdout).error;
  assert.equal(err.code, 'ERR_BLOCK_SIZE_MISMATCH');
  assert.match(err.message, /blocks of 65536 bytes.*--block-size 65536/);
  assert.equal(await snapshots(), 0);
  // Without the probe (a scan shorter than it), the lock's answer stops the push before the engine sends anything.
  const late = await collect(spawnCli(['--home', a.dir, '--json', 'sync', 'vol', '--peer', 'cloud'], { env: { TANDEM_PEER_PROBE_MS: '-1' } }));
  assert.equal(late.code, 1, late.stderr);
  assert.equal(JSON.parse(late.stdout).error.code, 'ERR_BLOCK_SIZE_MISMATCH');
  assert.deepEqual((await cli(b, 'snapshots', 'vol')).json, onB, 'the peer committed nothing');
});

test('two concurrent syncs of one volume: the second gets ERR_VOLUME_LOCKED, locally and on the peer', async (t) => {
  const { a, b, sb, dir } = await pairedWithVolume(t, 64);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  // Another appliance with a volume of the same name, paired with the same peer.
  const c = await initHome(t, 'branch');
  await pair(c, 'cloud', b, sb);
  const img = join(dir, 'other.img');
  writeRandom(img, 2 * BS);
  assert.equal((await cli(c, 'volume', 'add', 'vol', '--path', img, '--block-size', '64KiB')).code, 0);
  // A slow first sync (256 KiB/s for 4 MiB) holds both locks for ~16 s: long enough for two more
  // CLI processes to start on a loaded machine before it ends.
  const first = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '256KiB');
  // Blocks may travel while the first sync still scans (early sending, before any lease): wait
  // until it holds the peer's lease and streams blocks under it.
  await until(async () => {
    const s = await peerB.stats();
    return (s.routes['POST /v1/volumes/:vol/lock'] ?? 0) > 0 && s.blocksReceived > 0;
  }, 'the first sync to take the lease and stream blocks');
  const [second, third] = await Promise.all([cli(a, 'sync', 'vol', '--peer', 'cloud'), cli(c, 'sync', 'vol', '--peer', 'cloud')]);
  assert.equal(second.code, 1, second.stderr);
  assert.equal(second.json.error.code, 'ERR_VOLUME_LOCKED', 'locally');
  assert.equal(third.code, 1, third.stderr);
  assert.equal(third.json.error.code, 'ERR_VOLUME_LOCKED', 'on the peer (its lease)');
  const done = await first.done;
  assert.equal(done.code, 0, done.stderr);
  assert.ok(!existsSync(join(a.dir, 'locks', 'vol.lock')), 'the lock is released');
});

test("a manual sync to the replication peer follows config.yaml's cap unless --bwlimit is given; a config it cannot read stops it before anything is sent", async (t) => {
  const { a, b, sb, img } = await pairedWithVolume(t, 48); // 3 MiB
  await pair(a, 'cloud2', b, sb); // the same appliance under a name the config does not give the cap to
  const config = join(a.dir, 'config.yaml');
  writeFileSync(config, 'appliance: { name: onprem }\nreplication:\n  peer: cloud\n  bwlimit: 1MiB\n');
  const snapshots = async (home: TestHome) => ((await cli(home, 'snapshots', 'vol')).json as unknown[]).length;
  const change = (block: number) => {
    const fd = openSync(img, 'r+');
    writeSync(fd, randomBytes(4096), 0, 4096, block * BS);
    closeSync(fd);
  };

  // 3 MiB at 1 MiB/s after the bucket's 256 KiB burst: 2.75 s at least.
  const start = Date.now();
  const capped = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  const took = (Date.now() - start) / 1000;
  assert.equal(capped.code, 0, capped.stderr);
  assert.equal(capped.json.blocksSent, 48);
  assert.match(capped.stderr, /note: block traffic capped at 1\.0 MiB\/s now by config\.yaml replication\.bwlimit; --bwlimit RATE sets this command's own cap \(0: none\)/);
  assert.ok(took >= 2.2, `the sync took ${took} s: the configured cap was not applied`);
  assert.deepEqual((await cli(a, 'status')).json.replication, { peer: 'cloud', capNow: 1024 * 1024, scheduled: false }, 'status says why');

  // --bwlimit 0 lifts it; a peer other than replication.peer is not capped by it.
  for (const [i, args] of [[1, ['--peer', 'cloud', '--bwlimit', '0']], [2, ['--peer', 'cloud2']]] as const) {
    change(i);
    const r = await cli(a, 'sync', 'vol', ...args);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.json.blocksSent, 1);
    assert.doesNotMatch(r.stderr, /block traffic/, args.join(' '));
  }

  // A schedule: its window's cap now, followed as the sync runs.
  writeFileSync(config, 'appliance: { name: onprem }\nreplication:\n  peer: cloud\n  schedule: [{ bwlimit: 2MiB }]\n');
  change(3);
  const scheduled = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(scheduled.code, 0, scheduled.stderr);
  assert.match(scheduled.stderr, /capped at 2\.0 MiB\/s now by config\.yaml replication\.schedule \(followed as the sync runs\)/);
  assert.match((await cliText(['--home', a.dir, 'status'])).stdout, /replication to cloud: capped at 2\.0 MiB\/s now \(config\.yaml replication\.schedule\)/);

  // A config that does not parse: refused before the snapshot, nothing sent; --bwlimit does not read it.
  writeFileSync(config, 'appliance: { name: onprem }\nreplication:\n  peer: cloud\n  schedule: [{ days: [someday], bwlimit: 1MiB }]\n');
  change(4);
  const [mine, theirs] = [await snapshots(a), await snapshots(b)];
  const refused = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(refused.code, 1, refused.stderr);
  assert.equal(refused.json.error.code, 'ERR_CONFIG_INVALID');
  assert.match(refused.json.error.message, /config\.yaml:4: replication\.schedule\.0\.days: "someday" is not a day.*for the replication cap; with --bwlimit RATE \(0: no cap\) it runs without reading it/s);
  assert.deepEqual([await snapshots(a), await snapshots(b)], [mine, theirs], 'no snapshot taken or sent');
  const anyway = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '0');
  assert.equal(anyway.code, 0, anyway.stderr);
  assert.equal(anyway.json.blocksSent, 1);
  assert.equal(anyway.json.paused, undefined);
  assert.doesNotMatch(anyway.stderr, /paused/);

  // Paused, a manual sync runs anyway and says so (stderr and json.paused); resumed, it is quiet again.
  assert.equal((await cli(a, 'pause', 'vol', '--reason', 'disk swap')).code, 0);
  change(5);
  const whilePaused = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '0');
  assert.equal(whilePaused.code, 0, whilePaused.stderr);
  assert.equal(whilePaused.json.blocksSent, 1);
  assert.equal(whilePaused.json.paused.reason, 'disk swap');
  assert.match(whilePaused.stderr, /note: the scheduled jobs of vol are paused \(by .+ until `appliance resume`: disk swap\); this manual sync runs anyway, and `appliance resume vol` starts them again/);
  assert.equal((await cli(a, 'resume', 'vol')).code, 0);
  change(6);
  const resumed = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '0');
  assert.equal(resumed.json.paused, undefined);
  assert.doesNotMatch(resumed.stderr, /paused/);
});

test('volume remove of a received volume, killed at each of its synced index writes, leaves the volume and its source record both or neither; the rerun ends it', async (t) => {
  // strace kills the CLI at its Nth fdatasync (LevelDB's synced writes). Killed between the
  // removal and the deletion of the source record, a removal used to leave a record that refused
  // the next push of the name (ERR_VOLUME_NAME_TAKEN), with no volume left to remove.
  if (spawnSync('strace', ['-V']).status !== 0) return t.skip('strace is not installed (apt-get install -y strace)');
  const { a, b, sb } = await pairedWithVolume(t, 4);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  await sb.stop();
  const template = join(tempDir(t), 'template');
  cpSync(b.dir, template, { recursive: true });
  const { NODE_EXTRA_CA_CERTS: _slow, ...env } = process.env;
  const states = new Set<string>();
  for (let n = 1; n <= 6; n++) {
    rmSync(b.dir, { recursive: true, force: true });
    cpSync(template, b.dir, { recursive: true });
    const run = spawnSync('strace', ['-f', '-o', '/dev/null', '-e', 'trace=fdatasync', '-e', `inject=fdatasync:signal=SIGKILL:when=${n}`, process.execPath, DIST_MAIN, 'volume', 'remove', 'vol', '--home', b.dir, '--json'], { encoding: 'utf8', env });
    const home = Home.load(b.dir);
    const store = await home.openStore();
    let volume: unknown, source: unknown;
    try {
      volume = await store.getVolume('vol');
      source = await store.getMeta(SOURCES_NS, 'vol');
    } finally {
      await store.close();
    }
    assert.equal(volume === undefined || volume === null, source === undefined, `fdatasync ${n} (exit ${run.status}): the volume ${volume ? 'stays' : 'is gone'} and its source record ${source ? 'stays' : 'is gone'}`);
    states.add(volume ? 'kept' : 'removed');
    if (volume) {
      const rerun = await cli(b, 'volume', 'remove', 'vol');
      assert.equal(rerun.code, 0, rerun.stderr);
    }
  }
  assert.deepEqual([...states].sort(), ['kept', 'removed'], 'the kills landed before and after the removal');
});

/** A TLS-terminating proxy (with the peer's own key, so pinning passes) that damages block uploads. */
/** `only`: damage the first frame of that blocks/put request alone (1 for the first), not of each. */
async function damagingProxy(t: Parameters<typeof tempDir>[0], b: TestHome, upstream: string, mode: 'corrupt' | 'truncate' | 'truncate-answer', only?: number): Promise<string> {
  const tls = { key: readFileSync(join(b.dir, 'tls', 'key.pem')), cert: readFileSync(join(b.dir, 'tls', 'cert.pem')) };
  let puts = 0;
  let gets = 0;
  const server: Server = createServer(tls, (req, res) => {
    // 'truncate-answer': the `only`-th blocks/get answer ends (cleanly) in its first frame.
    const cutAnswer = mode === 'truncate-answer' && req.url === '/v1/blocks/get' && ++gets === only;
    const up = httpsRequest(new URL(req.url!, upstream), { method: req.method, headers: { ...req.headers, host: new URL(upstream).host }, rejectUnauthorized: false }, (ur) => {
      res.writeHead(ur.statusCode!, ur.headers);
      if (!cutAnswer) return void ur.pipe(res);
      let seen = 0;
      ur.on('data', (c: Buffer) => {
        if (seen >= HEADER_BYTES + 1000) return;
        res.write(c.subarray(0, HEADER_BYTES + 1000 - seen));
        seen += c.length;
        if (seen >= HEADER_BYTES + 1000) {
          res.end();
          ur.destroy();
        }
      });
    });
    up.on('error', () => res.destroy());
    if (mode !== 'truncate-answer' && req.url === '/v1/blocks/put' && (only === undefined || ++puts === only)) {
      delete (up as unknown as { _headers?: unknown })._headers;
      let seen = 0;
      const cut = HEADER_BYTES + 1000;
      const damage = new Transform({
        transform(chunk: Buffer, _enc, cb) {
          const c = Buffer.from(chunk);
          if (mode === 'corrupt' && seen <= HEADER_BYTES + 100 && seen + c.length > HEADER_BYTES + 100) c[HEADER_BYTES + 100 - seen]! ^= 0xff;
          if (mode === 'truncate') {
            if (seen >= cut) return cb();
            const keep = c.subarray(0, Math.max(0, cut - seen));
            seen += c.length;
            if (only !== undefined && seen >= cut) {
              // The upload ends here for the server too (it answers at once), not only goes silent.
              this.push(keep);
              this.push(null);
              return cb();
            }
            return cb(null, keep);
          }
          seen += c.length;
          cb(null, c);
        },
      });
      req.pipe(damage).pipe(up);
    } else req.pipe(up);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
  return `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/**
 * A TLS-terminating proxy (the peer's own key) that answers as an appliance of a release before
 * node changes: nodes/put with `changed` and nodes/get with `bases` are refused as its schema
 * refuses unknown fields (400 ERR_BAD_REQUEST); everything else goes through.
 */
async function earlierReleaseProxy(t: Parameters<typeof tempDir>[0], b: TestHome, upstream: string): Promise<{ url: string; refused: string[]; forwarded: string[] }> {
  const tls = { key: readFileSync(join(b.dir, 'tls', 'key.pem')), cert: readFileSync(join(b.dir, 'tls', 'cert.pem')) };
  const refused: string[] = [];
  const forwarded: string[] = [];
  const server: Server = createServer(tls, (req, res) => {
    const forward = (body?: Buffer) => {
      const up = httpsRequest(new URL(req.url!, upstream), { method: req.method, headers: { ...req.headers, host: new URL(upstream).host }, rejectUnauthorized: false }, (ur) => {
        const { 'x-tandem-features': _features, ...headers } = ur.headers; // an earlier release names no features
        res.writeHead(ur.statusCode!, headers);
        ur.pipe(res);
      });
      up.on('error', () => res.destroy());
      if (body) up.end(body);
      else req.pipe(up);
    };
    if (req.url !== '/v1/nodes/put' && req.url !== '/v1/nodes/get' && req.url !== '/v1/blocks/get') return forward();
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const field = req.url === '/v1/nodes/put' ? 'changed' : 'bases'; // nodes/get and blocks/get: bases
      const parsed = JSON.parse(body.toString('utf8')) as { nodes?: Array<Record<string, unknown>>; bases?: unknown };
      const unknown = field === 'bases' ? parsed.bases !== undefined : (parsed.nodes ?? []).some((n) => n.changed !== undefined);
      forwarded.push(`${req.url} ${unknown ? 'with' : 'without'} ${field}`);
      if (!unknown) return forward(body);
      refused.push(req.url!);
      forwarded.pop();
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'ERR_BAD_REQUEST', message: `body must NOT have additional properties (${field})` } }));
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
  return { url: `https://127.0.0.1:${(server.address() as AddressInfo).port}`, refused, forwarded };
}

test('a peer of an earlier release (no node changes) takes pushes and serves pulls: the client asks once, then sends and asks for whole nodes', async (t) => {
  // 70 level-1 nodes under a root: a change in each is two nodes/put requests (64 nodes each at most).
  const { a, b, sb, img } = await pairedWithVolume(t, 70 * 256, 4096);
  const old = await earlierReleaseProxy(t, b, sb.url);
  assert.equal((await cli(a, 'peer', 'add', 'old', '--url', old.url, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const change = (blocks: number[]) => {
    const fd = openSync(img, 'r+');
    for (const i of blocks) writeSync(fd, randomBytes(512), 0, 512, i * 4096);
    closeSync(fd);
  };
  const first = await cli(a, 'sync', 'vol', '--peer', 'old');
  assert.equal(first.code, 0, first.stderr);
  assert.deepEqual(old.refused, [], 'no base yet: whole nodes');
  old.forwarded.length = 0;
  change(Array.from({ length: 70 }, (_, i) => i * 256 + 3));
  const second = await cli(a, 'sync', 'vol', '--peer', 'old');
  assert.equal(second.code, 0, second.stderr);
  assert.equal(second.json.blocksSent, 70);
  assert.deepEqual(old.refused, ['/v1/nodes/put'], 'the changes were refused once; both requests then went whole');
  assert.deepEqual(old.forwarded.filter((f) => f.startsWith('/v1/nodes/put')), ['/v1/nodes/put without changed', '/v1/nodes/put without changed']);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const stats = await peerB.stats();
  assert.equal(stats.deltasReceived, 0, 'a peer that names no block-delta feature gets whole blocks');
  assert.ok(second.json.wireBytes >= 70 * 4096, 'whole blocks on the wire');

  // A pull by an appliance that holds the first snapshot: its nodes/get names bases, is refused
  // once, and asks again without.
  const c = await initHome(t, 'other');
  assert.equal((await cli(c, 'peer', 'add', 'old', '--url', old.url, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0); // B's latest is the second snapshot
  const firstPull = await cli(c, 'sync', 'vol', '--peer', 'old', '--reverse');
  assert.equal(firstPull.code, 0, firstPull.stderr);
  change([7, 70 * 256 - 1]);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'old')).code, 0);
  old.refused.length = 0;
  const pulled = await cli(c, 'sync', 'vol', '--peer', 'old', '--reverse');
  assert.equal(pulled.code, 0, pulled.stderr);
  assert.equal(pulled.json.blocksSent, 2);
  assert.deepEqual(old.refused, ['/v1/nodes/get'], 'blocks/get never named bases: the peer names no block-delta feature');
  assert.ok(old.forwarded.includes('/v1/blocks/get without bases'));
  assert.equal((await cli(a, 'snapshots', 'vol')).json.at(-1).root, (await cli(c, 'snapshots', 'vol')).json.at(-1).root);
  assert.equal((await cli(c, 'verify')).code, 0);
});

test('a proxy that corrupts or truncates the block stream: ERR_BLOCK_CORRUPT, nothing stored', async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 8);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  for (const mode of ['corrupt', 'truncate'] as const) {
    const proxy = await damagingProxy(t, b, sb.url, mode);
    const added = await cli(a, 'peer', 'add', mode, '--url', proxy, '--token', b.token, '--fingerprint', b.fingerprint);
    assert.equal(added.code, 0, added.stderr);
    const before = await peerB.stats();
    const r = await cli(a, 'sync', 'vol', '--peer', mode);
    assert.equal(r.code, 1, r.stdout);
    if (r.json.error.code !== 'ERR_BLOCK_CORRUPT') {
      // Seen once under a loaded full run (ERR_PEER_NOT_FOUND right after a successful peer
      // add), not reproduced alone: keep what tells the two runs apart.
      assert.fail(`${mode}: ${r.stderr}\npeer add said: ${added.stdout}\n${await diagnose(a)}`);
    }
    const after = await peerB.stats();
    assert.equal(after.blocksStored, before.blocksStored, `${mode}: no block stored`);
    assert.equal(after.snapshotsCommitted, before.snapshotsCommitted);
    assert.equal(await peerB.latestSnapshot('vol'), null);
  }
  assert.equal((await cli(b, 'verify')).code, 0);
});

test('a corrupt block stream from a sender under --bwlimit is answered ERR_BLOCK_CORRUPT, not cut by the drain (reported as ERR_PEER_UNREACHABLE before)', async (t) => {
  // 3 MiB at 64 KiB/s: the sender is still sending after the server's 10 s drain (1 and 2 MiB
  // were not enough). The server used to read the rest of a failed upload first and answer
  // after; the drain's timer closed the connection before, and the sender saw the peer go away.
  const { a, b, sb } = await pairedWithVolume(t, 48);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const proxy = await damagingProxy(t, b, sb.url, 'corrupt');
  assert.equal((await cli(a, 'peer', 'add', 'corrupt', '--url', proxy, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const r = await cli(a, 'sync', 'vol', '--peer', 'corrupt', '--bwlimit', '64KiB');
  assert.equal(r.code, 1, r.stdout);
  assert.equal(r.json.error.code, 'ERR_BLOCK_CORRUPT', r.stderr);
  assert.equal((await peerB.stats()).snapshotsCommitted, 0);
  assert.equal(await peerB.latestSnapshot('vol'), null);
  assert.equal((await cli(b, 'verify')).code, 0);
});

test('the first block stream of a sync to fail ends the others at once: a push under --bwlimit whose one stream is cut short stops, not after the other streams sent their slices', async (t) => {
  // The blocks are stored by a snapshot first: the sync's scan finds nothing new, so nothing goes
  // early and the engine sends all 48 blocks on 3 streams of 16; the proxy cuts the first short
  // (its server sees the stream end mid-frame and answers at once).
  const { a, b, sb } = await pairedWithVolume(t, 48);
  assert.equal((await cli(a, 'snapshot', 'vol')).code, 0);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const proxy = await damagingProxy(t, b, sb.url, 'truncate', 1);
  assert.equal((await cli(a, 'peer', 'add', 'corrupt', '--url', proxy, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const r = await cli(a, 'sync', 'vol', '--peer', 'corrupt', '--bwlimit', '64KiB');
  assert.equal(r.code, 1, r.stdout);
  assert.equal(r.json.error.code, 'ERR_BLOCK_CORRUPT', r.stderr);
  // The other two streams' 32 blocks take 32 s at 64 KiB/s: had they run to their end, the peer
  // would have received them all.
  const stats = await peerB.stats();
  assert.ok(stats.blocksReceived < 16, `the other streams were ended: the peer received ${stats.blocksReceived} blocks (their 32 alone, sent to the end, make 32 or more)`);
  assert.equal(stats.snapshotsCommitted, 0);
  // The rerun through the peer itself completes: only what it lacks travels.
  const again = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.json.blocksSent, 48 - stats.blocksStored);
  assert.equal((await cli(b, 'verify')).code, 0);
});

test('the first block stream of a pull to fail ends the others at once: a failback pull under --bwlimit whose one answer is cut short stops, not after the other answers arrived', async (t) => {
  // B holds the volume; C, rebuilt, pulls it through a proxy that ends the first blocks/get
  // answer in its first frame. 48 blocks of 64 KiB on 3 streams of 16: at 64 KiB/s the other
  // two answers take 32 s to arrive whole.
  const { a, b, sb } = await pairedWithVolume(t, 48);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const c = await initHome(t, 'rebuilt');
  const proxy = await damagingProxy(t, b, sb.url, 'truncate-answer', 1);
  assert.equal((await cli(c, 'peer', 'add', 'cut', '--url', proxy, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const started = Date.now();
  const r = await cli(c, 'sync', 'vol', '--peer', 'cut', '--reverse', '--bwlimit', '64KiB');
  const took = (Date.now() - started) / 1000;
  assert.equal(r.code, 1, r.stdout);
  assert.ok(took < 16, `the pull reported its failure after ${took.toFixed(1)} s: the other streams ran on (their 2 MiB alone take 32 s)`);
  // Nothing half-pulled is committed; the pull through the peer itself then completes.
  assert.equal(r.json.error.code, 'ERR_BLOCK_CORRUPT', r.stderr);
  assert.equal((await cli(c, 'snapshots', 'vol')).json.error.code, 'ERR_VOLUME_NOT_FOUND', 'nothing of the pull was committed');
  await pair(c, 'cloud', b, sb);
  const again = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(again.code, 0, again.stderr);
  assert.equal((await cli(c, 'verify')).code, 0);
});

test('a peer that sends a tree naming a block of the wrong length for its place (a 1-byte block for a 512 KiB one) gets ERR_SNAPSHOT_INVALID at its commit: nothing committed, verify stays clean', async (t) => {
  const { b, sb } = await pairedWithVolume(t, 8);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const tiny = Buffer.from([7]);
  const h = blake3(tiny);
  await peerB.putBlocks((async function* () {
    yield { hash: h, data: tiny };
  })());
  const node = makeNode(1, [h, h]);
  await peerB.putNodes([node]);
  const lock = await peerB.lockVolume('odd', 'a-faulty-peer');
  assert.ok(lock.lease);
  const snap = { id: '20260101T000000.000Z-aaaaaa', volume: 'odd', size: 2 * 512 * 1024, blockSize: 512 * 1024, root: node.hash.toString('hex'), height: 1, created: '2026-01-01T00:00:00.000Z', parent: null, origin: 'scan', nonZeroBlocks: 2 };
  await assert.rejects(peerB.commitSnapshot(snap), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && /block 0 a block of 1 bytes where 524288 belong/.test(e.message));
  assert.equal(await peerB.latestSnapshot('odd'), null, 'nothing committed');
  const v = await cli(b, 'verify');
  assert.equal(v.code, 0, v.stdout);
});

/**
 * An upload that begins a 16 MiB frame, sends 1 MiB of it and goes silent (a sender that hung, or
 * one that means to hold the receiver's memory). Resolves `closed` when the server ends it.
 */
function stalledUpload(sb: { url: string }, token: string): { closed: Promise<void>; destroy: () => void } {
  const u = new URL(sb.url);
  const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/blocks/put', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' } });
  req.on('response', (res) => res.resume());
  const closed = new Promise<void>((resolve) => {
    req.on('error', () => resolve());
    req.on('close', () => resolve());
  });
  const h = Buffer.alloc(HEADER_BYTES);
  h[0] = 0x42; // a block frame, raw
  randomBytes(32).copy(h, 2);
  h.writeUInt32BE(16 * 1024 * 1024, 34);
  h.writeUInt32BE(16 * 1024 * 1024, 38);
  req.write(h);
  req.write(randomBytes(1024 * 1024));
  return { closed, destroy: () => req.destroy() };
}

/** An upload opened with no frame sent yet (as an early-sending stream waiting for its first batch). */
function idleUpload(sb: { url: string }, token: string): { destroy: () => void } {
  const u = new URL(sb.url);
  const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/blocks/put', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' } });
  req.on('error', () => undefined);
  req.flushHeaders();
  return { destroy: () => req.destroy() };
}

test('uploads whose senders go silent mid-frame are ended, and take at most 8 slots meanwhile: a sync waits for one (or, past its wait, gets ERR_SERVER_BUSY); uploads idle between frames take none; the memory they hold stays bounded', async (t) => {
  const { b, sb: first } = await pairedWithVolume(t, 8);
  await first.stop();
  const block = randomBytes(64 * 1024);
  const frames = () => (async function* () {
    yield { hash: blake3(block), data: block };
  })();

  // Silent mid-frame for 0.5 s: ended. A ninth upload waits for a slot, then gets through.
  const sb = await startServe(t, b, '127.0.0.1:0', { TANDEM_STALL_MS: '500', TANDEM_STREAM_WAIT_MS: '20000', TANDEM_BODY_MS: '500' });
  {
    // A JSON body that never arrives whole (8 MiB allowed) is not held: the connection is closed.
    const u = new URL(sb.url);
    const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/nodes/has', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${b.token}`, 'content-type': 'application/json', 'content-length': '1000000' } });
    const closed = new Promise<void>((resolve) => {
      req.on('error', () => resolve());
      req.on('close', () => resolve());
    });
    req.on('response', (res) => res.resume());
    req.write('{"hashes": ["');
    await Promise.race([closed, delay(5000).then(() => assert.fail('a JSON body that stopped midway was held past 5 s'))]);
    assert.match(sb.stderr(), /its body did not arrive whole within 0\.5 s/);
  }
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const stalled = Array.from({ length: 8 }, () => stalledUpload(sb, b.token));
  await delay(300); // each has its slot
  const started = Date.now();
  const r = await peerB.putBlocks(frames());
  assert.equal(r.stored, 1, 'the ninth upload got a slot once the silent ones were ended');
  await Promise.race([Promise.all(stalled.map((s) => s.closed)), delay(5000).then(() => assert.fail('the server did not end every silent upload within 5 s'))]);
  assert.ok(Date.now() - started < 5000);
  assert.match(sb.stderr(), /stalled/, 'the server says why it ended them');
  await sb.stop();

  // Silent uploads that hold every slot past a waiting sync's patience: ERR_SERVER_BUSY, nothing stored.
  const busy = await startServe(t, b, '127.0.0.1:0', { TANDEM_STALL_MS: '60000', TANDEM_STREAM_WAIT_MS: '300' });
  const peerBusy = peerClient(b, busy);
  t.after(() => peerBusy.close());
  // Uploads open but between frames (an early-sending stream waiting for the scan) hold no slot.
  const idle = Array.from({ length: 12 }, () => idleUpload(busy, b.token));
  await delay(300);
  assert.equal((await peerBusy.putBlocks(frames())).stored, 0, 'with 12 uploads idle between frames, a sync is not kept waiting (the block was stored before)');
  for (const i of idle) i.destroy();
  const holding = Array.from({ length: 8 }, () => stalledUpload(busy, b.token));
  await delay(300);
  const before = await peerBusy.stats();
  await assert.rejects(peerBusy.putBlocks(frames()), (e: any) => e.code === 'ERR_SERVER_BUSY' && /Rerun the sync shortly/.test(e.message));
  assert.equal((await peerBusy.stats()).blocksReceived, before.blocksReceived);
  for (const h of holding) h.destroy();
  await Promise.all(holding.map((h) => h.closed));
  assert.equal((await peerBusy.putBlocks(frames())).stored, 0, 'slots come back when their uploads end (the block was stored before)');
});

test("the receiver's disk fills up: ERR_DISK_FULL from the peer, its store intact; with space again the same server takes the rerun, which sends only the blocks it lacks", async (t) => {
  const mnt = smallTmpfs(t, '8m');
  if (!mnt) return;
  const a = await initHome(t, 'onprem');
  const init = await cli(join(mnt, 'home'), 'init', '--name', 'cloud');
  assert.equal(init.code, 0, init.stderr);
  const b: TestHome = { dir: join(mnt, 'home'), name: 'cloud', token: init.json.token, fingerprint: init.json.fingerprint };
  const sb = await startServe(t, b);
  await pair(a, 'cloud', b, sb);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  // 24 MiB of distinct blocks for a store on 8 MiB.
  const blocks = 384;
  const data = randomBytes(blocks * BS);
  const img = join(tempDir(t, 'tandem-full-src-'), 'disk.img');
  writeFileSync(img, data);
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', '64KiB')).code, 0);
  const hashes = Array.from({ length: blocks }, (_, i) => blake3(data.subarray(i * BS, (i + 1) * BS)));
  // A volume the peer holds before its disk fills: it must stay whole.
  const small = randomBytes(16 * BS);
  const smallImg = join(tempDir(t, 'tandem-full-small-'), 'small.img');
  writeFileSync(smallImg, small);
  assert.equal((await cli(a, 'volume', 'add', 'small', '--path', smallImg, '--block-size', '64KiB')).code, 0);
  assert.equal((await cli(a, 'sync', 'small', '--peer', 'cloud')).code, 0);

  const full = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(full.code, 1, full.stdout);
  assert.equal(full.json.error.code, 'ERR_DISK_FULL', full.stderr);
  assert.match(full.json.error.message, /peer cloud.*free space/);
  assert.equal(await peerB.latestSnapshot('vol'), null, 'no snapshot committed on the full peer');
  assert.equal((await cli(b, 'verify')).code, 0, 'the full store verifies');
  const smallOut = join(tempDir(t, 'tandem-full-out-'), 'small.img');
  assert.equal((await cli(b, 'restore', 'small', '--to', smallOut)).code, 0);
  assert.ok(sameBytes(smallOut, small), 'what the peer held before restores byte-exact');
  // Blocks of batches it flushed before the disk filled stay (often some, none if the first failed).
  const held = (await peerB.hasBlocks(hashes)).filter(Boolean).length;
  assert.ok(held < blocks);
  t.diagnostic(`the peer kept ${held} of ${blocks} blocks from the failed sync`);

  execFileSync('mount', ['-o', 'remount,size=64m', mnt]);
  const before = await peerB.stats();
  const again = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(again.code, 0, again.stderr);
  const after = await peerB.stats();
  assert.equal(after.blocksReceived - before.blocksReceived, blocks - held, 'the rerun sent exactly the blocks the peer lacked');
  assert.equal((await cli(b, 'verify')).code, 0);
  const out = join(tempDir(t, 'tandem-full-out-'), 'r.img');
  assert.equal((await cli(b, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, data), 'the peer restores the volume byte-exact');
});

test('peer add of the appliance itself is refused, with or without contacting it: it would report volumes replicated with no second copy', async (t) => {
  const a = await initHome(t, 'onprem');
  const sa = await startServe(t, a);
  const checked = await cli(a, 'peer', 'add', 'self', '--url', sa.url, '--token', a.token, '--fingerprint', a.fingerprint);
  assert.equal(checked.code, 2, checked.stderr);
  assert.equal(checked.json.error.code, 'ERR_USAGE');
  assert.match(checked.json.error.message, /this appliance itself/);
  const unchecked = await cli(a, 'peer', 'add', 'self', '--url', sa.url, '--token', a.token, '--fingerprint', a.fingerprint.replace(/:/g, '').toLowerCase(), '--no-check');
  assert.equal(unchecked.json.error.code, 'ERR_USAGE');
  const list = await cli(a, 'peer', 'list');
  assert.deepEqual(list.json.peers, [], 'nothing was added');
});

test('Ctrl-C stops a sync at a safe point: from a one-shot CLI and from a CLI whose command a running server runs; exit 130, ERR_INTERRUPTED in the audit log, nothing committed on the peer; the next sync completes', async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 128); // 8 MiB at 1 MiB/s: a sync of ~8 s
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  /** Start a capped sync, Ctrl-C it once it has sent blocks for a while, and wait for its end. */
  const interrupt = async () => {
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '1MiB');
    await delay(2000);
    run.child.kill('SIGINT');
    return run.done;
  };
  const oneShot = await interrupt();
  assert.equal(oneShot.signal, 'SIGINT', `ends by the signal, as a shell expects, once stopped: ${oneShot.stderr}`);
  assert.equal(oneShot.json.error.code, 'ERR_INTERRUPTED', oneShot.stderr);
  assert.equal(await peerB.latestSnapshot('vol'), null, 'nothing committed on the peer');
  const sa = await startServe(t, a);
  const forwarded = await interrupt();
  assert.equal(forwarded.code, 130, forwarded.stderr);
  assert.match(forwarded.stderr, /was told to stop `appliance sync`/);
  await delay(1000); // the server stops it at its next check
  assert.equal(await peerB.latestSnapshot('vol'), null, 'nothing committed on the peer');
  const audit = await cli(a, 'audit');
  const entries = (audit.json.entries as Array<{ command: string[]; exitCode: number; error?: string; forwarded?: boolean }>).filter((e) => e.command.includes('sync'));
  assert.deepEqual(entries.map((e) => [e.exitCode, e.error, e.forwarded === true]), [[130, "ERR_INTERRUPTED", false], [130, "ERR_INTERRUPTED", true]], JSON.stringify(entries) + sa.stderr().slice(-3000));
  await sa.stop();
  const done = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(done.code, 0, done.stderr);
  assert.ok(await peerB.latestSnapshot('vol'));
});

test('a command killed (kill -9) after it started stays in the audit log, as started with no end; a later run of it ends on record', async (t) => {
  const { a } = await pairedWithVolume(t, 128); // 8 MiB at 1 MiB/s: a sync of ~8 s
  const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '1MiB');
  await delay(1500);
  run.child.kill('SIGKILL');
  await run.done;
  type Entry = { command: string[]; exitCode?: number; started?: boolean };
  const syncs = async () => ((await cli(a, 'audit')).json.entries as Entry[]).filter((e) => e.command.includes('sync'));
  assert.deepEqual((await syncs()).map((e) => [e.started, e.exitCode]), [[true, undefined]]);
  assert.match((await cliText(['--home', a.dir, 'audit'])).stdout, /started, no end recorded \(killed, or the machine stopped\) {2}appliance .*sync vol --peer cloud --bwlimit 1MiB/);
  const done = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(done.code, 0, done.stderr);
  assert.deepEqual((await syncs()).map((e) => [e.started, e.exitCode]), [[true, undefined], [undefined, 0]], 'its start record is not listed once it ended');
});

test("an index write the disk fails (EIO) on a running server: pushes get ERR_IO, doctor names the failed index, and once the disk takes writes again the server reopens its index by itself and the push completes", async (t) => {
  if (spawnSync('strace', ['-V']).status !== 0) return t.skip('strace is not installed (apt-get install -y strace)');
  const { a, b, sb: first } = await pairedWithVolume(t, 8);
  // The first reopen try 4 s after the failure: doctor sees the failure before it.
  await first.stop();
  const sb = await startServe(t, b, '127.0.0.1:0', { TANDEM_INDEX_REOPEN_MS: '4000' });
  assert.equal((await cli(a, 'peer', 'update', 'cloud', '--url', sb.url)).code, 0);
  // Every fdatasync of the server from now on fails: LevelDB's first synced write meets EIO and
  // it refuses every later write until the index is reopened.
  const tracer = spawn('strace', ['-f', '-p', String(sb.child.pid), '-o', '/dev/null', '-e', 'trace=fdatasync', '-e', 'inject=fdatasync:error=EIO:when=1+'], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.after(() => void tracer.kill('SIGKILL'));
  let traced = '';
  tracer.stderr!.on('data', (d: Buffer) => void (traced += d.toString()));
  await until(() => /attached/.test(traced), 'strace to attach');
  const push = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(push.code, 1, push.stderr);
  assert.equal(push.json.error.code, 'ERR_IO', JSON.stringify(push.json));
  assert.match(push.json.error.message, /index failed a write .*reopened, which a running appliance tries by itself/);
  const doctor = await cli(b, 'doctor'); // run by b's server, which holds the store
  const index = (doctor.json.checks as Array<{ check: string; status: string; fix?: string }>).find((c) => c.check === 'store index');
  assert.equal(index?.status, 'fail', JSON.stringify(doctor.json));
  assert.match(index!.fix!, /free space on it; if this stays after that, restart the appliance/);
  // While the disk still fails, the reopen tries probe it and leave the index as it is.
  await delay(5000);
  assert.equal((await cli(b, 'doctor')).json.checks.find((c: { check: string }) => c.check === 'store index')?.status, 'fail', 'still failed: the disk refuses writes');
  tracer.kill('SIGKILL');
  await once(tracer, 'exit');
  // The disk takes writes again: the next try (8 s after the one before) reopens the index.
  let again: Awaited<ReturnType<typeof cli>> | undefined;
  for (let i = 0; i < 40; i++) {
    if ((await cli(b, 'doctor')).json.checks.find((c: { check: string }) => c.check === 'store index') === undefined) {
      again = await cli(a, 'sync', 'vol', '--peer', 'cloud');
      break;
    }
    await delay(500);
  }
  assert.ok(again, 'the server reopened its index within 20 s of the fault ending');
  assert.equal(again.code, 0, again.stderr);
  assert.equal(sb.child.exitCode, null, 'the same server, not restarted');
  await sb.stop();
  assert.equal((await cli(b, 'verify')).code, 0);
});
