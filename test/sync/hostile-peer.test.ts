/**
 * A peer that answers what the protocol does not allow, through a TLS-terminating proxy with the
 * peer's own key (so pinning passes) in front of a real served appliance: the client refuses its
 * answer with a stable code and commits nothing. And a receiving appliance refuses snapshot ids
 * that would stay a volume's latest whatever is replicated after them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer, request as httpsRequest, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { RemotePeer } from '../../api/client.js';
import { newSnapshotId } from '../../store/ids.js';
import { cli, initHome, pairedWithVolume, peerClient, startServe, tempDir, type TestHome } from '../helpers/appliance.js';
import { connect as tlsConnect } from 'node:tls';
import { cli as cliText } from '../helpers/cli.js';

type Answer = (res: import('node:http').ServerResponse, upstream: { status: number; headers: import('node:http').IncomingHttpHeaders; body: Buffer }) => void;

/** A proxy with `b`'s key in front of `upstream`; the answer to the lock request goes through `lock`. */
async function lockAnswerProxy(t: Parameters<typeof tempDir>[0], b: TestHome, upstream: string, lock: Answer): Promise<string> {
  const tls = { key: readFileSync(join(b.dir, 'tls', 'key.pem')), cert: readFileSync(join(b.dir, 'tls', 'cert.pem')) };
  const server: Server = createServer(tls, (req, res) => {
    const isLock = req.method === 'POST' && /^\/v1\/volumes\/[^/]+\/lock$/.test(req.url!);
    const up = httpsRequest(new URL(req.url!, upstream), { method: req.method, headers: { ...req.headers, host: new URL(upstream).host }, rejectUnauthorized: false }, (ur) => {
      if (!isLock) {
        res.writeHead(ur.statusCode!, ur.headers);
        ur.pipe(res);
        return;
      }
      const chunks: Buffer[] = [];
      ur.on('data', (c: Buffer) => chunks.push(c));
      ur.on('end', () => lock(res, { status: ur.statusCode!, headers: ur.headers, body: Buffer.concat(chunks) }));
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
  return `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/** The upstream's lock answer with its `latest` record changed by `edit`. */
function editLatest(edit: (latest: Record<string, unknown>) => void): Answer {
  return (res, up) => {
    const a = JSON.parse(up.body.toString('utf8')) as { latest: Record<string, unknown> | null };
    if (a.latest) edit(a.latest);
    const body = Buffer.from(JSON.stringify(a));
    res.writeHead(up.status, { 'content-type': 'application/json', 'content-length': body.length });
    res.end(body);
  };
}

test("a pull refuses the peer's latest snapshot of another volume, or one dated far ahead, and commits nothing", async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 8);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  // A second on-prem appliance with a volume of its own, "victim", pulls vol through the proxies.
  const c = await initHome(t, 'other');
  const renamed = await lockAnswerProxy(t, b, sb.url, editLatest((l) => { l.volume = 'victim'; }));
  const ahead = await lockAnswerProxy(t, b, sb.url, editLatest((l) => { l.id = newSnapshotId(new Date(Date.now() + 3_600_000)); }));
  const foreign = await lockAnswerProxy(t, b, sb.url, editLatest((l) => { l.id = 'zzzz-000000'; }));
  for (const [name, url] of [['renamed', renamed], ['ahead', ahead], ['foreign', foreign]] as const) {
    assert.equal((await cli(c, 'peer', 'add', name, '--url', url, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  }
  const r1 = await cli(c, 'sync', 'vol', '--peer', 'renamed', '--reverse');
  assert.equal(r1.code, 1);
  assert.equal(r1.json.error.code, 'ERR_PEER_PROTOCOL');
  assert.match(r1.json.error.message, /with one of volume "victim"; nothing was pulled/);
  const r2 = await cli(c, 'sync', 'vol', '--peer', 'ahead', '--reverse');
  assert.equal(r2.code, 1);
  assert.equal(r2.json.error.code, 'ERR_SNAPSHOT_INVALID');
  assert.match(r2.json.error.message, /60 min ahead of this appliance's clock/);
  const r3 = await cli(c, 'sync', 'vol', '--peer', 'foreign', '--reverse');
  assert.equal(r3.json.error.code, 'ERR_SNAPSHOT_INVALID');
  assert.match(r3.json.error.message, /not a time-based id/);
  for (const v of ['vol', 'victim']) assert.equal((await cli(c, 'snapshots', v)).json.length ?? 0, 0, `nothing committed under ${v}`);
  // Straight from the peer, the same pull works.
  assert.equal((await cli(c, 'peer', 'add', 'cloud', '--url', sb.url, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const ok = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(ok.code, 0, ok.stderr);
});

test('a receiving appliance refuses a pushed snapshot whose id is not time-based or is dated over 10 minutes ahead (ERR_SNAPSHOT_INVALID); one a minute ahead is taken', async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 4);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const peer = peerClient(b, sb);
  t.after(() => peer.close());
  const latest = (await peer.latestSnapshot('vol'))!;
  const holder = (JSON.parse(readFileSync(join(a.dir, 'appliance.json'), 'utf8')) as { id: string }).id;
  for (const [id, pattern] of [['zzzz-000000', /not a time-based id/], [newSnapshotId(new Date(Date.now() + 3_600_000)), /60 min ahead/]] as const) {
    const lock = await peer.lockVolume('vol', holder);
    assert.ok(lock.lease);
    await assert.rejects(peer.commitSnapshot({ ...latest, id, parent: latest.id }), (e: any) => e.code === 'ERR_SNAPSHOT_INVALID' && pattern.test(e.message));
    await peer.releaseVolume();
  }
  assert.equal((await peer.latestSnapshot('vol'))!.id, latest.id, 'the latest is still the last real push');
  const soon = newSnapshotId(new Date(Date.now() + 60_000));
  await peer.lockVolume('vol', holder);
  // Its origin and a label carry terminal escapes (clear the screen, retitle the terminal): the
  // listing shows them as text.
  await peer.commitSnapshot({ ...latest, id: soon, parent: latest.id, origin: 'scan\x1b[2J\x1b]0;PWNED\x07', labels: { note: 'a\rb\x9bc' } });
  assert.equal((await peer.latestSnapshot('vol'))!.id, soon);
  const listed = await cliText(['--home', b.dir, 'snapshots', 'vol']); // text, as an operator reads it
  assert.equal(listed.code, 0, listed.stderr);
  const text = listed.stdout;
  assert.doesNotMatch(text, /[\x00-\x08\x0b-\x1f\x7f-\x9f]/, 'no control character reaches the terminal');
  assert.match(text, /scan\\x1b\[2J\\x1b\]0;PWNED\\x07/);
});

test("the client reads a peer's JSON answer up to 32 MiB and for a bounded time: larger or slower answers are ERR_PEER_PROTOCOL, and a stop aborts a request still waiting", async (t) => {
  const { a, b, sb } = await pairedWithVolume(t, 4);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const huge = (chunked: boolean): Answer => (res) => {
    // 40 MiB of JSON: declared up front, or sent in chunks with no length.
    res.writeHead(200, { 'content-type': 'application/json', ...(chunked ? {} : { 'content-length': 40 * 1024 * 1024 }) });
    const part = Buffer.alloc(1024 * 1024, 0x20);
    let sent = 0;
    const more = () => {
      while (sent < 40 && !res.destroyed) {
        sent++;
        if (!res.write(part)) return res.once('drain', more);
      }
      res.end();
    };
    more();
  };
  const drip: Answer = (res) => {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.write('{');
    const timer = setInterval(() => (res.destroyed ? clearInterval(timer) : res.write(' ')), 200);
    res.on('close', () => clearInterval(timer));
  };
  const declared = await lockAnswerProxy(t, b, sb.url, huge(false));
  const chunked = await lockAnswerProxy(t, b, sb.url, huge(true));
  const slow = await lockAnswerProxy(t, b, sb.url, drip);
  assert.equal((await cli(a, 'peer', 'add', 'declared', '--url', declared, '--token', b.token, '--fingerprint', b.fingerprint)).code, 0);
  const r = await cli(a, 'sync', 'vol', '--peer', 'declared');
  assert.equal(r.code, 1);
  assert.equal(r.json.error.code, 'ERR_PEER_PROTOCOL');
  assert.match(r.json.error.message, /more than 32 MiB of JSON/);
  const client = (url: string, more: Partial<ConstructorParameters<typeof RemotePeer>[0]> = {}) => {
    const p = new RemotePeer({ url, token: b.token, fingerprint: b.fingerprint, name: 'cloud', ...more });
    t.after(() => p.close());
    return p;
  };
  await assert.rejects(client(chunked).lockVolume('vol', 'x'), (e: any) => e.code === 'ERR_PEER_PROTOCOL' && /more than 32 MiB/.test(e.message));
  const started = Date.now();
  await assert.rejects(client(slow, { answerTimeoutMs: 1500 }).lockVolume('vol', 'x'), (e: any) => e.code === 'ERR_PEER_PROTOCOL' && /did not finish its answer/.test(e.message));
  assert.ok(Date.now() - started < 10_000);
  // A stop (Ctrl-C, a daemon stopping) aborts the request at once: the stop's reason, or ERR_INTERRUPTED.
  const ctl = new AbortController();
  const waiting = client(slow, { signal: ctl.signal }).lockVolume('vol', 'x');
  setTimeout(() => ctl.abort(), 500);
  const t0 = Date.now();
  await assert.rejects(waiting, { code: 'ERR_INTERRUPTED' });
  assert.ok(Date.now() - t0 < 5_000, 'aborted at once');
});

test('a request whose headers Node refuses (over 16 KiB) is answered 431 in the error catalog\'s shape', async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  const url = new URL(sb.url);
  const socket = tlsConnect({ host: url.hostname, port: Number(url.port), rejectUnauthorized: false });
  t.after(() => socket.destroy());
  await once(socket, 'secureConnect');
  socket.write(`POST /v1/volumes/vol/lock HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${b.token}\r\nx-tandem-lease: ${'x'.repeat(100_000)}\r\ncontent-length: 2\r\n\r\n{}`);
  let answer = '';
  socket.on('data', (c: Buffer) => void (answer += c.toString()));
  socket.on('error', () => undefined); // the server closes with the rest of the headers unread: a reset after its answer
  await new Promise((resolve) => socket.on('close', resolve));
  assert.match(answer, /^HTTP\/1\.1 431 /);
  const body = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as { error: { code: string; message: string } };
  assert.equal(body.error.code, 'ERR_BAD_REQUEST');
  assert.match(body.error.message, /headers are larger than this server takes/);
});
