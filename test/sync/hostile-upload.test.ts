/**
 * A peer holding the token that uploads in ways meant to exhaust the server (a fake client
 * speaking the real framing over HTTPS to a real `appliance serve`): delta frames that are tiny on
 * the wire but name 16 MiB blocks, and uploads that trickle bytes to hold every upload slot.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { deflateRawSync } from 'node:zlib';
import { request as httpsRequest } from 'node:https';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { frameHeader } from '../../sync/framing.js';
import { RemotePeer } from '../../api/client.js';
import { blake3 } from '../../store/hash.js';
import { cli, initHome, pair, peerClient, startCli, startServe, tempDir, type Served, type TestHome } from '../helpers/appliance.js';

const MiB = 1024 * 1024;
const BIG = 16 * MiB;


/** A codec-2 frame: block `hash` of `length` bytes is `base` with `bytes` written at `offset`. */
function deltaFrame(hash: Buffer, base: Buffer, length: number, offset: number, bytes: Buffer): Buffer {
  const payload = Buffer.alloc(32 + 4 + 8 + bytes.length);
  base.copy(payload, 0);
  payload.writeUInt32BE(1, 32);
  payload.writeUInt32BE(offset, 36);
  payload.writeUInt32BE(bytes.length, 40);
  bytes.copy(payload, 44);
  return Buffer.concat([frameHeader(0x42, 2, hash, length, payload.length), payload]);
}

const endFrame = (count: number) => frameHeader(0x45, 0, null, count, 0);

