/**
 * The appliance's HTTPS API: the peer protocol (sync/README.md), the management routes other
 * modules add through `extraRoutes`, `POST /v1/cli` for forwarded CLI commands, and OpenAPI
 * docs at /docs.
 *
 * {@link buildServer} builds the app without listening (tests use `app.inject()`);
 * {@link startServer} listens with the home's TLS key and certificate; {@link listenLocal} also
 * serves the same app on a Unix socket for CLI commands of this machine. Every route but
 * GET /v1/health and the /docs pages requires `Authorization: Bearer <token>` (the docs
 * describe the API, they hold no data).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { chmodSync, rmSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import type { Server as TlsServer } from 'node:tls';
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify';
import type AjvCompiler from '@fastify/ajv-compiler';
import { TandemError } from '../common/errors.js';
import type { Home } from '../appliance/home.js';
import type { Store } from '../store/index.js';
import { FEATURES_HEADER, LEASE_HEADER, MAX_JSON_BODY, PROTOCOL_VERSION, SERVER_FEATURES } from '../sync/protocol.js';
import { errorAnswer, handleError, toTandemError } from './errors.js';
import { LeaseTable } from './leases.js';
import { peerRoutes } from './routes/peer.js';
import { cliRoutes } from './routes/cli.js';
import { newStats, type ServerStats } from './stats.js';
import { trace, tracing } from '../sync/trace.js';

/** Routes anyone may call: liveness for load balancers and peers, and the API description. */
const PUBLIC_PREFIXES = ['/v1/health', '/docs'];
/** Idle keep-alive connections are kept this long: a sync makes bursts of requests seconds apart. */
const KEEP_ALIVE_MS = 65_000;
/** A request must be fully received within this; block streams of a big sync can take hours, so 0 (off) there. */
const REQUEST_TIMEOUT_MS = 0;
/**
 * A body other than a block stream (JSON, at most 8 MiB) must arrive whole within this, or the
 * connection is closed: with no request timeout, a sender that stopped midway held its partial
 * body for ever (120 such requests took a server from 125 MiB to 1.1 GiB of RSS). The answer may
 * take as long as it takes (a forwarded command runs for hours). `TANDEM_BODY_MS` sets it (tests).
 */
const BODY_MS = Number(process.env.TANDEM_BODY_MS ?? 60_000);

export interface BuildServerOptions {
  readonly home: Home;
  readonly store: Store;
  /** Management routes of other modules, registered after the built-in ones (same auth, errors, docs). */
  readonly extraRoutes?: (app: FastifyInstance) => void | Promise<void>;
  /** Fastify/pino logger options; default: warnings and errors only, on stderr (stdout belongs to `--json`). */
  readonly logger?: FastifyServerOptions['logger'];
  /** A sync's lease on a volume expires after this long without a request or a block (default 120 s). */
  readonly leaseIdleMs?: number;
  /** TLS key and certificate; buildServer without them serves plain HTTP (app.inject in tests). */
  readonly https?: { key: string; cert: string };
}

export interface ServerContext {
  readonly stats: ServerStats;
  readonly leases: LeaseTable;
}

declare module 'fastify' {
  interface FastifyInstance {
    tandem: ServerContext;
  }
}

function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

/** How often the token files are looked at again: a rotation takes effect within this. */
const TOKEN_RECHECK_MS = 1000;

/** Routes that run commands on this appliance: the admin token only, never a peer's (and the admin token opens nothing else). */
const ADMIN_ROUTES = new Set(['/v1/cli']);
/** What the monitor token reads (the daemon's routes): nothing else. */
const MONITOR_ROUTES = new Set(['GET /metrics', 'GET /v1/status']);

/** Who a request's token is: this machine's CLI, a peer, a monitoring system. */
type Caller = 'admin' | 'peer' | 'monitor';

/**
 * The API tokens a request may carry: HOME/token and, during its grace period, the one a
 * rotation replaced (Home.acceptedTokens), the admin token (HOME/admin.token), which alone
 * opens {@link ADMIN_ROUTES}, and the monitor token (HOME/monitor.token), which opens
 * {@link MONITOR_ROUTES} only. The files are read again when they change, so `appliance token
 * rotate` takes effect in a running server without a restart.
 */
