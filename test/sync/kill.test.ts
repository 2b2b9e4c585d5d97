/**
 * kill -9 of either appliance at random moments during a sync: the rerun completes, both stores
 * stay consistent, and nothing the receiver stored is sent again.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { once } from 'node:events';
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { createServer, request as httpsRequest, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';
import { cli as cliText, untilWritten } from '../helpers/cli.js';
import { cli, diagnose, pairedWithVolume, peerClient, startCli, startServe, tempDir, type TestHome } from '../helpers/appliance.js';
import { trials } from '../helpers/soak.js';

async function restoredOnB(b: TestHome, dir: string, name: string): Promise<Buffer> {
  const r = await cli(b, 'restore', 'vol', '--to', join(dir, name));
  assert.equal(r.code, 0, r.stderr);
  return readFileSync(join(dir, name));
}

test('kill -9 of the client at random moments: the rerun completes, resends nothing stored, both stores verify', async (t) => {
  const blocks = 64;
  const { a, b, sb, dir, img } = await pairedWithVolume(t, blocks);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  for (let trial = 0; trial < trials(5); trial++) {
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '2MiB');
    await delay(randomInt(200, 2000));
    run.child.kill('SIGKILL');
    await run.done;
  }
  const last = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  // ERR_PEER_NOT_FOUND was seen here once under a loaded full run, never alone: keep the home.
  if (last.code !== 0) assert.fail(`${last.stderr}\n${await diagnose(a)}`);
  const s = await peerB.stats();
  assert.equal(s.blocksReceived, blocks, 'over all runs every block arrived exactly once: none the receiver had stored was sent again');
  assert.equal((await cli(a, 'verify')).code, 0);
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});

/**
 * A TLS-terminating proxy (the peer's own key, so pinning passes) that forwards every request to
 * `upstream` but, on the first snapshot commit, kills `victim()` with SIGKILL instead: the client
 * dies with every block and the earlier nodes stored on the peer, and its commit never arrives.
 */
