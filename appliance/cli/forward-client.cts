/**
 * Command forwarding, client side: one process at a time can hold a store open (the index is
 * LevelDB), so while `appliance serve` or `appliance daemon` runs on a home, a CLI command on
 * that same home is sent to that server and executed there, with its output and exit code
 * relayed back. Operators can run `appliance snapshot`, `sync`, `ebs export`, `failover`, ... at
 * any time. The server side is forward.ts (`POST /v1/cli`), which takes the home's admin token
 * (HOME/admin.token) and refuses the peer token.
 *
 * The binary (bin.cts) loads this module first, and a forwarded command then finishes without
 * loading any other module of ours than the one it needs (common/pid.cts). A forwarded no-op sync
 * took 92.7 ms through the full CLI and 73.6 ms this way (median of 15 runs each, `node -e 0`:
 * 32 ms); with NODE_EXTRA_CA_CERTS set, as on the development machine, 122-128 ms against
 * 105-121 ms.
 *
 * Relative paths in path-valued options are resolved against the CLI's working directory before
 * forwarding, because the server runs in another one. Progress bars are not relayed (the server
 * has no terminal); the final result is.
 */
import { existsSync, readFileSync } from 'node:fs';
import { userInfo } from 'node:os';
import { join, resolve } from 'node:path';
import { pidAlive } from '../../common/pid.cjs';

/** Home directory when neither --home nor $TANDEM_HOME names one. */
const DEFAULT_HOME = '/var/lib/tandem';

/** The home a command line works on: --home, else $TANDEM_HOME, else {@link DEFAULT_HOME}. */
export function resolveHome(flag: string | undefined): string {
  // An empty TANDEM_HOME is unset (an empty --home is refused: the CLI's globalOptions).
  return flag ?? (process.env.TANDEM_HOME || DEFAULT_HOME);
}

/** Commands that must run in the calling process. */
export const LOCAL_ONLY = new Set(['init', 'serve', 'daemon', 'help']);
/** Options whose value is a path on this machine. */
const PATH_OPTIONS = new Set(['--path', '--to', '--changed-blocks', '--home', '--file']);
/** Forwarded commands can run long (a full sync, an EBS export): no client-side timeout but this cap. */
const FORWARD_TIMEOUT_MS = 24 * 3600 * 1000;

interface ServerInfo {
  readonly pid: number;
  readonly url: string;
  /** Its Unix socket for this machine's CLI (api/server.ts listenLocal), when it has one. */
  readonly socket?: string;
}

export interface ForwardRequest {
  readonly argv: string[];
  /** Who runs the CLI ({@link localUser}), for the server's audit log (appliance/audit.ts). */
  readonly user?: string;
}

/** Who runs this process: its login name, and under sudo who called it ("root (sudo: alice)"). */
export function localUser(): string {
  let name: string;
  try {
    name = userInfo().username;
  } catch {
    name = process.env.USER ?? `uid ${process.getuid?.() ?? '?'}`;
  }
  const sudo = process.env.SUDO_USER;
  return sudo && sudo !== name ? `${name} (sudo: ${sudo})` : name;
}

export interface ForwardResult {
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Split argv (process.argv form) into the home flag value and the first command word. */
export function inspect(args: string[]): { home: string | undefined; command: string | undefined } {
  let home: string | undefined;
  let command: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--home') home = args[++i];
    else if (a.startsWith('--home=')) home = a.slice('--home='.length);
    else if (a === '--help' || a === '-h') return { home, command: 'help' };
    else if (!a.startsWith('-') && command === undefined) command = a;
  }
  return { home, command };
}

/** The running server of a home, if any (HOME/run/server.json with a live pid). */
function runningServer(homeDir: string): ServerInfo | null {
  const file = join(homeDir, 'run', 'server.json');
  if (!existsSync(file)) return null;
  try {
    const info = JSON.parse(readFileSync(file, 'utf8')) as ServerInfo;
    if (typeof info.pid !== 'number' || typeof info.url !== 'string') return null;
    if (info.pid === process.pid || !pidAlive(info.pid)) return null;
    return info;
  } catch {
    return null;
  }
}

/** support-bundle's default file name for the home in `homeDir` (appliance/cli/commands/support.ts gives the same). */
export function defaultBundleName(homeDir: string, now = new Date()): string {
  let name = 'appliance';
  try {
    name = (JSON.parse(readFileSync(join(homeDir, 'appliance.json'), 'utf8')) as { name?: string }).name ?? name;
  } catch {
    // unreadable: the command reports it
  }
  return `tandem-support-${name}-${now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}.tar.gz`;
}

