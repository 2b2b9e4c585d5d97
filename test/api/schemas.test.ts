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