/** POST /v1/blocks/put with `body` (sent in one go); its status and parsed answer. */
function upload(s: Served, token: string, body: Buffer): Promise<{ status: number; json: any }> {
  const u = new URL(s.url);
  return new Promise((resolve, reject) => {
    const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/blocks/put', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream', 'content-length': body.length } }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => void (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode!, json: JSON.parse(text) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** The peak resident memory (VmHWM, KiB) of a process. */
function peakRssKiB(pid: number): number {
  return Number(/VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

/**
 * `uploads` uploads at once of `body` (`frames` block frames of the blocks `hashes`, each stored
 * once). Checks each completes, every block is held and the store verifies; returns the server's
 * peak RSS (MiB) before and after.
 */
async function flood(t: TestContext, b: TestHome, sb: Served, body: Buffer, frames: number, hashes: Buffer[], uploads: number, meanwhile = false): Promise<{ before: number; peak: number }> {
  const before = peakRssKiB(sb.child.pid!);
  const started = Date.now();
  const timeout = new AbortController();
  const answers = await Promise.race([
    Promise.all(Array.from({ length: uploads }, () => upload(sb, b.token, body))),
    delay(120_000, undefined, { signal: timeout.signal }).then(() => assert.fail(`${uploads} uploads did not all complete within 120 s (streams waiting on each other's budget)`)),
  ]).finally(() => timeout.abort());
  t.diagnostic(`${uploads} uploads completed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  for (const a of answers) {
    assert.equal(a.status, 200, JSON.stringify(a.json));
    assert.equal(a.json.received, frames);
  }
  // Each distinct block stored once (some by the uploads begun `meanwhile`, when there were).
  const stored = answers.reduce((n, a) => n + a.json.stored, 0);
  if (meanwhile) assert.ok(stored <= hashes.length);
  else assert.equal(stored, hashes.length);
  const peer = peerClient(b, sb);
  assert.deepEqual(await peer.hasBlocks(hashes), hashes.map(() => true));
  peer.close();
  const peak = peakRssKiB(sb.child.pid!);
  t.diagnostic(`server peak RSS ${Math.round(before / 1024)} MiB before the uploads, ${Math.round(peak / 1024)} MiB after`);
  assert.equal((await cli(b, 'verify')).code, 0);
  return { before: before / 1024, peak: peak / 1024 };
}

/**
 * `uploads` uploads at once, each of `frames` delta frames of blocks of `size` bytes made of one
 * random base the server holds (8 distinct blocks, an 8-byte write each). Checks each completes
 * and returns the server's peak RSS (MiB) before and after.
 */
async function deltaFlood(t: TestContext, size: number, uploads: number, frames: number, meanwhile?: (sb: Served, token: string, frame: (i: number) => Buffer) => Promise<void>): Promise<{ before: number; peak: number }> {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  // The base, sent whole.
  const base = randomBytes(size);
  const baseHash = blake3(base);
  const first = await upload(sb, b.token, Buffer.concat([frameHeader(0x42, 0, baseHash, size, size), base, endFrame(1)]));
  assert.equal(first.status, 200, JSON.stringify(first.json));
  assert.equal(first.json.stored, 1);
  const variants = Array.from({ length: 8 }, (_, i) => {
    const bytes = randomBytes(8);
    const offset = i * (size / 8);
    const data = Buffer.from(base);
    bytes.copy(data, offset);
    return { hash: blake3(data), offset, bytes };
  });
  const frame = (i: number) => {
    const v = variants[i % variants.length]!;
    return deltaFrame(v.hash, baseHash, size, v.offset, v.bytes);
  };
  const body = Buffer.concat([...Array.from({ length: frames }, (_, i) => frame(i)), endFrame(frames)]);
  await meanwhile?.(sb, b.token, frame);
  t.diagnostic(`each upload is ${body.length} bytes for ${frames} blocks of ${size / MiB} MiB`);
  return flood(t, b, sb, body, frames, variants.map((v) => v.hash), uploads, meanwhile !== undefined);
}

test('delta frames tiny on the wire do not expand past the store-wide budget of blocks built from them: 12 uploads of 2.3 KB (24 deltas of 16 MiB blocks each) keep the server\'s peak RSS bounded, and all complete', async (t) => {
  const { before, peak } = await deltaFlood(t, 16 * MiB, 12, 24);
  // The budget is 128 MiB of built blocks; the rest is the server's own (reads, writes).
  assert.ok(peak - before < 320, `peak RSS grew by ${Math.round(peak - before)} MiB`);
});

test('uploads of deltas that together want more than the budget all complete: each writes out what it holds while it waits (12 uploads of 96 deltas of 1 MiB blocks, half-full batches)', async (t) => {
  await deltaFlood(t, MiB, 12, 96);
});

test('uploads that send 7 deltas of 16 MiB blocks and then wait between frames do not keep the budget from other uploads: what they built is written out once another wants it', async (t) => {
  const open: Array<() => void> = [];
  t.after(() => open.forEach((end) => end()));
  await deltaFlood(t, 16 * MiB, 2, 24, async (sb, token, frame) => {
    const u = new URL(sb.url);
    for (let n = 0; n < 4; n++) {
      const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/blocks/put', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' } });
      req.on('error', () => undefined);
      req.on('response', (res) => res.resume());
      req.write(Buffer.concat(Array.from({ length: 7 }, (_, i) => frame(i))));
      open.push(() => req.destroy());
    }
    await delay(1000); // each has built its 7 blocks (112 MiB each, 448 MiB asked of a 128 MiB budget)
  });
});

/** A codec-1 frame of `data`, deflated at level 9 (a block of zeros inflates about 1,000-fold). */
function deflateFrame(data: Buffer): Buffer {
  const payload = deflateRawSync(data, { level: 9 });
  return Buffer.concat([frameHeader(0x42, 1, blake3(data), data.length, payload.length), payload]);
}

test('deflate bombs do not expand past the budget of received frames: 12 uploads of 24 deflated frames of 16 MiB blocks (390 KB each on the wire, 384 MiB inflated) keep the server\'s peak RSS bounded, and all complete', async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  // 8 distinct blocks of zeros but for 8 random bytes each.
  const blocks = Array.from({ length: 8 }, (_, i) => {
    const data = Buffer.alloc(BIG);
    randomBytes(8).copy(data, i * (BIG / 8));
    return data;
  });
  const frames = blocks.map(deflateFrame);
  const body = Buffer.concat([...Array.from({ length: 24 }, (_, i) => frames[i % frames.length]!), endFrame(24)]);
  t.diagnostic(`each upload is ${body.length} bytes for 24 blocks of 16 MiB`);
  const { before, peak } = await flood(t, b, sb, body, 24, blocks.map((d) => blake3(d)), 12);
  // Received frames hold at most 128 MiB, in reused buffers; the rest is the server's own. It grew
  // by 378-394 MiB when they were decoded ahead as they came, into fresh buffers (212-229 MiB now).
  assert.ok(peak - before < 288, `peak RSS grew by ${Math.round(peak - before)} MiB`);
});

test('repair streams that each send 7 deflated frames of 1 MiB blocks and then wait hold them within the budget of received frames: 40 of them (280 MiB of blocks, 200 KB on the wire) keep the server\'s peak RSS bounded, and it goes on storing', async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  const u = new URL(sb.url);
  const open: Array<() => void> = [];
  t.after(() => open.forEach((end) => end()));
  const streams = 40;
  const before = peakRssKiB(sb.child.pid!);
  for (let n = 0; n < streams; n++) {
    const frames = Array.from({ length: 7 }, () => {
      const data = Buffer.alloc(MiB, 1 + n);
      randomBytes(8).copy(data, 4096);
      return deflateFrame(data);
    });
    const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/blocks/repair', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${b.token}`, 'content-type': 'application/octet-stream' } });
    req.on('error', () => undefined);
    req.on('response', (res) => res.resume());
    req.write(Buffer.concat(frames)); // and no end frame: the stream waits for its sender
    open.push(() => req.destroy());
  }
  await delay(3000); // each has sent its 7 frames (a repair writes its batch at 8 MiB)
  const grew = (peakRssKiB(sb.child.pid!) - before) / 1024;
  t.diagnostic(`server peak RSS grew by ${grew.toFixed(0)} MiB with ${streams} repair streams holding 7 MiB each`);
  // The budget is 128 MiB of received frames; the rest is the server's own.
  assert.ok(grew < 240, `peak RSS grew by ${grew.toFixed(0)} MiB`);
  // The budget is not held up by them: an upload of blocks completes.
  const block = randomBytes(MiB);
  const r = await upload(sb, b.token, Buffer.concat([frameHeader(0x42, 0, blake3(block), MiB, MiB), block, endFrame(1)]));
  assert.equal(r.status, 200, JSON.stringify(r.json));
  assert.equal(r.json.stored, 1);
});

