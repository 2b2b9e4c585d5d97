/**
 * RemotePeer: a peer appliance seen as a {@link ReplicaStore} over HTTPS ("a peer is just
 * another store"), so the sync engine copies to and from it exactly as between local stores.
 *
 * - TLS pinning: peers use self-signed certificates, so the certificate chain is not checked;
 *   instead the SHA-256 fingerprint of the certificate the peer presents must equal the pinned
 *   one. The check runs in the TLS connect callback, before any request is written: a wrong
 *   fingerprint sends no token and no data (ERR_PEER_FINGERPRINT).
 * - undici Pool: keep-alive, at most {@link DEFAULT_CONNECTIONS} connections.
 * - Retries with exponential backoff and jitter, honouring Retry-After, only for requests whose
 *   body is a small JSON document and whose effect is idempotent (has/get/latest, nodes/put and
 *   commit, which are idempotent by contract). A block stream (blocks/put) is never replayed:
 *   the engine recovers at a higher level by asking again which blocks are missing.
 * - `bwlimit` caps the block streams in each direction, all parallel streams together (sync/bwlimit.ts).
 */
import type { Readable } from 'node:stream';
import type { TLSSocket } from 'node:tls';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Pool as PoolType, buildConnector as BuildConnectorType, Dispatcher } from 'undici';
import { linkedAbort } from '../common/abort.js';
import { TandemError, abortError, isErrorCode, isTandemError } from '../common/errors.js';
import type { BlockFrame, GetBlocksOptions, Hash, NodeChangeToPut, NodeToPut, PutBlocksCallOptions, PutBlocksResult, ReplicaStore, SnapshotRecord, TreeNode } from '../store/types.js';
import { applyNodeChange, checkNodeChange, childChanges, isNodeChange } from '../store/tree.js';
import type { WirePutNodeT } from './schemas.js';
import { throttle, TokenBucket, type Rate } from '../sync/bwlimit.js';
import { BufferPool, coalesce, decodeFrames, encodeFrames, readAhead, takeRelease } from '../sync/framing.js';
import { DEFAULT_BLOCK_SIZE } from '../store/index.js';
import { AheadBudget } from '../store/ahead-budget.js';
import { FEATURE_BLOCK_DELTA, FEATURE_COMMIT_NODES, POINT_AT_HEADER, FEATURE_DELTA_DEFLATE, FEATURES_HEADER, LEASE_HEADER, MAX_HASHES_PER_REQUEST, MAX_NODES_PER_REQUEST, batches, changesFromWire, changesToWire, fromHex, toHex } from '../sync/protocol.js';
import type { ServerStats } from './stats.js';
import { trace, tracing } from '../sync/trace.js';
import { setFlagsFromString } from 'node:v8';

// undici parses HTTP with llhttp compiled to WebAssembly. By default V8 re-optimizes the hot
// functions of that module in the background, and a process cannot exit before those jobs end:
// ~150 ms added to every short sync on this hardware, for code the parser barely needs (block
// payloads pass through it as slices). The baseline compiler alone measured the same 1 GiB pull
// time (9.0-9.7 s either way) and a no-op sync ended 0.72 s -> 0.56 s after its start. It affects
// WebAssembly only, but any change of V8's flags also makes V8 refuse Node's cached code for its
// own modules (the flags' hash no longer matches): each one loaded afterwards is compiled from
// source (require of https, zlib and worker_threads: 7-8 ms before, 18-22 ms after). So the flag
// is set at the first connection, which compiles llhttp, when the command's modules are loaded,
// not when this module is (loading the sync engine took 108.7 +- 12.8 ms with it set here,
// 89.5 +- 8.1 ms without, hyperfine, 40 runs each).
let baselineWasm = false;
function useBaselineWasm(): void {
  if (baselineWasm) return;
  baselineWasm = true;
  setFlagsFromString('--liftoff-only');
}

// undici's entry point loads all of undici (fetch, WebSocket, mock agents, caches, proxies):
// 90-100 ms of every CLI start on this hardware (require('undici') 136-170 ms, the three modules
// below 45-67 ms). The client needs only the connection pool, the TLS connector and the request
// API, which the entry point adds to Dispatcher.prototype; we do the same. The paths are those of
// undici 7 (package-lock.json pins the version; every sync test goes through them).
const Pool = require('undici/lib/dispatcher/pool') as typeof PoolType;
const buildConnector = require('undici/lib/core/connect') as typeof BuildConnectorType;
Object.assign((require('undici/lib/dispatcher/dispatcher') as { prototype: object }).prototype, require('undici/lib/api'));

/** Parallel connections to one peer: enough to overlap a block stream with tree requests, few enough for a small appliance. */
const DEFAULT_CONNECTIONS = 4;
/** Attempts of an idempotent request before giving up (1 + 4 retries: ~6 s of backoff in all). */
const MAX_ATTEMPTS = 5;
/** First backoff delay; doubles each attempt, with full jitter. */
const BACKOFF_BASE_MS = 200;
/** Never wait longer than this between attempts, even if Retry-After asks for more. */
const BACKOFF_MAX_MS = 10_000;
/**
 * The largest JSON answer taken from a peer. The protocol's largest are a nodes/get of
 * MAX_NODES_PER_REQUEST whole nodes (~1 MiB) and management listings; a peer that sends more is
 * broken or hostile, and reading it whole would exhaust this process's memory (3 GB of JSON ended
 * a CLI in a V8 crash).
 */