/** Make path-valued option values absolute so they mean the same thing in the server. */
function absolutize(args: string[], cwd: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const eq = a.indexOf('=');
    // An empty path stays empty (the command refuses it), rather than naming the directory here.
    const abs = (p: string) => (p.trim() === '' ? p : resolve(cwd, p));
    if (a.startsWith('--') && eq > 0 && PATH_OPTIONS.has(a.slice(0, eq))) {
      out.push(`${a.slice(0, eq)}=${abs(a.slice(eq + 1))}`);
    } else if (PATH_OPTIONS.has(a) && i + 1 < args.length) {
      out.push(a, abs(args[++i]!));
    } else out.push(a);
  }
  return out;
}

/**
 * If a server of the target home is running, send it this command and relay the outcome.
 * Returns false (run locally) when there is no server or it cannot be reached.
 */
export async function forwardIfServed(argv: string[]): Promise<boolean> {
  const args = argv.slice(2);
  const { home, command } = inspect(args);
  if (command === undefined || LOCAL_ONLY.has(command) || home === '') return false;
  const homeDir = resolve(resolveHome(home));
  const server = runningServer(homeDir);
  if (!server) return false;
  // The admin token (a running server made it if the home predates it); a peer's token does
  // not run commands.
  let token: string;
  try {
    token = readFileSync(join(homeDir, 'admin.token'), 'utf8').trim();
  } catch {
    return false;
  }
  // The home this process resolved goes with the command: without --home, the server would
  // resolve it from its own environment ($TANDEM_HOME there, or the default), another home.
  const forwarded = [...absolutize(args, process.cwd()), ...(home === undefined ? ['--home', homeDir] : [])];
  // support-bundle writes into the caller's directory by default, not the server's.
  if (command === 'support-bundle' && !args.some((a) => a === '--to' || a.startsWith('--to='))) forwarded.push('--to', join(process.cwd(), defaultBundleName(homeDir)));
  const body = JSON.stringify({ argv: ['node', 'appliance', ...forwarded], user: localUser() } satisfies ForwardRequest);
  const headers = { 'content-type': 'application/json', authorization: `Bearer ${token}`, 'content-length': String(Buffer.byteLength(body)) };
  // Ctrl-C (or SIGTERM) while the server runs the command: the connection is closed, which the
  // server takes as the order to stop the command at its next safe point (ERR_INTERRUPTED
  // there); its answer is not waited for. A second signal ends this process at once as well.
  const onSignal = (sig: NodeJS.Signals) => {
    cancelForwarded?.();
    cancelForwarded = null;
    process.stderr.write(`\n${sig}: the server of this home (pid ${server.pid}) was told to stop \`appliance ${command}\` at its next safe point (a snapshot or sync not finished is not committed; a restore onto an existing target leaves it partly written). What it did is in \`appliance audit\`\n`);
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  // The Unix socket first (no TCP or TLS handshake); the HTTPS listener only if the socket
  // cannot be connected to (a request that reached the server is never sent twice).
  let result = server.socket !== undefined ? await postLocal(server.socket, headers, body) : 'unreachable';
  if (result === 'unreachable') result = await postHttps(homeDir, server.url, headers, body);
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  cancelForwarded = null;
  // Nothing reached a server of this home (server.json outlived it), or it refused the request:
  // the command runs here (and meets ERR_STORE_BUSY if a server does hold the store).
  if (result === 'unreachable' || result === 'refused') return false;
  if (result === 'lost') {
    // The server took the command and never answered (it stopped, was killed, or crashed): the
    // command may have done all or part of its work, so it is not run a second time here.
    const message = `the server of this home (pid ${server.pid}) stopped answering while it ran \`appliance ${command}\`: the command may have finished or stopped midway, and it was not run again here. See what it did (\`appliance status\`, \`appliance snapshots VOL\`, the server's log), then run it again if it is still needed`;
    if (args.includes('--json')) process.stdout.write(JSON.stringify({ error: { code: 'ERR_FORWARD_LOST', message, details: { pid: server.pid } } }, null, 2) + '\n');
    process.stderr.write(`error ERR_FORWARD_LOST: ${message}\n`);
    process.exitCode = 1;
    return true;
  }
  process.stderr.write(result.stderr);
  process.stdout.write(result.stdout);
  process.exitCode = result.exitCode;
  return true;
}

/**
 * POST a forwarded command over the server's Unix socket, as one HTTP/1.1 exchange written by
 * hand on a `node:net` connection (`Connection: close`: the answer ends with the stream).
 * node:http's client costs ~10 ms of a forwarded command's start here, for one request and one
 * answer. 'unreachable' when no connection could be made; 'refused' when the answer is not status
 * 200; 'lost' when the connection failed or ended before a whole answer (the server may have run
 * the command).
 */
async function postLocal(socket: string, headers: Record<string, string>, body: string): Promise<Forwarded> {
  // Loaded here, only when a server runs: a command run in this process does not need it.
  const { connect } = require('node:net') as typeof import('node:net');
  return new Promise((resolvePromise) => {
    let connected = false;
    const chunks: Buffer[] = [];
    const conn = connect(socket, () => (connected = true));
    cancelForwarded = () => void conn.destroy();
    conn.on('data', (c: Buffer) => chunks.push(c));
    conn.on('error', () => resolvePromise(connected ? 'lost' : 'unreachable'));
    conn.on('end', () => resolvePromise(answerOf(Buffer.concat(chunks))));
    const head = Object.entries({ host: 'localhost', connection: 'close', ...headers }).map(([k, v]) => `${k}: ${v}\r\n`).join('');
    // write, not end: the server answers a request whose sender has half-closed with nothing.
    conn.write(`POST /v1/cli HTTP/1.1\r\n${head}\r\n${body}`);
  });
}

/** Closes the connection of the forwarded command in flight (see forwardIfServed's signal handler). */
let cancelForwarded: (() => void) | null = null;

/** What a forwarded command came to: its result, or why there is none (see postLocal). */
type Forwarded = ForwardResult | 'unreachable' | 'refused' | 'lost';

/** An answer read to the end of its stream: the result; 'refused' (another status); 'lost' (cut short). */
function answerOf(raw: Buffer): Forwarded {
  const status = /^HTTP\/1\.[01] (\d{3}) /.exec(raw.subarray(0, 16).toString('latin1'));
  if (status && status[1] !== '200') return 'refused';
  return parseAnswer(raw) ?? 'lost';
}

/** A complete HTTP/1.1 answer (status 200, a body by length, chunks or the stream's end) → the result, or null. */
export function parseAnswer(raw: Buffer): ForwardResult | null {
  const end = raw.indexOf('\r\n\r\n');
  if (end < 0) return null;
  const [status, ...lines] = raw.subarray(0, end).toString('latin1').split('\r\n');
  if (!/^HTTP\/1\.[01] 200 /.test(status ?? '')) return null;
  const header = (name: string) => lines.find((l) => l.toLowerCase().startsWith(`${name}:`))?.slice(name.length + 1).trim();
  let payload = raw.subarray(end + 4);
  if (header('transfer-encoding')?.toLowerCase() === 'chunked') {
    const parts: Buffer[] = [];
    for (let at = 0; ; ) {
      const eol = payload.indexOf('\r\n', at);
      const size = eol < 0 ? NaN : parseInt(payload.subarray(at, eol).toString('latin1'), 16);
      if (!Number.isInteger(size) || eol + 2 + size > payload.length) return null;
      if (size === 0) break;
      parts.push(payload.subarray(eol + 2, eol + 2 + size));
      at = eol + 2 + size + 2;
    }
    payload = Buffer.concat(parts);
  } else {
    const length = header('content-length');
    if (length !== undefined) {
      if (!/^\d+$/.test(length) || Number(length) > payload.length) return null;
      payload = payload.subarray(0, Number(length));
    }
  }
  return resultOf(payload);
}

/** A forwarded command's result from an answer's body, or null when it is not one. */
function resultOf(body: Buffer): ForwardResult | null {
  try {
    const r = JSON.parse(body.toString('utf8')) as ForwardResult;
    return typeof r.exitCode === 'number' && typeof r.stdout === 'string' && typeof r.stderr === 'string' ? r : null;
  } catch {
    return null;
  }
}

/** POST a forwarded command to the server's HTTPS listener (what it came to: see postLocal). */
async function postHttps(homeDir: string, serverUrl: string, headers: Record<string, string>, body: string): Promise<Forwarded> {
  let cert: string;
  try {
    cert = readFileSync(join(homeDir, 'tls', 'cert.pem'), 'utf8');
  } catch {
    return 'unreachable';
  }
  const url = new URL('/v1/cli', serverUrl);
  if (url.hostname === '0.0.0.0' || url.hostname === '::') url.hostname = '127.0.0.1';
  const { request } = require('node:https') as typeof import('node:https');
  return new Promise((resolvePromise) => {
    // The server presents this home's own certificate: trusting exactly it is the pin.
    const req = request(url, { method: 'POST', headers, ca: cert, checkServerIdentity: () => undefined, timeout: FORWARD_TIMEOUT_MS }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolvePromise(res.statusCode === 200 ? resultOf(Buffer.concat(chunks)) ?? 'lost' : 'refused'));
      res.on('error', () => resolvePromise('lost'));
    });
    // Before the TLS handshake completes nothing was sent: the server was not reached (gone, or
    // another program on its port). After it, the request may have run.
    let sent = false;
    req.on('socket', (s) => s.once('secureConnect', () => (sent = true)));
    req.on('error', () => resolvePromise(sent ? 'lost' : 'unreachable'));
    cancelForwarded = () => void req.destroy();
    req.end(body);
  });
}