async function killAtCommitProxy(t: Parameters<typeof tempDir>[0], b: TestHome, upstream: string, victim: () => ChildProcess | undefined): Promise<{ url: string; killed: () => boolean }> {
  const tls = { key: readFileSync(join(b.dir, 'tls', 'key.pem')), cert: readFileSync(join(b.dir, 'tls', 'cert.pem')) };
  let killed = false;
  const server: Server = createServer(tls, (req, res) => {
    if (req.url === '/v1/snapshots/commit' && !killed) {
      killed = victim()?.kill('SIGKILL') ?? false;
      res.destroy();
      return;
    }
    const up = httpsRequest(new URL(req.url!, upstream), { method: req.method, headers: { ...req.headers, host: new URL(upstream).host }, rejectUnauthorized: false }, (ur) => {
      res.writeHead(ur.statusCode!, ur.headers);
      ur.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
  return { url: `https://127.0.0.1:${(server.address() as AddressInfo).port}`, killed: () => killed };
}

test('kill -9 of the client right before its commit, after nodes were put: the rerun sends no node or block the receiver stored', async (t) => {
  // 70 level-1 nodes of 256 blocks of 4 KiB under one root: a change in each makes 71 nodes, of
  // which the first 64 go in a nodes/put before the commit (which carries the rest).
  const { a, b, sb, dir, img } = await pairedWithVolume(t, 70 * 256, 4096);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  let client: ChildProcess | undefined;
  const proxy = await killAtCommitProxy(t, b, sb.url, () => client);
  assert.equal((await cli(a, 'peer', 'add', 'via', '--url', proxy.url, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const fd = openSync(img, 'r+');
  for (let n = 0; n < 70; n++) writeSync(fd, randomBytes(512), 0, 512, (n * 256 + 5) * 4096);
  closeSync(fd);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const before = await peerB.stats();
  const run = startCli(a, 'sync', 'vol', '--peer', 'via');
  client = run.child;
  const r = await run.done;
  assert.ok(proxy.killed() && r.signal === 'SIGKILL', `the sync was killed at its commit (exit ${r.code}, ${r.stderr})`);
  const mid = await peerB.stats();
  assert.equal(mid.snapshotsCommitted, before.snapshotsCommitted, 'nothing was committed');
  assert.equal(mid.blocksReceived - before.blocksReceived, 70, 'the killed run sent the 70 changed blocks');
  assert.equal(mid.nodesReceived - before.nodesReceived, 64, 'and put 64 of the 71 nodes');
  const stopped = await cli(a, 'status', 'vol');
  assert.deepEqual(stopped.json.volumes[0].pushesUnfinished.map((u: { peer: string }) => u.peer), ['via'], 'status names the push that stopped midway');
  assert.equal(stopped.json.volumes[0].pushesUnfinished[0].running, false, 'the killed client holds no lock any more');
  assert.match((await cliText(['--home', a.dir, 'status', 'vol'])).stdout, /vol: a push to via \(snapshot \S+\) started \d+s ago and stopped midway: `appliance sync vol --peer via` resumes it/);
  const rerun = await cli(a, 'sync', 'vol', '--peer', 'via'); // the proxy kills only once
  assert.equal(rerun.code, 0, rerun.stderr);
  assert.deepEqual((await cli(a, 'status', 'vol')).json.volumes[0].pushesUnfinished, [], 'the rerun finished it');
  const after = await peerB.stats();
  assert.equal(after.blocksReceived - mid.blocksReceived, 0, 'the rerun sent no block');
  assert.equal(after.nodesReceived - mid.nodesReceived, 7, 'the rerun sent only the 7 nodes the receiver lacked');
  assert.equal(after.snapshotsCommitted, before.snapshotsCommitted + 1);
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});

test("a gc on the peer reclaims a push's blocks before its commit: the push asks again, resends only those, and commits", async (t) => {
  const blocks = 64;
  const { a, b, sb, dir, img } = await pairedWithVolume(t, blocks);
  // A proxy (the peer's own key, so pinning passes) that runs gc on the peer, through its server,
  // before it forwards the first commit: every block of the push is then unreachable, and reclaimed.
  const tls = { key: readFileSync(join(b.dir, 'tls', 'key.pem')), cert: readFileSync(join(b.dir, 'tls', 'cert.pem')) };
  let gc: ReturnType<typeof cli> | null = null;
  const server: Server = createServer(tls, (req, res) => {
    const forward = () => {
      const up = httpsRequest(new URL(req.url!, sb.url), { method: req.method, headers: { ...req.headers, host: new URL(sb.url).host }, rejectUnauthorized: false }, (ur) => {
        res.writeHead(ur.statusCode!, ur.headers);
        ur.pipe(res);
      });
      up.on('error', () => res.destroy());
      req.pipe(up);
    };
    if (req.url === '/v1/snapshots/commit' && gc === null) {
      gc = cli(b, 'gc');
      gc.then(forward, () => res.destroy());
      return;
    }
    forward();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
  const url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
  assert.equal((await cli(a, 'peer', 'add', 'via', '--url', url, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const r = await cli(a, 'sync', 'vol', '--peer', 'via');
  assert.ok(gc !== null, 'the push reached its commit');
  const g = await (gc as ReturnType<typeof cli>);
  assert.equal(g.code, 0, g.stderr);
  assert.equal(g.json.blocksRemoved, blocks, "gc reclaimed every block of the push, which no snapshot reached yet");
  assert.equal(r.code, 0, r.stderr);
  const s = await peerB.stats();
  assert.equal(s.blocksReceived, 2 * blocks, 'every block was sent twice: before the gc, and again after it reclaimed them');
  assert.equal(r.json.blocksSent, 2 * blocks, 'the result counts both');
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});

test('kill -9 of the server at random moments: the rerun completes and the store verifies', async (t) => {
  const blocks = 64;
  const { a, b, sb: first, dir, img } = await pairedWithVolume(t, blocks);
  const port = new URL(first.url).port;
  let sb = first;
  for (let trial = 0; trial < trials(3); trial++) {
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '2MiB');
    await delay(randomInt(300, 2000));
    await sb.kill('SIGKILL');
    const r = await run.done;
    if (r.code !== 0) assert.match(r.json?.error?.code ?? '', /^ERR_PEER_(UNREACHABLE|PROTOCOL)$|^ERR_BLOCK_CORRUPT$/, r.stderr);
    sb = await startServe(t, b, `127.0.0.1:${port}`);
  }
  const last = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(last.code, 0, last.stderr);
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});


test('kill -9 of either side while changed blocks travel as deltas: the reruns complete, the receiver verifies, the replica is exact', async (t) => {
  const blocks = 64;
  const { a, b, sb: first, dir, img } = await pairedWithVolume(t, blocks);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const port = new URL(first.url).port;
  let sb = first;
  for (let trial = 0; trial < trials(4); trial++) {
    // 24 KiB written into each 64 KiB block: each goes as a ~24 KiB delta, ~1.5 MiB at 512 KiB/s.
    const data = readFileSync(img);
    for (let i = 0; i < blocks; i++) randomBytes(24 * 1024).copy(data, i * 64 * 1024 + randomInt(0, 40 * 1024));
    writeFileSync(img, data);
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '512KiB');
    await delay(randomInt(300, 2500));
    if (trial % 2 === 0) {
      await sb.kill('SIGKILL');
      sb = await startServe(t, b, `127.0.0.1:${port}`);
    } else run.child.kill('SIGKILL');
    await run.done;
  }
  const last = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  if (last.code !== 0) assert.fail(`${last.stderr}\n${await diagnose(a)}`);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  assert.ok((await peerB.stats()).deltasReceived > 0, 'the changes travelled as deltas (counted by the server running last)');
  assert.equal((await cli(a, 'verify')).code, 0);
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});

test("kill -9 of the client during first syncs of 96 MiB (the scan's new blocks past 64 MiB written and sent with O_DIRECT): each image's blocks arrive exactly once over the killed run and its rerun", async (t) => {
  const bs = 512 * 1024;
  const blocks = 192;
  const { a, b, sb, dir, img } = await pairedWithVolume(t, blocks, bs);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const started = Date.now();
  const first = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(first.code, 0, first.stderr);
  const fullMs = Date.now() - started;
  let killed = 0;
  let to = fullMs; // crash points before this; a run that ends sooner brings it earlier
  for (let trial = 0; trial < trials(4); trial++) {
    writeRandom(img, blocks * bs); // every block new again
    const before = (await peerB.stats()).blocksReceived;
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud');
    const t0 = Date.now();
    await delay(randomInt(Math.floor(to * 0.3), Math.max(Math.floor(to * 0.3) + 1, to))); // the random crash point is the experiment
    run.child.kill('SIGKILL');
    if ((await run.done).signal === 'SIGKILL') killed++;
    else to = Math.max(1, Math.floor(Math.min(to, Date.now() - t0) * 0.9));
    const rerun = await cli(a, 'sync', 'vol', '--peer', 'cloud');
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.equal((await peerB.stats()).blocksReceived - before, blocks, 'the killed run and its rerun together sent each block once');
    assert.ok((await restoredOnB(b, dir, `r${trial}.img`)).equals(readFileSync(img)), `trial ${trial}: the peer's copy equals the image`);
  }
  assert.ok(killed >= 1, `at least one sync was killed while running (a full one took ${fullMs} ms)`);
  assert.equal((await cli(a, 'verify')).code, 0);
  assert.equal((await cli(b, 'verify')).code, 0);
});

test('kill -9 during failback (sync --reverse --apply) while it writes the local volume: the volume stays marked, is neither snapshotted nor replicated half-written, and the rerun makes it the replica, byte for byte', async (t) => {
  const bs = 512 * 1024;
  const blocks = 256; // 128 MiB: the apply writes for a few hundred ms, long enough to kill it midway
  const { a, b, sb, img } = await pairedWithVolume(t, blocks, bs);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(img);
  const before = await peerB.latestSnapshot('vol');
  let landed = false;
  for (let trial = 0; trial < 5 && !landed; trial++) {
    writeRandom(img, blocks * bs); // the local volume diverged everywhere
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
    await untilWritten(img, replica.subarray(0, bs), run.done); // the apply has begun
    run.child.kill('SIGKILL');
    const r = await run.done;
    if (r.signal !== 'SIGKILL') {
      assert.equal(r.code, 0, r.stderr); // finished before the kill: try again from a new divergence
      continue;
    }
    if (sameBytes(img, replica)) continue; // killed after its last write: not half-written
    landed = true;
    const vols = await cli(a, 'volume', 'list');
    assert.ok(vols.json.find((v: { name: string }) => v.name === 'vol').materializing, 'the half-written volume is marked');
    const fwd = await cli(a, 'sync', 'vol', '--peer', 'cloud');
    assert.equal(fwd.code, 1, 'a forward sync of a half-written volume is refused');
    assert.equal(fwd.json.error.code, 'ERR_VOLUME_MATERIALIZING', fwd.stderr);
    assert.deepEqual(await peerB.latestSnapshot('vol'), before, 'the replica in the cloud is untouched');
    assert.equal((await cli(a, 'snapshot', 'vol')).json.error.code, 'ERR_VOLUME_MATERIALIZING');
  }
  assert.ok(landed, 'one of the failbacks was killed while the volume was half-written');
  const rerun = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(rerun.code, 0, rerun.stderr);
  assert.equal(rerun.json.applied.verified, true);
  assert.ok(sameBytes(img, replica), 'the rerun made the local volume the replica, byte for byte');
  const vols = await cli(a, 'volume', 'list');
  assert.equal(vols.json.find((v: { name: string }) => v.name === 'vol').materializing, undefined, 'the mark is cleared');
  const fwd = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(fwd.code, 0, fwd.stderr);
  assert.equal(fwd.json.upToDate, true, 'replication resumes from the common base');
  assert.equal((await cli(a, 'verify')).code, 0);
});