const MAX_ANSWER_BYTES = 32 * 1024 * 1024;
/** An error answer's body is read up to this much (its message and details). */
const MAX_ERROR_ANSWER_BYTES = 1024 * 1024;
/**
 * Time for a JSON answer's body once its headers arrived. undici's body timeout is per chunk, so
 * a peer sending one byte every few seconds held a sync, or a daemon's job, for good.
 */
const ANSWER_BODY_MS = 60_000;

/** A peer that does not complete a TCP+TLS handshake in this time is unreachable. */
const CONNECT_TIMEOUT_MS = 10_000;
/** Encoded chunks (a header or a payload each) prepared ahead of the socket: 8 blocks' worth. */
const SEND_AHEAD_CHUNKS = 16;
/**
 * Chunks prepared ahead by every block upload of this process together: a sync's three streams
 * at full depth; more uploads at once (a daemon's two jobs) share it (store/ahead-budget.ts).
 */
export const sendAheadBudget = new AheadBudget(3 * SEND_AHEAD_CHUNKS, SEND_AHEAD_CHUNKS);
/**
 * Payload buffers of the default block size for blocks this process pulls, as the server has
 * for blocks it receives: the store they go to releases each after writing it.
 */
const receivePool = new BufferPool(DEFAULT_BLOCK_SIZE, 32);
/** Statuses that mean "try again later" rather than "no". */
const RETRYABLE_STATUS = new Set([429, 502, 503, 504]);
/** Socket-level failures worth a retry (the request may not have reached the peer). */
const RETRYABLE_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_CLOSED']);

/**
 * `AB:CD:...` (64 hex digits, any case, colons optional) → uppercase colon-separated, as
 * Home.fingerprint() prints. The forms an operator may have at hand for the same digest are
 * taken too: `sha256:` before it, or `openssl x509 -noout -fingerprint -sha256`'s whole line
 * (`sha256 Fingerprint=AB:...`).
 */
export function normalizeFingerprint(f: string): string {
  const hex = f.trim().replace(/^sha-?256(\s+fingerprint\s*=|:)\s*/i, '').replace(/:/g, '').toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex)) {
    throw new TandemError('ERR_USAGE', `"${f}" is not a SHA-256 certificate fingerprint; copy the one \`appliance init\` or \`serve\` printed on the peer (64 hex digits, colons optional)`);
  }
  return hex.match(/../g)!.join(':');
}

export interface RemotePeerOptions {
  /** https://HOST:PORT of the peer. */
  readonly url: string;
  readonly token: string;
  /** SHA-256 fingerprint of the peer's certificate. */
  readonly fingerprint: string;
  /**
   * The fingerprint of a certificate the peer staged (`appliance tls rotate`), learned from its
   * health answer over a connection pinned to {@link fingerprint}: taken as well, so the peer's
   * `tls rotate --activate` breaks no sync.
   */
  readonly nextFingerprint?: string;
  /** Name used in messages. */
  readonly name?: string;
  /** Cap on block stream bytes per second, each direction; 0 or absent: none. A function is a cap that changes as the sync runs (a schedule), asked every second. */
  readonly bwlimit?: Rate;
  readonly connections?: number;
  /** Aborts the requests in flight (a sync stopped: Ctrl-C, a daemon stopping) but a lease's release, which goes on. */
  readonly signal?: AbortSignal;
  /** Time for a JSON answer's body once its headers came (default {@link ANSWER_BODY_MS}). */
  readonly answerTimeoutMs?: number;
}

export interface PeerHealth {
  readonly status: string;
  readonly name: string;
  readonly id: string;
  readonly protocol: number;
  /** The peer's clock when it answered, ISO (absent from a peer of an older version). */
  readonly time?: string;
  /** The fingerprint of the certificate the peer staged and will serve next (absent when none is). */
  readonly nextFingerprint?: string;
}

export interface LockAnswer {
  readonly upToDate: boolean;
  readonly lease: string | null;
  readonly latest: SnapshotRecord | null;
  /** The certificate the peer staged (absent when none is, or from a peer that does not say). */
  readonly nextFingerprint?: string;
  /** Blocks and nodes the peer's last verify found damaged (GET /v1/damage); absent from a peer that does not say. */
  readonly damaged?: number;
  /** What a recovery of the volume there would take, unchecked (appliance/recovery-facts.ts checkRecoveryFacts); absent from a peer that does not say. */
  readonly recovery?: unknown;
}

/** A node as nodes/get answers it: whole, or as the changes of the base the request named. */
interface WireNode {
  hash: string;
  level: number;
  children?: string[];
  base?: string;
  changed?: Array<[number, string]>;
}

/**
 * A block upload's body as undici consumes it, giving each payload's pooled buffer back
 * (sync/framing.ts takeRelease) once the socket has taken it. undici asks for the next chunk only
 * after writing this one: it awaits 'drain' whenever the socket's write returns false, which it
 * does for every chunk above the socket's high-water mark (16 KiB; 64 KiB from Node 22) until the
 * TLS layer has consumed it, and pooled payloads are 256 KiB or more. After a failure the last chunk is not
 * given back (it is collected).
 */
async function* releasing(src: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  let release: (() => void) | undefined;
  for await (const chunk of src) {
    release?.();
    release = takeRelease(chunk);
    yield chunk;
  }
  release?.();
}

/** Bytes counted on the way through. */
async function* meter(src: AsyncIterable<Buffer>, add: (n: number) => void): AsyncGenerator<Buffer> {
  for await (const c of src) {
    add(c.length);
    yield c;
  }
}

function ignore(): void {}

async function* traced(frames: AsyncIterable<BlockFrame>): AsyncGenerator<BlockFrame> {
  let n = 0;
  for await (const f of frames) {
    if (n++ === 0) trace('client: first block frame read');
    yield f;
  }
  trace(`client: last of ${n} block frames read`);
}

