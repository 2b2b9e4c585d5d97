/**
 * The server compiles a route's validators at its first request (api/server.ts
 * compiledAtFirstUse), not when it starts: a schema Ajv refuses would only show on that route's
 * first request. Here every route of a served appliance (peer protocol, forwarded commands,
 * management and recovery routes) has each of its schemas compiled with the server's Ajv options,
 * and a refused body still gets 400 before and after the first compile.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import AjvCompiler from '@fastify/ajv-compiler';
import { Home } from '../../appliance/home.js';
import { applianceRoutes } from '../../appliance/routes.js';
import { AJV_OPTIONS, buildServer } from '../../api/server.js';
import { Store } from '../../store/index.js';

const PARTS = ['body', 'querystring', 'params', 'headers'] as const;

test("every route's request schemas compile with the server's Ajv options; a bad body is refused at the first request and after it", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-schemas-'));
  const home = await Home.init(join(dir, 'home'), 'schemas');
  const store = await Store.open(home.paths.store);
  const app = buildServer({ home, store, logger: false, extraRoutes: applianceRoutes(home, store) });
  const routes: Array<{ method: string; url: string; schema: Record<string, unknown> }> = [];
  app.addHook('onRoute', (r) => {
    if (r.schema) routes.push({ method: String(r.method), url: r.url, schema: r.schema as Record<string, unknown> });
  });
  t.after(async () => {
    await app.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });
  await app.ready();

  const compile = AjvCompiler()({}, AJV_OPTIONS as never);
  let compiled = 0;
  for (const r of routes) {
    for (const httpPart of PARTS) {
      const schema = r.schema[httpPart];
      if (schema === undefined) continue;
      assert.doesNotThrow(() => compile({ schema, method: r.method, url: r.url, httpPart } as never), `${r.method} ${r.url} ${httpPart}`);
      compiled++;
    }
  }
  // The peer protocol alone has more than 10 routes with a body schema: a hook that saw none of them would prove nothing.
  assert.ok(routes.some((r) => r.url === '/v1/blocks/has'), 'the peer routes were seen');
  assert.ok(routes.some((r) => r.url.startsWith('/v1/recovery') || r.url.startsWith('/v1/ebs') || r.url.startsWith('/v1/volumes')), 'the management routes were seen');
  assert.ok(compiled >= 15, `${compiled} schemas compiled`);

  const auth = { authorization: `Bearer ${home.token()}` };
  for (let i = 0; i < 2; i++) {
    const bad = await app.inject({ method: 'POST', url: '/v1/blocks/has', headers: auth, payload: { hashes: ['nothex'] } });
    assert.equal(bad.statusCode, 400, `request ${i + 1}`);
    assert.equal(bad.json().error.code, 'ERR_BAD_REQUEST');
  }
  const good = await app.inject({ method: 'POST', url: '/v1/blocks/has', headers: auth, payload: { hashes: ['ab'.repeat(32)] } });
  assert.equal(good.statusCode, 200, good.body);
});

test('every schema api/json-schema.ts builds is the JSON TypeBox builds from the same definitions', () => {
  // Load the schema modules a second time with TypeBox's `Type` in place of ours, and compare.
  const builderPath = require.resolve('../../api/json-schema.js');
  const modulePaths = [require.resolve('../../api/schemas.js'), require.resolve('../../appliance/recovery/routes.js')];
  const ours = modulePaths.map((p) => require(p) as Record<string, unknown>);
  const builder = require.cache[builderPath]!;
  const saved = builder.exports;
  const saveModules = modulePaths.map((p) => require.cache[p]);
  let theirs: Array<Record<string, unknown>>;
  try {
    builder.exports = { ...saved, Type: require('@sinclair/typebox').Type };
    for (const p of modulePaths) delete require.cache[p];
    theirs = modulePaths.map((p) => require(p) as Record<string, unknown>);
  } finally {
    builder.exports = saved;
    modulePaths.forEach((p, i) => { require.cache[p] = saveModules[i]; });
  }
  const json = (x: unknown) => JSON.parse(JSON.stringify(x)) as unknown;
  const kind = Symbol.for('TypeBox.Kind');
  let compared = 0;
  modulePaths.forEach((path, i) => {
    for (const [name, value] of Object.entries(ours[i]!)) {
      if (typeof value !== 'object' || value === null) continue;
      const other = theirs[i]![name];
      assert.deepEqual(json(value), json(other), `${path}: ${name}`);
      compared++;
      // The second load really was TypeBox's: its schemas carry TypeBox's Kind marker, ours do not.
      const first = (name === 'RECOVERY_SCHEMAS' ? (other as Record<string, object>).PrepareBody : other) as Record<symbol, unknown>;
      assert.ok(first[kind] !== undefined, `${name} of the second load was built by TypeBox`);
      assert.equal(((name === 'RECOVERY_SCHEMAS' ? (value as Record<string, object>).PrepareBody : value) as Record<symbol, unknown>)[kind], undefined);
    }
  });
  assert.ok(compared >= 20, `${compared} schemas compared`);
});

test('a route with a response schema is answered through fastify\'s serializer compiler, loaded at its first use', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-schemas-'));
  const home = await Home.init(join(dir, 'home'), 'serializer');
  const store = await Store.open(home.paths.store);
  const app = buildServer({
    home,
    store,
    logger: false,
    extraRoutes: (a) => {
      a.get('/v1/serialized', { schema: { response: { 200: { type: 'object', properties: { kept: { type: 'string' } } } } } }, async () => ({ kept: 'yes', dropped: 'the schema does not name it' }));
    },
  });
  t.after(async () => {
    await app.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });
  const r = await app.inject({ method: 'GET', url: '/v1/serialized', headers: { authorization: `Bearer ${home.token()}` } });
  assert.equal(r.statusCode, 200, r.body);
  assert.deepEqual(r.json(), { kept: 'yes' }, 'fast-json-stringify wrote only what the schema names');
});
