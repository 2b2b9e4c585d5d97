/**
 * POST /v1/blocks/get over a real HTTPS socket: the answer is written with a callback per chunk
 * so each block's pooled buffer goes back once the socket has taken it. Blocks stay exact over
 * repeated answers (buffers reused), and a client that goes away mid-stream leaves the server
 * serving.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { request as httpsRequest } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Home } from '../../appliance/home.js';
import { startServer } from '../../api/index.js';
import { Store, hashBlock } from '../../store/index.js';
import { decodeFrames } from '../../sync/framing.js';
import type { IncomingMessage } from 'node:http';
import { writeFileSync } from 'node:fs';
import { setTimeout as delay } from 'node:timers/promises';
import { cli, initHome, pair, startServe, tempDir } from '../helpers/appliance.js';

const BS = 512 * 1024;

function post(url: string, token: string, body: unknown): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(new URL('/v1/blocks/get', url), {
      method: 'POST',
      rejectUnauthorized: false,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    }, resolve);
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

test('blocks/get over a socket: exact blocks answer after answer; a client gone mid-stream leaves the server serving', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-get-'));
  const home = await Home.init(join(dir, 'home'), 'get');
  const store = await Store.open(home.paths.store);
  const server = await startServer({ home, store, logger: false, listen: '127.0.0.1:0' });
  t.after(async () => {
    await server.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });
  const blocks = Array.from({ length: 48 }, () => randomBytes(BS));
  await store.putBlocks((async function* () {
    for (const b of blocks) yield { hash: hashBlock(b), data: b };
  })());
  await store.flush();
  const hashes = blocks.map((b) => hashBlock(b).toString('hex'));
  const token = home.token();

  for (let round = 0; round < 3; round++) {
    // A client gone after the first bytes of a long answer.
    const cut = await post(server.url, token, { hashes });
    assert.equal(cut.statusCode, 200);
    await new Promise<void>((resolve) => cut.once('data', () => resolve()));
    cut.destroy();
    // A whole answer, read slowly enough that the server waits for 'drain'.
    const res = await post(server.url, token, { hashes });
    assert.equal(res.statusCode, 200);
    let i = 0;
    for await (const f of decodeFrames(res, { verify: true })) {
      assert.ok(f.data.equals(blocks[i]!), `round ${round}: block ${i} exact`);
      i++;
      if (i % 8 === 0) await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal(i, blocks.length);
  }
});

/** A cloud appliance (its server started with `env`) holding 64 random blocks of BS (32 MiB: more than the sockets buffer) pushed to it, and their hashes. */
async function servingBlocks(t: Parameters<typeof initHome>[0], env: Record<string, string>) {
  const [a, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  const sb = await startServe(t, b, '127.0.0.1:0', env);
  await pair(a, 'cloud', b, sb);
  const img = join(tempDir(t), 'disk.img');
  const blocks = Array.from({ length: 64 }, () => randomBytes(BS));
  writeFileSync(img, Buffer.concat(blocks));
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', img)).code, 0);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  return { b, sb, blocks, hashes: blocks.map((d) => hashBlock(d).toString('hex')) };
}

test('blocks/get answers are sent 8 at a time: a 9th waits for a slot, then gets 503 ERR_SERVER_BUSY; an answer its client does not read is cut after the stall time, freeing its slot', async (t) => {
  // Stalled answers are cut after 3 s here (60 s by default); a request waits 1 s for a slot.
  const { b, sb, blocks, hashes } = await servingBlocks(t, { TANDEM_STALL_MS: '3000', TANDEM_STREAM_WAIT_MS: '1000' });
  // 8 answers whose client reads nothing past their headers.
  const stalled = await Promise.all(Array.from({ length: 8 }, () => post(sb.url, b.token, { hashes })));
  for (const r of stalled) {
    assert.equal(r.statusCode, 200);
    r.pause();
  }
  const ninth = await post(sb.url, b.token, { hashes: hashes.slice(0, 1) });
  assert.equal(ninth.statusCode, 503);
  assert.equal(JSON.parse(await text(ninth)).error.code, 'ERR_SERVER_BUSY');
  // Cut after the stall time: each stalled answer ends short, and the server answers again.
  await delay(4500);
  let complete = 0;
  await Promise.all(stalled.map(async (r) => {
    try {
      let got = 0;
      for await (const c of r) got += (c as Buffer).length;
      if (got >= blocks.length * BS) complete++;
    } catch {
      /* cut */
    }
  }));
  assert.equal(complete, 0, 'every stalled answer was cut short');
  const again = await post(sb.url, b.token, { hashes: hashes.slice(0, 2) });
  assert.equal(again.statusCode, 200);
  let n = 0;
  for await (const f of decodeFrames(again, { verify: true })) {
    assert.ok(f.data.equals(blocks[n]!));
    n++;
  }
  assert.equal(n, 2);
  assert.match(sb.stderr(), /blocks\/get from .* ended: its client took no byte for 3 s \(stalled\)/);
});

test('while a request waits for a blocks/get slot, the answer whose client takes it slowest (under 16 KiB/s) is cut and the slot passes on; readers that keep up, and slow ones while nobody waits, are not cut', async (t) => {
  // Rates over 2 s of waiting here (30 s by default); a request waits up to 20 s for a slot.
  const { b, sb, blocks, hashes } = await servingBlocks(t, { TANDEM_SLOW_WINDOW_MS: '2000', TANDEM_STREAM_WAIT_MS: '20000' });
  // 8 answers whose clients take 2 KiB every 200 ms (10 KB/s: under the 16 KiB/s floor).
  const slow = await Promise.all(Array.from({ length: 8 }, () => post(sb.url, b.token, { hashes })));
  const ticks = slow.map((r) => {
    assert.equal(r.statusCode, 200);
    r.pause();
    r.on('error', () => undefined); // the cut one
    return setInterval(() => r.read(2048), 200);
  });
  t.after(() => {
    for (const tick of ticks) clearInterval(tick);
    for (const r of slow) r.destroy();
  });
  // Nobody waits: 3 s on, no slow answer has been cut.
  await delay(3000);
  assert.doesNotMatch(sb.stderr(), /blocks\/get from .* ended: its client took/);
  // A 9th request (a pull's) waits, one slow answer is cut, and it is answered in full.
  const t0 = Date.now();
  const ninth = await post(sb.url, b.token, { hashes: hashes.slice(0, 2) });
  assert.equal(ninth.statusCode, 200);
  let n = 0;
  for await (const f of decodeFrames(ninth, { verify: true })) {
    assert.ok(f.data.equals(blocks[n]!));
    n++;
  }
  assert.equal(n, 2);
  assert.ok(Date.now() - t0 < 15_000, `answered after ${Date.now() - t0} ms`);
  assert.match(sb.stderr(), /blocks\/get from .* ended: its client took \d+ bytes in the last \d+ s the server waited for it \([\d.]+ B\/s, under the 16 KiB\/s/);
  // Exactly one was cut for it (its client learns it once it has read what its socket holds).
  assert.equal(sb.stderr().match(/blocks\/get from .* ended: its client took/g)?.length, 1);
});

async function text(res: IncomingMessage): Promise<string> {
  let s = '';
  for await (const c of res) s += (c as Buffer).toString();
  return s;
}