/** A node for nodes/put: whole, or (`changes`) as the children that differ from its base's (see RemotePeer.putNodes). */
function wireNode(n: NodeToPut | NodeChangeToPut, changes: boolean): WirePutNodeT {
  if (isNodeChange(n)) return { hash: toHex(n.hash), level: n.level, base: toHex(n.base), changed: changesToWire(n.changed) };
  const base = n.base ? { base: toHex(n.base) } : {};
  const changed = changes && n.base && n.baseChildren ? childChanges(n.children, n.baseChildren) : null;
  if (changed) return { hash: toHex(n.hash), level: n.level, ...base, changed: changesToWire(changed) };
  return { hash: toHex(n.hash), level: n.level, children: n.children.map(toHex), ...base };
}

export class RemotePeer implements ReplicaStore {
  readonly name: string;
  readonly url: string;
  /** Requests sent (each attempt counts). */
  requests = 0;
  /** Nodes go to and come from the peer as changes of their base where that is shorter (false once it refused them: see putNodes, getNodes). */
  private nodeChanges = true;
  /**
   * The peer takes and sends delta frames: it named `block-delta` in the features header of an
   * answer (sync/protocol.ts). False until its first answer, and for an earlier release.
   */
  private deltaFrames = false;
  /** The peer takes a snapshot's last nodes with its commit: it named `commit-nodes` (sync/protocol.ts). */
  private commitNodes = false;

  /** The peer takes and sends deflated delta frames (codec 3): it named `delta-deflate` (sync/protocol.ts). */
  private deltasDeflated = false;
  /** Block stream bytes on the wire (framed, compressed), up and down. */
  wireBytesSent = 0;
  wireBytesReceived = 0;
  private readonly pool: PoolType;
  private readonly token: string;
  private readonly bwlimit: Rate;
  private readonly signal: AbortSignal | undefined;
  private readonly answerTimeoutMs: number;
  /** One bucket per direction, shared by parallel streams (null: no cap). */
  private readonly upBucket: TokenBucket | null;
  private readonly downBucket: TokenBucket | null;
  private lease: string | null = null;
  private leaseVolume: string | null = null;
  /** A connection opened ahead of the first request ({@link warmUp}), until the pool takes it. */
  private warm: Promise<TLSSocket | null> | null = null;
  private readonly warmConnect: () => void;
  /** Told when the connection {@link warmUp} opens fails, or shows a certificate other than the pinned one. */
  private onWarmFailure: ((e: TandemError) => void) | undefined;
  private closed = false;
  /** The fingerprint of the certificate the peer presented last (null before a connection). */
  presentedFingerprint: string | null = null;
  /**
   * The certificate the peer said it staged in its last lock answer (null: none, or a peer too
   * old to say), undefined before any lock answer (appliance/replicate.ts follows it).
   */
  peerStaged: string | null | undefined = undefined;

  constructor(opts: RemotePeerOptions) {
    let u: URL;
    try {
      u = new URL(opts.url);
    } catch {
      throw new TandemError('ERR_USAGE', `peer URL "${opts.url}" is not a URL; write https://HOST:PORT`);
    }
    if (u.protocol !== 'https:') throw new TandemError('ERR_USAGE', `peer URL "${opts.url}" must be https://HOST:PORT (peers talk over TLS only)`);
    this.url = u.origin;
    this.name = opts.name ?? u.host;
    this.token = opts.token;
    this.bwlimit = opts.bwlimit ?? 0;
    this.signal = opts.signal;
    this.answerTimeoutMs = opts.answerTimeoutMs ?? ANSWER_BODY_MS;
    const capped = typeof this.bwlimit === 'function' || this.bwlimit > 0;
    this.upBucket = capped ? new TokenBucket(this.bwlimit) : null;
    this.downBucket = capped ? new TokenBucket(this.bwlimit) : null;
    const pinned = normalizeFingerprint(opts.fingerprint);
    const next = opts.nextFingerprint === undefined ? null : normalizeFingerprint(opts.nextFingerprint);
    const name = this.name;
    // Chain validation is off on purpose: the fingerprint check below is stricter (exactly one
    // certificate). TLS session resumption is off because a resumed session shows no peer
    // certificate to check; a full handshake per connection is cheap next to a sync. `ca: []`:
    // with no CA list Node loads its bundled root certificates into the TLS context, which only
    // chain validation would use; parsing them took 24 ms of a cold CLI's sync (CPU profile).
    const base = buildConnector({ rejectUnauthorized: false, ca: [], timeout: CONNECT_TIMEOUT_MS, maxCachedSessions: 0 });
    const check = (socket: { destroy(): unknown }): TandemError | null => {
      const cert = (socket as TLSSocket).getPeerCertificate?.();
      const got = cert?.fingerprint256 ? normalizeFingerprint(cert.fingerprint256) : '(none)';
      if (got === pinned || got === next) {
        this.presentedFingerprint = got;
        return null;
      }
      socket.destroy();
      return new TandemError('ERR_PEER_FINGERPRINT', `peer ${name} at ${u.origin} presented certificate ${got}, not the pinned ${pinned}; nothing was sent. If the peer was re-initialized, pin its new certificate: \`appliance peer update ${name} --fingerprint F\` (and --token T if it has a new token)`, {
        details: { expected: pinned, got },
      });
    };
    const connect: BuildConnectorType.connector = (o, cb) => {
      useBaselineWasm(); // undici compiles llhttp once this connection is made
      const warm = this.warm;
      this.warm = null;
      const fresh = () =>
        base(o, (err, socket) => {
          if (err || !socket) return cb(err ?? new Error('connect failed'), null);
          const bad = check(socket);
          if (bad) return cb(bad, null);
          cb(null, socket);
        });
      if (!warm) return fresh();
      // A connection opened ahead by warmUp(): use it if its handshake worked and it is still open.
      void warm.then((socket) => {
        if (!socket || socket.destroyed || socket.readyState !== 'open') {
          socket?.destroy();
          return fresh();
        }
        socket.removeListener('error', ignore);
        trace('client: first request takes the warm connection');
        const bad = check(socket);
        if (bad) return cb(bad, null);
        cb(null, socket);
      });
    };
    this.warmConnect = () => {
      if (this.warm || this.closed) return;
      const port = u.port || '443';
      this.warm = new Promise((resolve) => {
        base({ hostname: u.hostname, host: u.host, protocol: u.protocol, port, servername: null as unknown as string, localAddress: null, httpSocket: undefined } as unknown as BuildConnectorType.Options, (err, socket) => {
          if (err || !socket) {
            if (!this.closed) this.onWarmFailure?.(this.transportError(err ?? new Error('connect failed'), 'connect'));
            return resolve(null);
          }
          socket.on('error', ignore);
          trace('client: warm connection ready');
          if (this.closed) {
            socket.destroy();
            return resolve(null);
          }
          // A wrong certificate is known now: tell the caller, and let the first request meet it
          // on a fresh connection of its own (it fails there the same way, before sending).
          const bad = check(socket);
          if (bad) {
            this.onWarmFailure?.(bad);
            return resolve(null);
          }
          resolve(socket as TLSSocket);
        });
      });
    };
    this.pool = new Pool(this.url, { connect, connections: opts.connections ?? DEFAULT_CONNECTIONS, keepAliveTimeout: 60_000, pipelining: 1 });
  }