class TokenCheck {
  private digests: Buffer[] = [];
  private admin: Buffer = Buffer.alloc(0);
  private monitor: Buffer = Buffer.alloc(0);
  private stamp = '';
  private checked = 0;
  private until = Infinity;

  constructor(private readonly home: Home) {
    this.reload(Date.now());
  }

  private reload(now: number): void {
    const stat = (p: string) => statSync(p, { throwIfNoEntry: false });
    const p = this.home.paths;
    const files = [stat(p.token), stat(p.previousToken), stat(p.adminToken), stat(p.monitorToken)];
    const stamp = files.map((f) => (f ? `${f.mtimeMs}:${f.size}:${f.ino}` : '-')).join('/');
    this.checked = now;
    if (stamp === this.stamp && now < this.until) return;
    const tokens = this.home.acceptedTokens(now);
    this.digests = tokens.map(digest);
    this.admin = digest(this.home.adminToken());
    this.monitor = digest(this.home.monitorToken());
    this.stamp = stamp;
    // The previous token's end is when the set changes without a file changing.
    this.until = tokens.length > 1 ? now + TOKEN_RECHECK_MS : Infinity;
  }

  /** Whose token this is; null for a token that is none of them. */
  check(token: string): Caller | null {
    const now = Date.now();
    if (now - this.checked >= TOKEN_RECHECK_MS) this.reload(now);
    const d = digest(token);
    let who = this.match(d);
    // A token no file had when last read may be one rotated in since: look again, at most every
    // 50 ms (wrong tokens cost a stat, not a read, in between).
    if (who === null && now - this.checked >= 50) {
      this.reload(now);
      who = this.match(d);
    }
    return who;
  }

  private match(d: Buffer): Caller | null {
    let peer = false;
    for (const t of this.digests) peer = timingSafeEqual(d, t) || peer; // every one compared: no timing tell
    const admin = timingSafeEqual(d, this.admin);
    const monitor = timingSafeEqual(d, this.monitor);
    return admin ? 'admin' : peer ? 'peer' : monitor ? 'monitor' : null;
  }
}

/** Fastify's `ajv` server option: how request bodies, queries and parameters are validated. */
export const AJV_OPTIONS = { customOptions: { allErrors: false, coerceTypes: false, removeAdditional: false }, plugins: [] };

type BuildValidator = ReturnType<typeof AjvCompiler>;
type Validate = ((data: unknown, ctx?: unknown) => unknown) & { errors?: unknown; schemaEnv?: unknown };

type BuildSerializer = (externalSchemas: unknown, options: unknown) => (route: unknown) => (data: unknown) => string;

/**
 * Fastify's response serializer compiler (fast-json-stringify, which loads Ajv too), loaded at
 * its first use only. No route has a response schema, so a server never loads it; fastify
 * required it when it started.
 */
const serializerAtFirstUse: BuildSerializer = (externalSchemas, options) => {
  let compiler: ReturnType<BuildSerializer> | undefined;
  return (route) => {
    compiler ??= (require('@fastify/fast-json-stringify-compiler') as () => BuildSerializer)()(externalSchemas, options);
    return compiler(route);
  };
};

let selector: BuildValidator | undefined;
/** @fastify/ajv-compiler's selector, loaded once, at the first compile; one for all contexts, as fastify's own (it keeps their Ajv instances). */
function validatorSelector(): BuildValidator {
  return (selector ??= (require('@fastify/ajv-compiler') as typeof AjvCompiler)());
}

/**
 * Fastify's own validators (Ajv), each compiled at its route's first request rather than when the
 * server starts. Compiling all of them at start took ~150 ms of CPU, a fifth of a server's start
 * (`serve` ready in ~0.7 s); a server answers a handful of its routes in most of its runs (a
 * peer's syncs, forwarded commands). The Ajv instance is made at the first compile too, and Ajv
 * itself (88 modules, with @fastify/ajv-compiler) is loaded then: `load` gives the compiler. A
 * schema Ajv refuses fails its route's requests (500) instead of the start:
 * test/api/schemas.test.ts compiles every route's schemas.
 */