/**
 * An upload that begins a raw frame of 16 MiB and then sends `piece` bytes of it every `everyMs` (never
 * silent long enough to be stalled): it holds an upload slot for as long as it goes on. `answer`
 * resolves with the server's answer (status and error code) or null when the connection is cut.
 */
function tricklingUpload(s: Served, token: string, everyMs: number, piece = 1): { answer: Promise<{ status: number; code?: string } | null>; destroy: () => void } {
  const u = new URL(s.url);
  const req = httpsRequest({ host: u.hostname, port: u.port, path: '/v1/blocks/put', method: 'POST', rejectUnauthorized: false, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' } });
  const answer = new Promise<{ status: number; code?: string } | null>((resolve) => {
    req.on('response', (res) => {
      let text = '';
      res.on('data', (c: Buffer) => void (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode!, code: (JSON.parse(text) as { error?: { code: string } }).error?.code }));
      res.on('error', () => resolve(null));
    });
    req.on('error', () => resolve(null));
  });
  req.write(frameHeader(0x42, 0, randomBytes(32), 16 * MiB, 16 * MiB));
  const timer = setInterval(() => req.write(Buffer.alloc(piece, 0x55)), everyMs);
  void answer.finally(() => clearInterval(timer));
  return { answer, destroy: () => (clearInterval(timer), req.destroy()) };
}

test('8 uploads that trickle 1 byte every 0.5 s inside a frame hold every slot only until a frame waits: the slowest are ended (ERR_SERVER_BUSY, logged) and real pushes complete, one of them under --bwlimit; a push slower than the floor is not cut while nobody waits', async (t) => {
  // Two appliances push to cloud (one appliance's syncs run one at a time).
  const [a, c, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'branch'), initHome(t, 'cloud')]);
  // Senders measured over 2 s of waiting (30 s by default); a frame waits up to 10 s for a slot (60 s).
  const sb = await startServe(t, b, '127.0.0.1:0', { TANDEM_SLOW_WINDOW_MS: '2000', TANDEM_STREAM_WAIT_MS: '10000' });
  await pair(a, 'cloud', b, sb);
  await pair(c, 'cloud', b, sb);
  const dir = tempDir(t, 'tandem-trickle-');
  const volumes = { vol: randomBytes(16 * 64 * 1024), capped: randomBytes(2 * MiB), slow: randomBytes(64 * 1024) };
  for (const [name, data] of Object.entries(volumes)) {
    writeFileSync(join(dir, `${name}.img`), data);
    assert.equal((await cli(name === 'vol' ? c : a, 'volume', 'add', name, '--path', join(dir, `${name}.img`), '--block-size', '64KiB')).code, 0);
  }

  // A push capped at 8 KiB/s (under the floor of 16 KiB/s) with no frame waiting: never cut.
  const slow = await cli(a, 'sync', 'slow', '--peer', 'cloud', '--bwlimit', '8KiB');
  assert.equal(slow.code, 0, slow.stderr);
  assert.doesNotMatch(sb.stderr(), /ended: its sender sent/);

  const trickling = Array.from({ length: 8 }, () => tricklingUpload(sb, b.token, 500));
  t.after(() => trickling.forEach((u) => u.destroy()));
  await delay(3000); // each holds a slot, and has held it for more than the window
  // A push capped at 256 KiB/s (~85 KiB/s a stream) takes slots from the trickling uploads, then
  // moves data at its cap for ~8 s while an uncapped push waits for slots: only trickling ones are ended.
  const started = Date.now();
  const capped = startCli(a, 'sync', 'capped', '--peer', 'cloud', '--bwlimit', '256KiB');
  await delay(1500);
  const push = await cli(c, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(push.code, 0, `the push completes while trickling uploads hold the slots: ${push.stdout} ${push.stderr}`);
  t.diagnostic(`the uncapped push took ${((Date.now() - started) / 1000 - 1.5).toFixed(1)} s`);
  const cappedRun = await capped.done;
  assert.equal(cappedRun.code, 0, `the capped push is not ended: ${cappedRun.stdout} ${cappedRun.stderr}`);
  t.diagnostic(`the capped push took ${((Date.now() - started) / 1000).toFixed(1)} s`);
  const evictions = [...sb.stderr().matchAll(/ended: its sender sent (\d+) bytes in the last (\d+) s the server waited for it in the middle of a block frame \(([\d.]+) B\/s, under the 16 KiB\/s.*?ERR_SERVER_BUSY/g)];
  t.diagnostic(`${evictions.length} uploads ended: ${evictions.map((m) => `${m[3]} B/s`).join(', ')}`);
  assert.ok(evictions.length >= 1);
  for (const m of evictions) assert.ok(Number(m[3]) < 16, `only trickling uploads (2 B/s) are ended, not ${m[3]} B/s`);
    const answers = await Promise.all(trickling.map((u) => Promise.race([u.answer, delay(2000).then(() => 'none' as const)])));
  t.diagnostic(`the trickling uploads got: ${answers.map((r) => (r === 'none' ? 'nothing yet' : r === null ? 'cut' : `${r.status} ${r.code}`)).join(', ')}`);
  // Each one ended is answered at once: 503 ERR_SERVER_BUSY.
  assert.deepEqual(answers.filter((r) => r !== 'none'), evictions.map(() => ({ status: 503, code: 'ERR_SERVER_BUSY' })));
  for (const [name, data] of Object.entries(volumes)) {
    const out = join(dir, `${name}.out`);
    assert.equal((await cli(b, 'restore', name, '--to', out)).code, 0);
    assert.ok(sameBytes(out, data), `${name} restores byte-exact`);
  }
});

test('an upload under --bwlimit that is the slowest holder, under the floor, while a frame waits, is ended: the client gets ERR_SERVER_BUSY saying why and what cap to give; uploads above the floor go on', async (t) => {
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b, '127.0.0.1:0', { TANDEM_SLOW_WINDOW_MS: '2000', TANDEM_STREAM_WAIT_MS: '10000' });
  // 7 uploads moving 80 KiB/s each (above the floor) hold 7 slots; a client capped at 2 KiB/s takes the 8th.
  const steady = Array.from({ length: 7 }, () => tricklingUpload(sb, b.token, 100, 8 * 1024));
  t.after(() => steady.forEach((u) => u.destroy()));
  await delay(500);
  const capped = new RemotePeer({ url: sb.url, token: b.token, fingerprint: b.fingerprint, name: 'cloud', bwlimit: 2048 });
  t.after(() => capped.close());
  const block = randomBytes(512 * 1024);
  const put = capped.putBlocks((async function* () {
    yield { hash: blake3(block), data: block };
  })());
  put.catch(() => undefined);
  await delay(4000); // its frame has held its slot for more than the window
  // A ninth upload's frame waits: the slowest holder under the floor is the capped client.
  const ninth = tricklingUpload(sb, b.token, 100, 8 * 1024);
  t.after(() => ninth.destroy());
  await assert.rejects(put, (e: any) => {
    assert.equal(e.code, 'ERR_SERVER_BUSY', e.message);
    assert.match(e.message, /ended this block stream: it sent \d+ bytes in the last \d+ s .*under --bwlimit, give at least 48 KiB\/s/);
    return true;
  });
  assert.match(sb.stderr(), /blocks\/put from .* ended: its sender sent \d+ bytes .* its slot went to a waiting block stream/);
  for (const u of steady) assert.equal(await Promise.race([u.answer, delay(100).then(() => 'running')]), 'running', 'the uploads above the floor go on');
});