  /**
   * Open one connection (TCP + TLS handshake) in the background, so the first request finds it
   * ready: a caller with local work to do first (a snapshot) overlaps the handshake with it. No
   * request is sent. The pinned fingerprint is checked when the handshake ends. A mismatch
   * (ERR_PEER_FINGERPRINT) or a failed connection (ERR_PEER_UNREACHABLE) goes to `onFailure`;
   * the first request then opens a connection of its own and meets it again. Harmless when
   * unused (closed by {@link close}).
   */
  warmUp(onFailure?: (e: TandemError) => void): void {
    this.onWarmFailure = onFailure;
    this.warmConnect();
  }

  async close(): Promise<void> {
    this.closed = true;
    const warm = this.warm;
    this.warm = null;
    if (warm) void warm.then((s) => s?.destroy());
    await this.pool.destroy().catch(() => {});
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { authorization: `Bearer ${this.token}`, ...extra };
    if (this.lease) h[LEASE_HEADER] = this.lease;
    return h;
  }

  /** What a request stopped by {@link signal} throws: the stop's own reason when it is one of ours, else ERR_INTERRUPTED. */
  private stopReason(signal = this.signal): TandemError {
    return abortError(signal ?? AbortSignal.abort(), `stopped while waiting for peer ${this.name}; rerun to resume`);
  }

  /** Map a transport failure to a catalog error. */
  private transportError(e: unknown, what: string): TandemError {
    if (isTandemError(e)) return e;
    const cause = (e as { cause?: unknown })?.cause;
    if (isTandemError(cause)) return cause;
    const code = (e as NodeJS.ErrnoException)?.code ?? '';
    return new TandemError('ERR_PEER_UNREACHABLE', `peer ${this.name} (${this.url}) failed during ${what}: ${(e as Error)?.message ?? String(e)} [${code}]; check that it runs (\`appliance serve\`) and the network, then rerun`, { cause: e, details: { code } });
  }

