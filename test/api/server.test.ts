/**
 * The API server in-process (app.inject): authentication, the error catalog, schemas, the docs,
 * and fast-check fuzzing of every route (random methods, paths, headers, bodies, hashes, sizes):
 * never a 5xx, never a crash.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import type { FastifyInstance } from 'fastify';
import { Home } from '../../appliance/home.js';
import { buildServer, parseListen } from '../../api/index.js';
import { toTandemError } from '../../api/errors.js';
import { Store, hashBlock } from '../../store/index.js';
import { encodeFrames } from '../../sync/framing.js';
import { TandemError } from '../../common/errors.js';

async function server(t: { after(fn: () => Promise<void>): void }): Promise<{ app: FastifyInstance; token: string; store: Store }> {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-api-'));
  const home = await Home.init(join(dir, 'home'), 'api');
  const store = await Store.open(home.paths.store);
  const app = buildServer({ home, store, logger: false });
  await app.ready();
  t.after(async () => {
    await app.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });
  return { app, token: home.token(), store };
}

test('health and docs need no token; every other route answers 401 ERR_UNAUTHORIZED without one', async (t) => {
  const { app, token } = await server(t);
  const health = await app.inject({ method: 'GET', url: '/v1/health' });
  assert.equal(health.statusCode, 200);
  assert.equal(health.json().name, 'api');
  assert.ok(Math.abs(Date.parse(health.json().time) - Date.now()) < 5000, 'it tells its clock');
  const docs = await app.inject({ method: 'GET', url: '/docs/json' });
  assert.equal(docs.statusCode, 200);
  assert.ok(docs.json().paths['/v1/blocks/has'], 'the OpenAPI document lists the protocol routes');
  for (const [method, url] of [['GET', '/v1/stats'], ['POST', '/v1/blocks/has'], ['POST', '/v1/cli'], ['GET', '/v1/nowhere']] as const) {
    const r = await app.inject({ method, url, payload: method === 'POST' ? {} : undefined });
    assert.equal(r.statusCode, 401, url);
    assert.equal(r.json().error.code, 'ERR_UNAUTHORIZED');
    const wrong = await app.inject({ method, url, headers: { authorization: `Bearer ${token}x` } });
    assert.equal(wrong.statusCode, 401);
  }
  const nf = await app.inject({ method: 'GET', url: '/v1/nowhere', headers: { authorization: `Bearer ${token}` } });
  assert.equal(nf.statusCode, 404);
  assert.equal(nf.json().error.code, 'ERR_NOT_FOUND');
});

test('bad requests get 400 ERR_BAD_REQUEST with a message; catalog errors keep their status', async (t) => {
  const { app, token } = await server(t);
  const auth = { authorization: `Bearer ${token}` };
  const bad = await app.inject({ method: 'POST', url: '/v1/blocks/has', headers: auth, payload: { hashes: ['nothex'] } });
  assert.equal(bad.statusCode, 400);
  assert.equal(bad.json().error.code, 'ERR_BAD_REQUEST');
  assert.match(bad.json().error.message, /hashes/);
  const tooMany = await app.inject({ method: 'POST', url: '/v1/blocks/has', headers: auth, payload: { hashes: Array(5000).fill('0'.repeat(64)) } });
  assert.equal(tooMany.statusCode, 400);
  const missing = await app.inject({ method: 'POST', url: '/v1/nodes/get', headers: auth, payload: { hashes: ['1'.repeat(64)] } });
  assert.equal(missing.statusCode, 404);
  assert.equal(missing.json().error.code, 'ERR_NODE_MISSING');
  const h = hashBlock(Buffer.alloc(4096, 7)).toString('hex');
  const incomplete = await app.inject({
    method: 'POST', url: '/v1/snapshots/commit', headers: auth,
    payload: { snapshot: { id: '20260101T000000.000Z-abcdef', volume: 'v', size: 4096, blockSize: 4096, root: h, height: 1, created: '2026-01-01T00:00:00.000Z', parent: null, origin: 'test', nonZeroBlocks: 1 } },
  });
  assert.equal(incomplete.statusCode, 409);
  assert.equal(incomplete.json().error.code, 'ERR_SNAPSHOT_INCOMPLETE');
  const badBase = await app.inject({ method: 'POST', url: '/v1/nodes/put', headers: auth, payload: { nodes: [{ hash: h, level: 1, children: [h], base: 'nothex' }] } });
  assert.equal(badBase.statusCode, 400);
  assert.match(badBase.json().error.message, /base/);
  const mismatch = await app.inject({ method: 'POST', url: '/v1/nodes/get', headers: auth, payload: { hashes: [h], bases: [h, null] } });
  assert.equal(mismatch.statusCode, 400);
  assert.match(mismatch.json().error.message, /one per node/);
  // A node goes whole (children) or as a change of its base (base + changed), never both or neither.
  for (const node of [{ hash: h, level: 1, children: [h], base: h, changed: [[0, h]] }, { hash: h, level: 1, changed: [[0, h]] }, { hash: h, level: 1 }, { hash: h, level: 1, base: h, changed: [[-1, h]] }]) {
    const r = await app.inject({ method: 'POST', url: '/v1/nodes/put', headers: auth, payload: { nodes: [node] } });
    assert.equal(r.statusCode, 400, JSON.stringify(node));
    assert.equal(r.json().error.code, 'ERR_BAD_REQUEST');
  }
  const huge = await app.inject({ method: 'POST', url: '/v1/nodes/put', headers: { ...auth, 'content-type': 'application/json' }, payload: 'x'.repeat(9 * 1024 * 1024) });
  assert.equal(huge.statusCode, 413);
  assert.equal(huge.json().error.code, 'ERR_PAYLOAD_TOO_LARGE');
  const garbage = await app.inject({ method: 'POST', url: '/v1/blocks/put', headers: { ...auth, 'content-type': 'application/octet-stream' }, payload: Buffer.from('not frames at all, definitely not') });
  assert.equal(garbage.statusCode, 422);
  assert.equal(garbage.json().error.code, 'ERR_BLOCK_CORRUPT');
  const badRepair = await app.inject({ method: 'POST', url: '/v1/blocks/repair', headers: { ...auth, 'content-type': 'application/octet-stream' }, payload: Buffer.from('not frames at all, definitely not') });
  assert.equal(badRepair.statusCode, 422);
  assert.equal(badRepair.json().error.code, 'ERR_BLOCK_CORRUPT');
  const damage = await app.inject({ method: 'GET', url: '/v1/damage', headers: auth });
  const listed = damage.json() as { blocks: unknown[]; nodes: unknown[] };
  assert.deepEqual([listed.blocks, listed.nodes], [[], []]);
});

test("an upload that ends with the sender's own error frame is answered 400 ERR_BAD_REQUEST naming it, not as this appliance's error", async (t) => {
  const { app, token } = await server(t);
  const block = Buffer.alloc(4096, 9);
  const chunks: Buffer[] = [];
  for await (const c of encodeFrames((async function* () {
    yield { hash: hashBlock(block), data: block };
    throw new TandemError('ERR_DISK_FULL', 'no space left on the sender');
  })(), { errorFrames: true })) chunks.push(Buffer.from(c));
  const r = await app.inject({ method: 'POST', url: '/v1/blocks/put', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' }, payload: Buffer.concat(chunks) });
  assert.equal(r.statusCode, 400);
  assert.equal(r.json().error.code, 'ERR_BAD_REQUEST');
  assert.match(r.json().error.message, /the sender ended its block stream with its own error \(ERR_DISK_FULL: no space left on the sender\)/);
});

test('a full disk met anywhere in a route is ERR_DISK_FULL (507), not an internal error', () => {
  const leveldb = Object.assign(new Error('IO error: /x/index/000012.log: No space left on device'), { code: 'LEVEL_IO_ERROR' });
  const fs = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC', syscall: 'write' });
  for (const e of [leveldb, fs]) {
    const t = toTandemError(e);
    assert.equal(t.code, 'ERR_DISK_FULL', e.message);
    assert.equal(t.http, 507);
    assert.match(t.message, /free space/);
  }
  assert.equal(toTandemError(new Error('something else')).code, 'ERR_INTERNAL');
});

test("an error of the store's index met in a route is ERR_IO (or ERR_DISK_FULL) that says the appliance reopens the index (restart if it persists), not an internal error", () => {
  // classic-level's error for a write after LevelDB kept a failed log sync (its bg_error).
  const eio = Object.assign(new Error('Corruption: IO error: /h/store/index/000003.log: Input/output error'), { code: 'LEVEL_IO_ERROR' });
  const full = Object.assign(new Error('Failed to write batch'), { code: 'LEVEL_IO_ERROR', cause: Object.assign(new Error('IO error: /h/store/index/000003.log: No space left on device'), { code: 'LEVEL_IO_ERROR' }) });
  const a = toTandemError(eio);
  assert.equal(a.code, 'ERR_IO');
  assert.match(a.message, /failed a write .*Input\/output error.*restart the appliance/);
  const b = toTandemError(full);
  assert.equal(b.code, 'ERR_DISK_FULL');
  assert.match(b.message, /free space on that disk, then the index takes no write until it is reopened, which a running appliance tries by itself .*if it persists, restart the appliance/);
});

test('parseListen takes HOST:PORT, [IPv6]:PORT and :PORT and refuses the rest', () => {
  assert.deepEqual(parseListen('127.0.0.1:0'), { host: '127.0.0.1', port: 0 });
  assert.deepEqual(parseListen('[::1]:7443'), { host: '::1', port: 7443 });
  assert.deepEqual(parseListen(':7443'), { host: '0.0.0.0', port: 7443 });
  for (const bad of ['7443', 'host:99999', 'a b:1', '']) assert.throws(() => parseListen(bad), { code: 'ERR_USAGE' });
});

const ROUTES = [
  ['GET', '/v1/health'], ['GET', '/v1/stats'], ['GET', '/v1/volumes/{v}/snapshots/latest'], ['GET', '/v1/volumes/{v}/snapshots/{s}'],
  ['POST', '/v1/volumes/{v}/lock'], ['DELETE', '/v1/volumes/{v}/lock/{s}'], ['POST', '/v1/nodes/has'], ['POST', '/v1/nodes/get'],
  ['POST', '/v1/nodes/put'], ['POST', '/v1/blocks/has'], ['POST', '/v1/blocks/get'], ['POST', '/v1/blocks/put'], ['POST', '/v1/snapshots/commit'],
  ['POST', '/v1/cli'], ['PUT', '/v1/blocks/has'], ['GET', '/docs/json'], ['GET', '/v1/damage'], ['POST', '/v1/blocks/repair'],
] as const;

test('fuzzing every route with random bodies, headers, hashes and sizes never gives a 5xx', async (t) => {
  const { app, token } = await server(t);
  const hex = fc.stringMatching(/^[0-9a-f]{64}$/);
  const segment = fc.oneof(fc.string({ maxLength: 40 }), fc.constantFrom('vol', '..', '%00', 'a'.repeat(300), '20260101T000000.000Z-abcdef'));
  const anyHash = fc.oneof(hex, fc.string({ maxLength: 70 }), fc.integer(), fc.constant(null));
  const body = fc.oneof(
    fc.constant(undefined),
    fc.json({ maxDepth: 3 }),
    fc.record({ hashes: fc.array(anyHash, { maxLength: 20 }) }),
    fc.record({ nodes: fc.array(fc.record({ hash: anyHash, level: fc.integer({ min: -2, max: 40 }), children: fc.array(anyHash, { maxLength: 4 }) }), { maxLength: 3 }) }),
    fc.record({ holder: fc.string({ maxLength: 200 }), ifRoot: anyHash }),
    fc.record({ snapshot: fc.record({ id: fc.string(), volume: fc.string(), size: fc.oneof(fc.integer(), fc.double()), blockSize: fc.integer(), root: anyHash, height: fc.integer(), created: fc.string(), parent: fc.constant(null), origin: fc.string(), nonZeroBlocks: fc.integer() }) }),
    fc.record({ argv: fc.array(fc.string({ maxLength: 20 }), { maxLength: 5 }) }),
    fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
  );
  const headers = fc.record({
    auth: fc.constantFrom('good', 'none', 'wrong', 'garbage'),
    type: fc.constantFrom('application/json', 'application/octet-stream', 'text/plain', 'multipart/form-data', undefined),
  });
  let n = 0;
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(...ROUTES), segment, segment, body, headers, async ([method, pattern], v, s, payload, h) => {
      const url = pattern.replace('{v}', encodeURIComponent(v)).replace('{s}', encodeURIComponent(s));
      const hdr: Record<string, string> = {};
      if (h.auth === 'good') hdr.authorization = `Bearer ${token}`;
      if (h.auth === 'wrong') hdr.authorization = 'Bearer nope';
      if (h.auth === 'garbage') hdr.authorization = '\u00ff\u00fe';
      if (h.type) hdr['content-type'] = h.type;
      // A forwarded CLI command line is real work (it runs the command): keep to harmless words.
      const safe = url === '/v1/cli' && payload && typeof payload === 'object' && 'argv' in payload ? { argv: ['node', 'appliance', '--help'] } : payload;
      const r = await app.inject({
        method,
        url,
        headers: hdr,
        ...(safe === undefined ? {} : { payload: Buffer.isBuffer(safe) ? safe : typeof safe === 'string' ? safe : JSON.stringify(safe) }),
      });
      n++;
      assert.ok(r.statusCode < 500, `${method} ${url} -> ${r.statusCode} ${r.body.slice(0, 300)}`);
      if (r.statusCode >= 400) assert.ok(r.json().error?.code, `error answers carry a catalog code: ${r.body.slice(0, 200)}`);
    }),
    { numRuns: 400 },
  );
  assert.equal(n, 400);
  assert.equal((await app.inject({ method: 'GET', url: '/v1/health' })).statusCode, 200, 'still alive');
});

test('fuzzing delta frames in blocks/put and bases in blocks/get never gives a 5xx; only blocks that verify are stored', async (t) => {
  const { app, token, store } = await server(t);
  const auth = { authorization: `Bearer ${token}` };
  const held = Buffer.alloc(8192, 7);
  await store.putBlocks((async function* () { yield { hash: hashBlock(held), data: held }; })());
  const frame = (codec: number, hash: Buffer, rawLen: number, payload: Buffer) => {
    const h = Buffer.alloc(42);
    h[0] = 0x42;
    h[1] = codec;
    hash.copy(h, 2);
    h.writeUInt32BE(rawLen, 34);
    h.writeUInt32BE(payload.length, 38);
    return Buffer.concat([h, payload]);
  };
  const end = (n: number) => frame(0, Buffer.alloc(32), n, Buffer.alloc(0)).fill(0x45, 0, 1);
  const patch = fc.tuple(fc.integer({ min: 0, max: 9000 }), fc.uint8Array({ minLength: 0, maxLength: 40 }));
  let stored = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom('held', 'zero', 'absent'),
      fc.array(patch, { maxLength: 4 }),
      fc.oneof(fc.constant(8192), fc.integer({ min: 0, max: 20000 })),
      fc.boolean(),
      // Trailing junk half the time: a run is then well formed often enough (~1 in 20) that 300
      // runs always take some (with junk 1 in 17 of the time, none were taken in about 1 run in 8).
      fc.oneof(fc.constant(new Uint8Array(0)), fc.uint8Array({ minLength: 1, maxLength: 16 })),
      async (which, patches, rawLen, truthful, junk) => {
        const base = which === 'held' ? hashBlock(held) : which === 'zero' ? Buffer.alloc(32) : hashBlock(Buffer.from('absent'));
        const count = Buffer.alloc(4);
        count.writeUInt32BE(patches.length);
        const body = Buffer.concat([base, count, ...patches.flatMap(([off, bytes]) => {
          const head = Buffer.alloc(8);
          head.writeUInt32BE(off);
          head.writeUInt32BE(bytes.length, 4);
          return [head, Buffer.from(bytes)];
        }), Buffer.from(junk)]);
        // Sometimes the hash the patches really build (from the held or zero base), else a random one.
        let hash = hashBlock(Buffer.concat([Buffer.from('x'), Buffer.from(junk)])); // never the zero hash (always present)
        if (truthful && which !== 'absent' && junk.length === 0) {
          const built = which === 'held' ? Buffer.from(held) : Buffer.alloc(held.length);
          let ok = rawLen === held.length;
          let endAt = 0;
          for (const [off, bytes] of patches) {
            if (bytes.length === 0 || off < endAt || off + bytes.length > built.length) ok = false;
            else Buffer.from(bytes).copy(built, off);
            endAt = off + bytes.length;
          }
          if (ok) hash = hashBlock(built);
        }
        const r = await app.inject({ method: 'POST', url: '/v1/blocks/put', headers: { ...auth, 'content-type': 'application/octet-stream' }, payload: Buffer.concat([frame(2, hash, rawLen, body), end(1)]) });
        assert.ok(r.statusCode < 500, `${r.statusCode} ${r.body.slice(0, 300)}`);
        if (r.statusCode === 200) {
          const a = r.json() as { stored: number; needWhole?: string[] };
          if (which === 'absent') assert.deepEqual(a.needWhole, [hash.toString('hex')]);
          else {
            stored++;
            // All zeros is never stored (ZERO_HASH stands for it); anything else was, and verifies.
            if (!hash.equals(Buffer.alloc(32))) assert.ok((await store.getBlock(hash)).length === held.length, 'what was taken is stored and verifies (getBlock re-hashes it)');
          }
        } else {
          assert.equal(r.json().error.code, r.statusCode === 422 ? 'ERR_BLOCK_CORRUPT' : r.json().error.code);
          assert.deepEqual(await store.hasBlocks([hash]), [hash.equals(hashBlock(held))], 'nothing stored');
        }
      },
    ),
    { numRuns: 300 },
  );
  assert.ok(stored > 0, 'some deltas were well formed and taken');
  const get = fc.record({ hashes: fc.array(fc.constantFrom(hashBlock(held).toString('hex'), '0'.repeat(64)), { maxLength: 4 }), bases: fc.array(fc.oneof(fc.constant(null), fc.stringMatching(/^[0-9a-f]{64}$/), fc.constant(hashBlock(held).toString('hex'))), { maxLength: 5 }) });
  await fc.assert(
    fc.asyncProperty(get, async (payload) => {
      const r = await app.inject({ method: 'POST', url: '/v1/blocks/get', headers: auth, payload });
      assert.ok(r.statusCode < 500, `${r.statusCode} ${r.body.slice(0, 300)}`);
      if (payload.bases.length !== payload.hashes.length) assert.equal(r.statusCode, 400);
    }),
    { numRuns: 100 },
  );
});
