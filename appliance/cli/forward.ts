/**
 * Command forwarding: one process at a time can hold a store open (the index is LevelDB), so
 * while `appliance serve` or `appliance daemon` runs on a home, a CLI command on that same home
 * is sent to that server and executed there, with its output and exit code relayed back.
 * Operators can run `appliance snapshot`, `sync`, `ebs export`, `failover`, ... at any time.
 *
 * Client side: {@link forwardIfServed}. Server side: {@link executeForwarded}, mounted by the
 * API server as `POST /v1/cli` (behind the bearer token like every route).
 *
 * Relative paths in path-valued options are resolved against the CLI's working directory before
 * forwarding, because the server runs in another one. Progress bars are not relayed (the server
 * has no terminal); the final result is.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { resolveHome } from './output.js';
import { pidAlive } from '../locks.js';

/** Commands that must run in the calling process. */
const LOCAL_ONLY = new Set(['init', 'serve', 'daemon', 'help']);
/** Options whose value is a path on this machine. */
const PATH_OPTIONS = new Set(['--path', '--to', '--changed-blocks', '--home', '--file']);
/** Forwarded commands can run long (a full sync, an EBS export): no client-side timeout but this cap. */
const FORWARD_TIMEOUT_MS = 24 * 3600 * 1000;

export interface ServerInfo {
  readonly pid: number;
  readonly url: string;
}

export interface ForwardRequest {
  readonly argv: string[];
}

export interface ForwardResult {
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Split argv (process.argv form) into the home flag value and the first command word. */
function inspect(args: string[]): { home: string | undefined; command: string | undefined } {
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
export function runningServer(homeDir: string): ServerInfo | null {
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

/** Make path-valued option values absolute so they mean the same thing in the server. */
export function absolutize(args: string[], cwd: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0 && PATH_OPTIONS.has(a.slice(0, eq))) {
      out.push(`${a.slice(0, eq)}=${resolve(cwd, a.slice(eq + 1))}`);
    } else if (PATH_OPTIONS.has(a) && i + 1 < args.length) {
      out.push(a, resolve(cwd, args[++i]!));
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
  if (command === undefined || LOCAL_ONLY.has(command)) return false;
  const homeDir = resolve(resolveHome(home));
  const server = runningServer(homeDir);
  if (!server) return false;
  let token: string;
  let cert: string;
  try {
    token = readFileSync(join(homeDir, 'token'), 'utf8').trim();
    cert = readFileSync(join(homeDir, 'tls', 'cert.pem'), 'utf8');
  } catch {
    return false;
  }
  const body = JSON.stringify({ argv: ['node', 'appliance', ...absolutize(args, process.cwd())] } satisfies ForwardRequest);
  const { request } = await import('node:https');
  const url = new URL('/v1/cli', server.url);
  if (url.hostname === '0.0.0.0' || url.hostname === '::') url.hostname = '127.0.0.1';
  const result = await new Promise<ForwardResult | null>((resolvePromise) => {
    const req = request(url, {
      method: 'POST',
      ca: cert,
      // The server presents this home's own certificate: trusting exactly it is the pin.
      checkServerIdentity: () => undefined,
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}`, 'content-length': Buffer.byteLength(body) },
      timeout: FORWARD_TIMEOUT_MS,
    }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        try {
          const r = JSON.parse(Buffer.concat(chunks).toString('utf8')) as ForwardResult;
          resolvePromise(res.statusCode === 200 && typeof r.exitCode === 'number' ? r : null);
        } catch {
          resolvePromise(null);
        }
      });
      res.on('error', () => resolvePromise(null));
    });
    req.on('error', () => resolvePromise(null));
    req.end(body);
  });
  if (!result) return false;
  process.stderr.write(result.stderr);
  process.stdout.write(result.stdout);
  process.exitCode = result.exitCode;
  return true;
}

/**
 * Server side: run a forwarded command line in this process with captured output. The caller
 * (the API route) has authenticated the request and made the open store available to
 * `Home.openStore()` through `Home.shareStore`.
 */
export async function executeForwarded(req: ForwardRequest): Promise<ForwardResult> {
  const { withIO } = await import('./output.js');
  const { runCli } = await import('./main.js');
  let stdout = '';
  let stderr = '';
  let exitCode = 0;
  const args = req.argv.slice(2);
  const { command } = inspect(args);
  if (command !== undefined && LOCAL_ONLY.has(command)) {
    return { exitCode: 2, stdout: '', stderr: `error ERR_USAGE: \`appliance ${command}\` cannot be forwarded to a running server; run it where the home is not served\n` };
  }
  await withIO({
    out: (s) => void (stdout += s),
    err: (s) => void (stderr += s),
    setExit: (c) => void (exitCode = c),
    isTTY: false,
  }, () => runCli(req.argv));
  return { exitCode, stdout, stderr };
}