  /**
   * A JSON answer's body, parsed: at most `limit` bytes, read within {@link answerTimeoutMs}
   * (ERR_PEER_PROTOCOL otherwise; the connection is dropped).
   */
  private async readAnswer<T>(res: Dispatcher.ResponseData, what: string, limit = MAX_ANSWER_BYTES): Promise<T> {
    const declared = Number(res.headers['content-length']);
    const tooLarge = () => new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} answered ${what} with more than ${limit / 1024 / 1024} MiB of JSON, more than any answer of the protocol; nothing of it was used. Check the peer's version and health (\`appliance doctor\`)`, { details: { limit } });
    if (Number.isFinite(declared) && declared > limit) {
      res.body.destroy();
      throw tooLarge();
    }
    let slow = false;
    const timer = setTimeout(() => {
      slow = true;
      res.body.destroy();
    }, this.answerTimeoutMs);
    const chunks: Buffer[] = [];
    let n = 0;
    try {
      for await (const c of res.body as AsyncIterable<Buffer>) {
        n += c.length;
        if (n > limit) {
          res.body.destroy();
          throw tooLarge();
        }
        chunks.push(c);
      }
    } catch (e) {
      if (isTandemError(e)) throw e;
      if (this.signal?.aborted) throw this.stopReason();
      if (slow) throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} did not finish its answer to ${what} within ${this.answerTimeoutMs / 1000} s of starting it (${n} bytes came); the connection was dropped. Check the peer's load and the network, then rerun`, { details: { bytes: n } });
      throw this.transportError(e, what);
    } finally {
      clearTimeout(timer);
    }
    try {
      return JSON.parse(Buffer.concat(chunks, n).toString('utf8')) as T;
    } catch (e) {
      throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} sent a malformed answer to ${what}`, { cause: e });
    }
  }

  /** Turn an error answer into the peer's catalog error. */
  private async answerError(res: Dispatcher.ResponseData, what: string): Promise<TandemError> {
    let body: { error?: { code?: unknown; message?: unknown; details?: unknown } } = {};
    try {
      body = (await this.readAnswer<typeof body>(res, what, MAX_ERROR_ANSWER_BYTES)) ?? {};
    } catch {
      /* not JSON, too large or too slow */
    }
    if (typeof body !== 'object' || body === null) body = {};
    const code = body.error?.code;
    const msg = typeof body.error?.message === 'string' ? body.error.message : `HTTP ${res.statusCode}`;
    const details = (typeof body.error?.details === 'object' && body.error?.details !== null ? body.error.details : {}) as Record<string, unknown>;
    if (res.statusCode === 401) {
      return new TandemError('ERR_UNAUTHORIZED', `peer ${this.name} refused our token (${what}): it was rotated there (\`appliance token rotate\`) or the peer was re-initialized. Give this appliance the token \`appliance token show\` prints there: \`appliance peer update ${this.name} --token T\` (checked before it is written)`, { details });
    }
    if (isErrorCode(code)) return new TandemError(code, `peer ${this.name}: ${msg}`, { details: { ...details, status: res.statusCode } });
    return new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} answered ${what} with HTTP ${res.statusCode} and no error code; is it a Tandem appliance of a compatible version?`, { details: { status: res.statusCode } });
  }

  /** One request with JSON in and out; retried when `idempotent`. */
  private async json<T>(method: 'GET' | 'POST' | 'DELETE', path: string, body: unknown, idempotent: boolean, extraHeaders: Record<string, string> = {}, abortable = true): Promise<T> {
    const res = await this.send(method, path, body, idempotent, extraHeaders, abortable);
    return this.readAnswer<T>(res, `${method} ${path}`);
  }

  /** Send a request with a JSON body (or none); returns a 2xx response whose body the caller consumes. */
  private async send(method: 'GET' | 'POST' | 'DELETE', path: string, body: unknown, idempotent: boolean, extraHeaders: Record<string, string> = {}, abortable = true): Promise<Dispatcher.ResponseData> {
    const what = `${method} ${path}`;
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const signal = abortable ? this.signal : undefined;
    for (let attempt = 1; ; attempt++) {
      let wait: number | null = null;
      if (signal?.aborted) throw this.stopReason();
      try {
        this.requests++;
        const res = await this.pool.request({
          method,
          path,
          headers: this.headers(payload === undefined ? extraHeaders : { 'content-type': 'application/json', ...extraHeaders }),
          ...(payload === undefined ? {} : { body: payload }),
          ...(signal ? { signal } : {}),
        });
        if (res.statusCode < 300) {
          this.noteFeatures(res.headers);
          return res;
        }
        const err = await this.answerError(res, what);
        if (!(idempotent && RETRYABLE_STATUS.has(res.statusCode) && attempt < MAX_ATTEMPTS)) throw err;
        const ra = Number(res.headers['retry-after']);
        wait = Number.isFinite(ra) && ra >= 0 ? Math.min(BACKOFF_MAX_MS, ra * 1000) : null;
      } catch (e) {
        if (signal?.aborted) throw this.stopReason();
        if (isTandemError(e) && e.code !== 'ERR_PEER_UNREACHABLE') throw e;
        const err = this.transportError(e, what);
        if (err.code !== 'ERR_PEER_UNREACHABLE' || !idempotent || attempt >= MAX_ATTEMPTS || !RETRYABLE_CODES.has(String(err.details.code))) throw err;
      }
      await sleep(wait ?? Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (attempt - 1)));
    }
  }

  // --- identity, leases, counters, management (not part of ReplicaStore) ------------------

  /**
   * Call any JSON route of the peer (management routes of other modules, e.g. recovery):
   * bearer token, pinned TLS, catalog errors; retried only when `idempotent`.
   */
  async request<T = any>(method: 'GET' | 'POST' | 'DELETE', path: string, body?: unknown, idempotent = false): Promise<T> {
    if (!path.startsWith('/v1/')) throw new TandemError('ERR_USAGE', `peer route "${path}" must start with /v1/`);
    return this.json<T>(method, path, body, idempotent);
  }

  /** GET /v1/health (pinned TLS, no token needed). */
  async health(): Promise<PeerHealth> {
    return this.json<PeerHealth>('GET', '/v1/health', undefined, true);
  }

  /** Tell the peer that this appliance ({id, name}) accepts its staged certificate `fingerprint`; false when that is no longer the one staged there. */
  async ackStagedCertificate(fingerprint: string, me: { id: string; name: string }): Promise<boolean> {
    return (await this.json<{ recorded: boolean }>('POST', '/v1/tls/ack', { fingerprint, id: me.id, name: me.name }, true)).recorded;
  }

  /** The peer's receiving-side counters. */
  async stats(): Promise<ServerStats> {
    return this.json<ServerStats>('GET', '/v1/stats', undefined, true);
  }

  /**
   * Take the peer's lock of `volume` for this sync (sent with every later request and released
   * by commit or {@link releaseVolume}). With `ifRoot` equal to the peer's latest root the peer
   * answers upToDate and takes no lease: a no-op sync is this one request. A push passes
   * `ifRoot` (its snapshot's root) and a pull none: the peer refuses a push of a volume that runs
   * in EC2 after a failover (ERR_VOLUME_FAILED_OVER).
   */
  async lockVolume(volume: string, holder: string, push?: { readonly ifRoot: string; /** When the snapshot of that root was taken: an up-to-date peer dates its point by it (POINT_AT_HEADER). */ readonly pointAt?: string }): Promise<LockAnswer> {
    const a = await this.json<LockAnswer>('POST', `/v1/volumes/${encodeURIComponent(volume)}/lock`, { holder, ...(push ? { ifRoot: push.ifRoot } : {}) }, false, push?.pointAt ? { [POINT_AT_HEADER]: push.pointAt } : {});
    this.noteLockAnswer(a);
    if (a.lease) {
      this.lease = a.lease;
      this.leaseVolume = volume;
    }
    return a;
  }

  /** Keep what a lock answer says of the peer's staged certificate ({@link peerStaged}). */
  noteLockAnswer(a: LockAnswer): void {
    this.peerStaged = a.nextFingerprint ?? null;
  }

  /** Release the lease, if any (idempotent; errors ignored: the lease times out anyway). */
  async releaseVolume(): Promise<void> {
    const lease = this.lease;
    const vol = this.leaseVolume;
    this.lease = null;
    this.leaseVolume = null;
    if (!lease || !vol) return;
    await this.json('DELETE', `/v1/volumes/${encodeURIComponent(vol)}/lock/${lease}`, undefined, true, {}, false).catch(() => {});
  }

  // --- ReplicaStore -----------------------------------------------------------------------

  async latestSnapshot(volume: string): Promise<SnapshotRecord | null> {
    const a = await this.json<{ snapshot: SnapshotRecord | null }>('GET', `/v1/volumes/${encodeURIComponent(volume)}/snapshots/latest`, undefined, true);
    return a.snapshot ?? null;
  }

  async getSnapshot(volume: string, id: string): Promise<SnapshotRecord | null> {
    const a = await this.json<{ snapshot: SnapshotRecord | null }>('GET', `/v1/volumes/${encodeURIComponent(volume)}/snapshots/${encodeURIComponent(id)}`, undefined, true);
    return a.snapshot ?? null;
  }

  async commitSnapshot(record: SnapshotRecord): Promise<void> {
    await this.commit(record);
  }

  /**
   * {@link putNodes} and {@link commitSnapshot} in one request, when the peer takes that
   * (`commit-nodes`); else, or when it refuses the nodes (a node change whose base it lacks, say),
   * as two: the nodes on their own (whole where changes are refused), then the commit.
   */
  async commitWithNodes(record: SnapshotRecord, nodes: ReadonlyArray<NodeToPut | NodeChangeToPut>): Promise<void> {
    if (this.commitNodes && this.nodeChanges && nodes.length > 0 && nodes.length <= MAX_NODES_PER_REQUEST) {
      try {
        return await this.commit(record, nodes.map((n) => wireNode(n, true)));
      } catch (e) {
        if (!isTandemError(e, 'ERR_SNAPSHOT_INCOMPLETE')) throw e;
        trace(`client: commit with ${nodes.length} nodes refused (${e.code}); nodes sent on their own`);
      }
    }
    await this.putNodes(nodes);
    await this.commit(record);
  }

  private async commit(record: SnapshotRecord, nodes?: WirePutNodeT[]): Promise<void> {
    const hadLease = this.lease !== null && this.leaseVolume === record.volume;
    await this.json('POST', '/v1/snapshots/commit', nodes ? { snapshot: record, nodes } : { snapshot: record }, true);
    if (hadLease) {
      // The peer released the lease with the commit.
      this.lease = null;
      this.leaseVolume = null;
    }
  }

  async hasNodes(hashes: readonly Hash[]): Promise<boolean[]> {
    return this.presence('/v1/nodes/has', hashes, MAX_HASHES_PER_REQUEST);
  }

  async hasBlocks(hashes: readonly Hash[]): Promise<boolean[]> {
    return this.presence('/v1/blocks/has', hashes, MAX_HASHES_PER_REQUEST);
  }

  private async presence(path: string, hashes: readonly Hash[], max: number): Promise<boolean[]> {
    const out: boolean[] = [];
    for (const part of batches(hashes, max)) {
      const a = await this.json<{ present: boolean[] }>('POST', path, { hashes: part.map(toHex) }, true);
      if (!Array.isArray(a.present) || a.present.length !== part.length) {
        throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} answered ${path} with ${a.present?.length} flags for ${part.length} hashes`);
      }
      out.push(...a.present.map((x) => x === true));
    }
    return out;
  }

  /**
   * With `known` (a node this side holds at the same position of an earlier tree, per hash),
   * the peer answers a node as the children that differ from it where that is shorter, as
   * putNodes sends them; each is rebuilt here and checked against its hash. A peer of a release
   * without changes refuses the field (ERR_BAD_REQUEST): asked again without, from then on.
   */
  async getNodes(hashes: readonly Hash[], known?: ReadonlyArray<TreeNode | undefined>): Promise<TreeNode[]> {
    const out: TreeNode[] = [];
    for (let at = 0; at < hashes.length; at += MAX_NODES_PER_REQUEST) {
      const part = hashes.slice(at, at + MAX_NODES_PER_REQUEST);
      const alike = known?.slice(at, at + MAX_NODES_PER_REQUEST) ?? [];
      const bases = this.nodeChanges && alike.some((k) => k !== undefined) ? part.map((_, i) => (alike[i] ? toHex(alike[i]!.hash) : null)) : undefined;
      let a: { nodes: WireNode[] };
      try {
        a = await this.json<{ nodes: WireNode[] }>('POST', '/v1/nodes/get', { hashes: part.map(toHex), ...(bases ? { bases } : {}) }, true);
      } catch (e) {
        if (!bases || !isTandemError(e, 'ERR_BAD_REQUEST')) throw e;
        this.nodeChanges = false;
        a = await this.json<{ nodes: WireNode[] }>('POST', '/v1/nodes/get', { hashes: part.map(toHex) }, true);
      }
      if (!Array.isArray(a.nodes) || a.nodes.length !== part.length) throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} answered nodes/get with the wrong number of nodes`);
      a.nodes.forEach((n, i) => {
        const other = () => new TandemError('ERR_NODE_CORRUPT', `peer ${this.name} answered nodes/get with a node other than the one asked (${String(n?.hash).slice(0, 80)})`);
        if (n?.changed !== undefined) {
          // Built on the node named as its base, which must be the one this side offered.
          const base = alike[i];
          const pairs = n.changed as unknown;
          const wellFormed = Array.isArray(pairs) && pairs.every((p) => Array.isArray(p) && p.length === 2 && typeof p[1] === 'string' && /^[0-9a-f]{64}$/.test(p[1]));
          if (!base || n.base !== toHex(base.hash) || n.hash !== toHex(part[i]!) || !wellFormed) throw other();
          const change = { hash: part[i]!, level: n.level, base: base.hash, changed: changesFromWire(n.changed) };
          checkNodeChange(change);
          out.push(applyNodeChange(change, base));
          return;
        }
        const node = { hash: fromHex(n.hash), level: n.level, children: (n.children ?? []).map(fromHex) };
        if (!node.hash.equals(part[i]!) || !Number.isInteger(node.level) || node.children.length === 0) throw other();
        out.push(node);
      });
    }
    return out;
  }

  /**
   * Nodes go as changes of their base node where the engine knows its children (`baseChildren`)
   * and at most half differ: a 1 % change of 4 GiB puts ~90 children rather than ~7,900 (~0.5 MiB
   * of hex JSON the peer parsed and checked in ~10 ms). A peer that refuses a request with
   * changes gets it again with whole nodes: it lacks a base (ERR_SNAPSHOT_INCOMPLETE), or is of
   * a release without changes (ERR_BAD_REQUEST: whole nodes only, from then on).
   */
  async putNodes(nodes: ReadonlyArray<NodeToPut | NodeChangeToPut>): Promise<void> {
    for (const part of batches(nodes, MAX_NODES_PER_REQUEST)) {
      const wire = part.map((n) => wireNode(n, this.nodeChanges));
      try {
        await this.json('POST', '/v1/nodes/put', { nodes: wire }, true);
      } catch (e) {
        const changes = wire.filter((w) => w.changed !== undefined).length;
        const whole = changes > 0 && part.every((n) => !isNodeChange(n));
        if (!whole || !(isTandemError(e, 'ERR_SNAPSHOT_INCOMPLETE') || isTandemError(e, 'ERR_BAD_REQUEST'))) throw e;
        if (isTandemError(e, 'ERR_BAD_REQUEST')) this.nodeChanges = false;
        trace(`client: nodes/put with ${changes} node changes refused (${e.code}); sent whole`);
        await this.json('POST', '/v1/nodes/put', { nodes: part.map((n) => wireNode(n, false)) }, true);
      }
    }
  }

  /** Each frame putBlocks takes is released once the socket has its bytes, unless a cap slices them (ReplicaStore.releasesFrames). */
  get releasesFrames(): boolean {
    return this.upBucket === null;
  }

  /** The peer takes delta frames (ReplicaStore.deltas): known from its answers so far. */
  get deltas(): boolean {
    return this.deltaFrames;
  }

  /**
   * The frames, without the bases a local store attached when the peer takes no deltas (an
   * earlier release gets whole blocks). Decided frame by frame: early sending opens its upload
   * before the peer's first answer.
   */
  private async *basesIfTaken(frames: AsyncIterable<BlockFrame>): AsyncGenerator<BlockFrame> {
    for await (const f of frames) {
      if (f.delta && !this.deltaFrames) {
        // A stored delta was asked for (GetBlocksOptions.storedDeltas) because the peer took
        // deltas; it no longer does (an older release answers now). Nothing partial is kept.
        f.release?.();
        throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} stopped taking delta frames during the sync (an older release answers now?); run the sync again: it sends whole blocks to that release`);
      }
      if (!f.base || this.deltaFrames) yield f;
      else {
        f.base.release?.();
        const { base: _base, ...whole } = f;
        yield whole;
      }
    }
  }

  /** Read what the peer says it takes (FEATURES_HEADER) off an answer. */
  private noteFeatures(headers: Record<string, string | string[] | undefined>): void {
    const f = headers[FEATURES_HEADER];
    const named = typeof f === 'string' ? f.split(',').map((x) => x.trim()) : [];
    this.deltaFrames = named.includes(FEATURE_BLOCK_DELTA);
    this.deltasDeflated = named.includes(FEATURE_DELTA_DEFLATE);
    this.commitNodes = named.includes(FEATURE_COMMIT_NODES);
  }

  /**
   * Blocks in the order asked; one request per {@link MAX_HASHES_PER_REQUEST}, streamed. Each is
   * verified against its hash as it is decoded, unless the consumer verifies it itself
   * (`consumerVerifies`: a pull into the local store, whose putBlocks hashes every block).
   */
  async *getBlocks(hashes: readonly Hash[], opts: GetBlocksOptions = {}): AsyncIterable<BlockFrame> {
    // Deltas only for a consumer that verifies (and so resolves) them: a store's putBlocks.
    const deltas = this.deltaFrames && opts.consumerVerifies === true && opts.bases !== undefined;
    for (let at = 0; at < hashes.length; at += MAX_HASHES_PER_REQUEST) {
      const part = hashes.slice(at, at + MAX_HASHES_PER_REQUEST);
      const bases = deltas ? opts.bases!.slice(at, at + MAX_HASHES_PER_REQUEST).map((b) => (b ? toHex(b) : null)) : undefined;
      const body = bases?.some((b) => b !== null) ? { hashes: part.map(toHex), bases, ...(this.deltasDeflated ? { deflateDeltas: true } : {}) } : { hashes: part.map(toHex) };
      const signal = opts.signal;
      if (signal?.aborted) throw this.stopReason(signal);
      const res = await this.send('POST', '/v1/blocks/get', body, true);
      // Ended early (GetBlocksOptions.signal): the answer is dropped, even while a cap holds it.
      const drop = () => res.body.destroy();
      signal?.addEventListener('abort', drop, { once: true });
      let src: AsyncIterable<Buffer> = meter(res.body as AsyncIterable<Buffer>, (n) => (this.wireBytesReceived += n));
      if (this.downBucket) src = throttle(src, this.downBucket, signal);
      try {
        yield* decodeFrames(src, { verify: opts.consumerVerifies !== true, expect: part, pool: receivePool, deltas: 'bases' in body });
      } catch (e) {
        if (signal?.aborted) throw this.stopReason(signal);
        throw isTandemError(e) ? e : this.transportError(e, 'POST /v1/blocks/get');
      } finally {
        signal?.removeEventListener('abort', drop);
        if (!res.body.destroyed) res.body.destroy();
      }
    }
  }

  /** Stream blocks to the peer (one request, never replayed). The peer verifies each. */
  /**
   * Stream blocks to the peer (one request, never replayed). The peer verifies each. A frame with
   * a `base` goes as a delta of it when that is shorter and the peer takes deltas; the answer's
   * `needWhole` names those whose base the peer lacked (not stored: send them again without).
   */
  async putBlocks(frames: AsyncIterable<BlockFrame>, opts: PutBlocksCallOptions = {}): Promise<PutBlocksResult> {
    const a = await this.streamBlocks<{ stored: number; bytes: number; needWhole?: unknown }>('/v1/blocks/put', this.basesIfTaken(frames), opts.signal);
    trace('client: blocks/put answered');
    if (a.needWhole === undefined) return { stored: a.stored, bytes: a.bytes };
    if (!Array.isArray(a.needWhole) || !a.needWhole.every((h) => typeof h === 'string' && /^[0-9a-f]{64}$/.test(h))) {
      throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} answered blocks/put with a malformed needWhole list`);
    }
    return { stored: a.stored, bytes: a.bytes, needWhole: (a.needWhole as string[]).map(fromHex) };
  }

  /** What the peer's last verify found damaged or missing (GET /v1/damage). */
  async damage(): Promise<{ at: string; blocks: string[]; nodes: string[] }> {
    const d = await this.json<{ at: string; blocks: string[]; nodes: string[] }>('GET', '/v1/damage', undefined, true);
    if (!Array.isArray(d.blocks) || !Array.isArray(d.nodes)) throw new TandemError('ERR_PEER_PROTOCOL', `peer ${this.name} answered /v1/damage without blocks and nodes lists`);
    return d;
  }

  /** Stream good copies of blocks the peer holds damaged or lacks (one request, never replayed); the peer verifies and re-indexes each. */
  async repairBlocks(frames: AsyncIterable<BlockFrame>): Promise<{ repaired: number }> {
    const a = await this.streamBlocks<{ repaired: number }>('/v1/blocks/repair', frames);
    return { repaired: a.repaired };
  }

  /** POST a framed block stream to `path` and parse the JSON answer; `ended` drops the request early (PutBlocksCallOptions.signal). */
  private async streamBlocks<T>(path: string, frames: AsyncIterable<BlockFrame>, ended?: AbortSignal): Promise<T> {
    if (ended?.aborted) throw this.stopReason(ended);
    if (tracing) frames = traced(frames);
    // Frames are encoded (and compressed) ahead of the socket so reading, deflating and sending overlap.
    // Small chunks ready together (a job's delta frames) go out as one write (coalesce).
    const src: AsyncIterable<Buffer> = meter(coalesce(readAhead(encodeFrames(frames, { deflateDeltas: () => this.deltasDeflated }), sendAheadBudget)), (n) => (this.wireBytesSent += n));
    // Under a cap the chunks are sliced and their buffers collected; while a schedule sets none, throttle gives them back as `releasing` does.
    // Once the request is over, undici reads the body no more, but a throttled body waiting for
    // tokens would wait on (the process kept alive, the shared bucket drained for nothing): 16 s
    // after a sync under --bwlimit 12KiB had failed, before this stop.
    // One signal ends the request and the cap's wait: the client's stop, `ended`, or the request being over.
    const over = linkedAbort(this.signal, ended);
    const signal = over.controller.signal;
    const body = this.upBucket ? throttle(src, this.upBucket, signal) : releasing(src);
    try {
      let res: Dispatcher.ResponseData;
      try {
        this.requests++;
        res = await this.pool.request({ method: 'POST', path, headers: this.headers({ 'content-type': 'application/octet-stream' }), body: body as unknown as Readable, signal }); // undici takes async iterables (writeIterable); its types omit them
      } catch (e) {
        if (ended?.aborted && !this.signal?.aborted) throw this.stopReason(ended);
        throw this.transportError(e, `POST ${path}`);
      }
      // An answer other than 2xx may come before the whole body was sent (503 ERR_SERVER_BUSY).
      if (res.statusCode >= 300) throw await this.answerError(res, `POST ${path}`);
      this.noteFeatures(res.headers);
      return await this.readAnswer<T>(res, `POST ${path}`);
    } finally {
      over.controller.abort();
      over.unlink();
    }
  }
}