export function compiledAtFirstUse(load: () => BuildValidator): BuildValidator {
  return ((externalSchemas: unknown, options: unknown) => {
    let compiler: ReturnType<BuildValidator> | undefined;
    return (route: Parameters<ReturnType<BuildValidator>>[0]) => {
      let compiled: Validate | undefined;
      const validate: Validate = (data, ctx) => {
        if (!compiled) {
          compiler ??= (load() as (e: unknown, o: unknown) => ReturnType<BuildValidator>)(externalSchemas, options);
          compiled = compiler(route) as unknown as Validate;
          // As fastify reads it from Ajv's own functions: from the next call on, a root value can be replaced.
          validate.schemaEnv = compiled.schemaEnv;
        }
        const ok = ctx === undefined ? compiled(data) : compiled(data, ctx);
        validate.errors = compiled.errors;
        return ok;
      };
      return validate as unknown as ReturnType<ReturnType<BuildValidator>>;
    };
  }) as unknown as BuildValidator;
}

/** Build the API (not listening). */
export function buildServer(opts: BuildServerOptions): FastifyInstance {
  const app = Fastify({
    logger: opts.logger ?? { level: 'warn', stream: process.stderr },
    bodyLimit: MAX_JSON_BODY,
    keepAliveTimeout: KEEP_ALIVE_MS,
    requestTimeout: REQUEST_TIMEOUT_MS,
    ...(opts.https ? { https: { key: opts.https.key, cert: opts.https.cert } } : {}),
    ajv: AJV_OPTIONS,
    schemaController: { compilersFactory: { buildValidator: compiledAtFirstUse(validatorSelector), buildSerializer: serializerAtFirstUse } },
    // Router-level failures (bad URL encoding, over-long parameters) answer in the catalog's shape too.
    frameworkErrors: (error: unknown, _req: unknown, reply: { status(n: number): { send(b: unknown): void } }) => {
      const err = toTandemError(error);
      reply.status(err.http).send(errorAnswer(err));
    },
    // Requests Node's HTTP parser refuses (headers over its 16 KiB, malformed ones) answer in the
    // catalog's shape too; fastify's own answer was {"error": "Request Header Fields Too Large"}.
    clientErrorHandler: (error: NodeJS.ErrnoException, socket: import('node:net').Socket) => {
      if (error.code === 'ECONNRESET' || !socket.writable) return void socket.destroy();
      const big = error.code === 'HPE_HEADER_OVERFLOW';
      const timeout = error.code === 'ERR_HTTP_REQUEST_TIMEOUT';
      const err = new TandemError('ERR_BAD_REQUEST', big ? 'the request headers are larger than this server takes (16 KiB); send them shorter' : timeout ? 'the request did not arrive in time' : `malformed HTTP request (${error.code ?? error.message}); send HTTP/1.1`);
      const body = JSON.stringify(errorAnswer(err));
      const status = big ? '431 Request Header Fields Too Large' : timeout ? '408 Request Timeout' : '400 Bad Request';
      socket.end(`HTTP/1.1 ${status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
      // What the client sent past the refused part is read and dropped (closed with it unread, the
      // socket would reset, and the client could lose the answer), for 5 s at most.
      socket.resume();
      setTimeout(() => socket.destroy(), 5_000).unref();
    },
  } as FastifyServerOptions) as unknown as FastifyInstance;
  const stats = newStats();
  const leases = new LeaseTable(opts.home, opts.leaseIdleMs);
  app.decorate('tandem', { stats, leases });
  const tokens = new TokenCheck(opts.home);

  // Block streams are consumed as streams by their route (bounded memory), never buffered.
  app.addContentTypeParser('application/octet-stream', (_req, payload, done) => done(null, payload));
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((req, reply) => {
    const err = new TandemError('ERR_NOT_FOUND', `no route ${req.method} ${req.url.split('?')[0]}; see /docs for the API`);
    void reply.status(404).send(errorAnswer(err));
  });

  const bodyTimers = new WeakMap<object, ReturnType<typeof setTimeout>>();
  const bodyDone = (req: { raw: object }) => {
    clearTimeout(bodyTimers.get(req.raw));
    bodyTimers.delete(req.raw);
  };
  app.addHook('onRequest', async (req) => {
    const hasBody = req.headers['transfer-encoding'] !== undefined || Number(req.headers['content-length'] ?? 0) > 0;
    if (!hasBody || String(req.headers['content-type'] ?? '').startsWith('application/octet-stream')) return;
    const timer = setTimeout(() => {
      req.log.warn(`${req.method} ${req.url} from ${req.ip}: its body did not arrive whole within ${BODY_MS / 1000} s; connection closed`);
      req.raw.destroy();
    }, BODY_MS);
    timer.unref();
    bodyTimers.set(req.raw, timer);
  });
  app.addHook('preValidation', async (req) => bodyDone(req)); // the body is parsed: it arrived whole
  app.addHook('onResponse', async (req) => bodyDone(req));
  app.addHook('onRequestAbort', async (req) => bodyDone(req));
  app.addHook('onRequest', async (req, reply) => {
    void reply.header(FEATURES_HEADER, SERVER_FEATURES);
    // What the router matched, not the raw URL: it decodes %XX and cuts at '#' before matching,
    // so "/v1/%63li" and "/v1/cli#x" are /v1/cli, and a check of the raw URL let a peer's token
    // through to it. The raw path only where no route matched (answered 404, or 401 first).
    const path = req.routeOptions.url ?? req.url.split('?')[0]!;
    if (!(req.method === 'GET' && path === '/v1/stats')) {
      stats.requests++;
      const key = `${req.method} ${req.routeOptions.url ?? '(unknown)'}`;
      stats.routes[key] = (stats.routes[key] ?? 0) + 1;
    }
    if (PUBLIC_PREFIXES.some((p) => path === p || path.startsWith(p + '/'))) return;
    const auth = req.headers.authorization;
    const m = typeof auth === 'string' ? /^Bearer ([\x21-\x7e]{1,512})$/.exec(auth) : null;
    const who = m ? tokens.check(m[1]!) : null;
    if (who === null) {
      const err = new TandemError('ERR_UNAUTHORIZED', 'missing or wrong API token; send "Authorization: Bearer <token>" with the token `appliance init` printed for this appliance');
      return reply.status(401).send(errorAnswer(err));
    }
    if (who === 'admin' && !ADMIN_ROUTES.has(path)) {
      // A peer that was given this appliance's admin token (the wrong file pasted at `peer add`)
      // would hold a token that runs any command here: it opens nothing a peer uses.
      const me = opts.home.identity.name;
      const err = new TandemError('ERR_FORBIDDEN', `that is the admin token of appliance "${me}" (its HOME/admin.token), which runs commands there through POST /v1/cli only and never leaves that machine; ${req.method} ${path} takes the API token a peer is given: \`appliance token show\` on "${me}" prints it`);
      return reply.status(403).send(errorAnswer(err));
    }
    if (who === 'peer' && ADMIN_ROUTES.has(path)) {
      const err = new TandemError('ERR_FORBIDDEN', `${path} runs commands on this appliance and takes its admin token (HOME/admin.token), which the \`appliance\` command on this machine sends; a peer's token opens the peer protocol only`);
      return reply.status(403).send(errorAnswer(err));
    }
    if (who === 'monitor' && !MONITOR_ROUTES.has(`${req.method} ${path}`)) {
      const err = new TandemError('ERR_FORBIDDEN', `the monitor token (HOME/monitor.token) reads GET /metrics and GET /v1/status only; ${req.method} ${path} takes the API token`);
      return reply.status(403).send(errorAnswer(err));
    }
    const lease = req.headers[LEASE_HEADER];
    if (typeof lease === 'string') leases.touch(lease);
  });
  if (tracing) {
    app.addHook('onRequest', async (req) => trace(`server: ${req.method} ${req.url} arrived`));
    app.addHook('onResponse', async (req, reply) => trace(`server: ${req.method} ${req.url} answered ${reply.statusCode} in ${reply.elapsedTime.toFixed(1)} ms`));
  }
  app.addHook('onClose', async () => leases.releaseAll());

  void app.register(import('@fastify/swagger'), {
    openapi: {
      info: {
        title: 'Tandem appliance API',
        version: String(PROTOCOL_VERSION),
        description: 'Peer protocol and management API of a Tandem appliance. Every route but /v1/health and /docs needs a bearer token. See sync/README.md.',
      },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
  });
  void app.register(import('@fastify/swagger-ui'), { routePrefix: '/docs' });
  void app.register(async (child) => {
    peerRoutes(child, { home: opts.home, store: opts.store, leases, stats });
    cliRoutes(child);
    if (opts.extraRoutes) await opts.extraRoutes(child);
  });
  return app;
}

export interface StartServerOptions extends Omit<BuildServerOptions, 'https'> {
  /** HOST:PORT, [IPv6]:PORT or :PORT; port 0 picks a free port. */
  readonly listen: string;
}

export interface RunningServer {
  /** https://HOST:PORT actually bound. */
  readonly url: string;
  readonly app: FastifyInstance;
  close(): Promise<void>;
}

/** Parse HOST:PORT (ERR_USAGE when malformed). */
export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]*)):(\d{1,5})$/.exec(s.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new TandemError('ERR_USAGE', `--listen "${s}" is not HOST:PORT; write e.g. 0.0.0.0:7443, 127.0.0.1:0 or [::]:7443`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

/** Build and listen with the home's TLS key and certificate. */
export async function startServer(opts: StartServerOptions): Promise<RunningServer> {
  const { host, port } = parseListen(opts.listen);
  const app = buildServer({ ...opts, https: opts.home.tls() });
  try {
    await app.listen({ host, port });
  } catch (e) {
    await app.close().catch(() => {});
    const code = (e as NodeJS.ErrnoException).code;
    throw new TandemError('ERR_USAGE', `cannot listen on ${opts.listen}: ${code === 'EADDRINUSE' ? 'the port is in use; pick another with --listen' : (e as Error).message}`, { cause: e });
  }
  const addr = app.server.address();
  const bound = typeof addr === 'object' && addr ? addr : { address: host, port };
  const h = bound.address.includes(':') ? `[${bound.address}]` : bound.address;
  const reload = watchTls(opts.home, app.server as unknown as TlsServer);
  return { url: `https://${h}:${bound.port}`, app, close: () => { clearInterval(reload); return app.close(); } };
}

/** How often a server looks for a new key and certificate (`appliance tls rotate`). */
const TLS_RECHECK_MS = 1000;

/**
 * Serve the home's current key and certificate: after `appliance tls rotate` (forwarded to this
 * server, or run while it was down and finished by Home.load) new connections get the new pair
 * within {@link TLS_RECHECK_MS}; connections open before keep theirs. A pair caught between its
 * two renames fails to load and is tried again at the next check.
 */
function watchTls(home: Home, server: TlsServer): NodeJS.Timeout {
  const stamp = () => {
    const st = statSync(home.paths.tlsCert, { throwIfNoEntry: false });
    return st ? `${st.mtimeMs}:${st.ino}:${st.size}` : '';
  };
  let current = stamp();
  const timer = setInterval(() => {
    const now = stamp();
    if (now === current || now === '') return;
    try {
      server.setSecureContext(home.tls());
      current = now;
    } catch {
      // the key and the certificate do not match yet: the rotation is mid-rename
    }
  }, TLS_RECHECK_MS);
  timer.unref();
  return timer;
}

/** How long closing the Unix socket waits for an answer still being written. */
const LOCAL_CLOSE_MS = 2000;

/**
 * Serve `app` on a Unix socket as well (plain HTTP, the same routes, token check and hooks): a
 * CLI command forwarded on this machine (appliance/cli/forward.ts) then skips the TCP and TLS
 * handshakes, ~20 ms of a short command. The socket is made owner-only (0600) and the bearer
 * token is required as on the network. A file left at `path` by a server that died is replaced:
 * the caller holds the home, so no live server owns it. Resolves with null when the socket
 * cannot be made (a path over the 107-byte limit, a read-only run directory): the HTTPS
 * listener serves every command anyway.
 */
export async function listenLocal(app: FastifyInstance, path: string): Promise<{ readonly path: string; close(): Promise<void> } | null> {
  const server = createServer({ keepAliveTimeout: KEEP_ALIVE_MS, requestTimeout: REQUEST_TIMEOUT_MS }, (req, res) => app.routing(req, res));
  try {
    rmSync(path, { force: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    chmodSync(path, 0o600);
  } catch {
    server.close();
    return null;
  }
  return {
    path,
    // An answer being written (a forwarded command that just finished) goes out whole: the
    // connection ends with it (the client sends Connection: close). Any still open after
    // LOCAL_CLOSE_MS (a command that outlived the server's grace) is cut.
    close: () =>
      new Promise<void>((resolve) => {
        const cut = setTimeout(() => server.closeAllConnections(), LOCAL_CLOSE_MS);
        server.close(() => {
          clearTimeout(cut);
          resolve();
        });
        server.closeIdleConnections();
        rmSync(path, { force: true });
      }),
  };
}