test('a server receiving a 384 MiB first sync holds no more than a bounded window of it: its peak RSS grows by well under the volume', async (t) => {
  const [a, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  const sb = await startServe(t, b);
  await pair(a, 'cloud', b, sb);
  const img = join(tempDir(t, 'tandem-bounded-'), 'disk.img');
  writeRandom(img, 384 * MiB);
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', img)).code, 0);
  const before = peakRssKiB(sb.child.pid!);
  const push = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(push.code, 0, push.stderr);
  assert.equal(push.json.blocksSent, 768);
  const grew = (peakRssKiB(sb.child.pid!) - before) / 1024;
  // Received frames are written and let go as they come (a chunk kept per read held a 4 GiB upload whole).
  assert.ok(grew < 192, `the server's peak RSS grew by ${grew.toFixed(0)} MiB receiving 384 MiB`);
});

test('a CLI sync under --bwlimit whose uploads the server ends for their slowness (a frame waits) or refuses (no slot came free) reports ERR_SERVER_BUSY with what to do, and exits 1 at once; the rerun on an idle server completes', async (t) => {
  const [a, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  // Senders measured over 2 s of waiting (30 s by default); a frame waits up to 3 s for a slot (60 s).
  const sb = await startServe(t, b, '127.0.0.1:0', { TANDEM_SLOW_WINDOW_MS: '2000', TANDEM_STREAM_WAIT_MS: '3000' });
  await pair(a, 'cloud', b, sb);
  const dir = tempDir(t, 'tandem-cut-');
  const data = randomBytes(24 * 64 * 1024);
  writeFileSync(join(dir, 'vol.img'), data);
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', join(dir, 'vol.img'), '--block-size', '64KiB')).code, 0);
  // 7 uploads above the floor (80 KiB/s each) hold 7 slots; the capped sync (12 KiB/s over its
  // streams, under the floor each) takes the 8th, its other streams wait, and so does a ninth upload.
  const others = Array.from({ length: 7 }, () => tricklingUpload(sb, b.token, 100, 8 * 1024));
  t.after(() => others.forEach((u) => u.destroy()));
  await delay(500);
  const started = Date.now();
  const sync = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '12KiB');
  let stderr = '';
  let errorAt = 0;
  sync.child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
    if (!errorAt && /error ERR_/.test(stderr)) errorAt = Date.now();
  });
  await delay(2500);
  others.push(tricklingUpload(sb, b.token, 100, 8 * 1024));
  const r = await sync.done;
  const exitedAt = Date.now();
  const log = sb.stderr();
  t.diagnostic(`the sync printed its error after ${((errorAt - started) / 1000).toFixed(1)} s and exited after ${((exitedAt - started) / 1000).toFixed(1)} s: ${r.json?.error?.code}; the server ended ${[...log.matchAll(/ended: its sender sent/g)].length} of its streams and refused ${[...log.matchAll(/waited 3 s for a slot: refused/g)].length}`);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  // Its throttled streams stop waiting for their cap's tokens once their requests are over.
  assert.ok(errorAt > 0 && exitedAt - errorAt < 3000, `the sync exited ${exitedAt - errorAt} ms after it printed its error`);
  assert.equal(r.json?.error?.code, 'ERR_SERVER_BUSY', r.stdout);
  assert.match(r.json.error.message, /^peer cloud: cloud (ended this block stream|is receiving 8 block streams' frames).* Rerun the sync/);
  assert.match(r.stderr, /ERR_SERVER_BUSY/);
  assert.match(log, /ended: its sender sent|refused \(ERR_SERVER_BUSY\)/);
  others.forEach((u) => u.destroy());
  const rerun = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(rerun.code, 0, rerun.stderr);
  const out = join(dir, 'vol.out');
  assert.equal((await cli(b, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, data), 'the volume restores byte-exact');
});
