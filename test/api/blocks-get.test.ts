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
