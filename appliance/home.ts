/**
 * The appliance home directory: everything one appliance owns.
 *
 * ```
 * HOME/appliance.json   identity: {name, id, created}; written last by `init` (its presence = initialized)
 * HOME/config.yaml      operator configuration (policies, groups, hooks, recovery plans, prices)
 * HOME/token            API bearer token (0600): what peers send (the peer protocol, status, metrics)
 * HOME/admin.token      admin bearer token (0600): what this machine's CLI sends to run commands in
 *                       a running server (POST /v1/cli); never given to a peer
 * HOME/monitor.token    monitor bearer token (0600): reads GET /metrics and GET /v1/status only,
 *                       for a monitoring system
 * HOME/audit.log       the commands that may change the appliance: who, when, how they ended (appliance/audit.ts)
 * HOME/token.previous   after `appliance token rotate --grace D`: {token, until}, the token it replaced, still taken until then (0600)
 * HOME/tls/key.pem      TLS private key (0600), tls/cert.pem self-signed certificate; during
 *                       `appliance tls rotate`, key.pem.staged and cert.pem.staged (the pair peers
 *                       learn before it is served; staged-acks.json: the peers that took it), and
 *                       while it is put in place key.pem.next and cert.pem.next (Home.finishTlsRotation)
 * HOME/store/           the block store (store/README.md)
 * HOME/locks/           per-volume lock files (appliance/locks.ts)
 * HOME/run/             runtime files of a running server (server.json: pid, url, socket; cli.sock),
 *                       and config.json: config.yaml as last parsed (appliance/config/index.ts loadConfig)
 * ```
 */
import { randomBytes, randomUUID, X509Certificate } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync, renameSync, openSync, fsyncSync, closeSync, rmSync, linkSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { TandemError, diskFullError, fromSystemError } from '../common/errors.js';
import { selfSignedCertificate } from '../common/certificate.js';
import { acquireVolumeLock, withHomeLock } from './locks.js';
import { pidAlive } from '../common/pid.cjs';
import type { Store } from '../store/index.js';

/** A new key without its certificate older than this is a rotation cut short (Home.finishTlsRotation). */
const LONE_KEY_MS = 60_000;

/** Acknowledgements of a staged certificate kept (Home.ackStagedTls). */
const MAX_TLS_ACKS = 32;

/** How long a certificate made here is valid. */
export const CERTIFICATE_DAYS = 3650;

/** A P-256 key and a self-signed certificate for `localhost` and 127.0.0.1, valid ten years. */
async function newKeyAndCertificate(name: string): Promise<{ key: string; cert: string }> {
  return selfSignedCertificate(`tandem-${name}`, ['localhost', '127.0.0.1'], CERTIFICATE_DAYS);
}

/** fsync a directory, so the renames in it are durable (best effort where it cannot be opened). */
function syncDir(dir: string): void {
  try {
    const fd = openSync(dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    // a filesystem that does not let a directory be opened: the renames are done, not yet durable
  }
}

/**
 * A token file of this machine's own (admin.token, monitor.token), made here when missing: created
 * exclusively (a file linked into place once complete), so two processes creating it at once
 * agree on one.
 */
function localToken(path: string): string {
  if (!existsSync(path)) {
    const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    try {
      writeFileAtomic(tmp, randomBytes(32).toString('base64url') + '\n', 0o600);
      linkSync(tmp, path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    } finally {
      rmSync(tmp, { force: true });
    }
  }
  return readFileSync(path, 'utf8').trim();
}

/** Stores held open by a server in this process, by store directory. */
const sharedStores = new Map<string, Store>();

export interface Identity {
  readonly name: string;
  readonly id: string;
  readonly created: string;
}

export interface HomePaths {
  readonly identity: string;
  readonly config: string;
  readonly token: string;
  readonly previousToken: string;
  readonly adminToken: string;
  readonly monitorToken: string;
  readonly tlsKey: string;
  readonly tlsCert: string;
  readonly store: string;
  readonly locks: string;
  readonly run: string;
}

export function homePaths(dir: string): HomePaths {
  return {
    identity: join(dir, 'appliance.json'),
    config: join(dir, 'config.yaml'),
    token: join(dir, 'token'),
    previousToken: join(dir, 'token.previous'),
    adminToken: join(dir, 'admin.token'),
    monitorToken: join(dir, 'monitor.token'),
    tlsKey: join(dir, 'tls', 'key.pem'),
    tlsCert: join(dir, 'tls', 'cert.pem'),
    store: join(dir, 'store'),
    locks: join(dir, 'locks'),
    run: join(dir, 'run'),
  };
}

/**
 * Write a file atomically: temp file, fsync, rename. On a failure (a full disk) the temp file is
 * removed and `path` is as it was (a full disk is ERR_DISK_FULL).
 */
export function writeFileAtomic(path: string, data: string | Buffer, mode = 0o644): void {
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    writeFileSync(tmp, data, { mode });
    const fd = openSync(tmp, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw diskFullError(e, `cannot write ${path}`, 'free space there, then rerun (the file is as it was)') ?? e;
  }
}

/** SHA-256 fingerprint of a PEM certificate as colon-separated uppercase hex (what `peer add --fingerprint` takes). */
export function certFingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

export class Home {
  readonly dir: string;
  readonly paths: HomePaths;
  readonly identity: Identity;

  private constructor(dir: string, identity: Identity) {
    this.dir = dir;
    this.paths = homePaths(dir);
    this.identity = identity;
  }

  /** Open an initialized home; ERR_NOT_INITIALIZED otherwise. */
  static load(dir: string): Home {
    const abs = resolve(dir);
    const p = homePaths(abs);
    if (!existsSync(p.identity)) {
      throw new TandemError('ERR_NOT_INITIALIZED', `no appliance in ${abs}; run \`appliance init --home ${abs}\` first (or set TANDEM_HOME)`);
    }
    const identity = JSON.parse(readFileSync(p.identity, 'utf8')) as Identity;
    const home = new Home(abs, identity);
    home.finishTlsRotation();
    return home;
  }

  /**
   * Create a new appliance home: directories, TLS key + self-signed certificate, API token,
   * a default config, and last the identity file. Refuses an initialized home.
   */
  static async init(dir: string, name: string): Promise<Home> {
    const abs = resolve(dir);
    const p = homePaths(abs);
    const refuseInitialized = () => {
      if (!existsSync(p.identity)) return;
      throw new TandemError('ERR_ALREADY_INITIALIZED', `${abs} already holds appliance "${(JSON.parse(readFileSync(p.identity, 'utf8')) as Identity).name}"; use another --home or remove it`);
    };
    refuseInitialized();
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(name)) {
      throw new TandemError('ERR_USAGE', `appliance name "${name}" is not valid; use letters, digits, '.', '_' and '-' (up to 63)`);
    }
    try {
      for (const d of [abs, join(abs, 'tls'), p.store, p.locks, p.run]) mkdirSync(d, { recursive: true, mode: 0o750 });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EEXIST' || code === 'ENOTDIR') throw new TandemError('ERR_USAGE', `${abs} is not a directory (or holds a file where the home keeps one); choose another --home`, { cause: e });
      throw fromSystemError(e, `cannot create the home ${abs}`);
    }
    // Two inits of one home at once: the second waits for the first, then finds it initialized
    // (each would otherwise print a token and fingerprint, and one of them be overwritten).
    return withHomeLock(p.locks, 'init', 'init', () => Home.initLocked(abs, p, name, refuseInitialized));
  }

  private static async initLocked(abs: string, p: HomePaths, name: string, refuseInitialized: () => void): Promise<Home> {
    refuseInitialized();
    const pems = await newKeyAndCertificate(name);
    writeFileAtomic(p.tlsKey, pems.key, 0o600);
    writeFileAtomic(p.tlsCert, pems.cert, 0o644);
    writeFileAtomic(p.token, randomBytes(32).toString('base64url') + '\n', 0o600);
    writeFileAtomic(p.adminToken, randomBytes(32).toString('base64url') + '\n', 0o600);
    writeFileAtomic(p.monitorToken, randomBytes(32).toString('base64url') + '\n', 0o600);
    if (!existsSync(p.config)) {
      const text = defaultConfig(name);
      writeFileAtomic(p.config, text);
      (await import('./config/index.js')).keepDefaultConfig(abs, text, name);
    }
    const identity: Identity = { name, id: randomUUID(), created: new Date().toISOString() };
    writeFileAtomic(p.identity, JSON.stringify(identity, null, 2) + '\n');
    return new Home(abs, identity);
  }

  token(): string {
    return readFileSync(this.paths.token, 'utf8').trim();
  }

  /**
   * The admin token: what runs commands in a running server of this home (POST /v1/cli). A home
   * made before it existed gets one here (see {@link localToken}).
   */
  adminToken(): string {
    return localToken(this.paths.adminToken);
  }

  /** Replace the admin token (at once: only this machine's CLI uses it, and reads it each time). */
  rotateAdminToken(): void {
    writeFileAtomic(this.paths.adminToken, randomBytes(32).toString('base64url') + '\n', 0o600);
  }

  /**
   * The monitor token: reads GET /metrics and GET /v1/status and nothing else, for a monitoring
   * system that must not hold the peer token (which can push snapshots). A home made before it
   * existed gets one here (see {@link localToken}).
   */
  monitorToken(): string {
    return localToken(this.paths.monitorToken);
  }

  /** Replace the monitor token (at once: the monitoring system's configuration is then given the new one). */
  rotateMonitorToken(): string {
    const token = randomBytes(32).toString('base64url');
    writeFileAtomic(this.paths.monitorToken, token + '\n', 0o600);
    return token;
  }

  /**
   * The tokens the API takes at `now`: the current one, and the one a rotation replaced until its
   * grace period ends.
   */
  acceptedTokens(now = Date.now()): string[] {
    return [this.token(), ...this.previousTokens(now).map((p) => p.token)];
  }

  /**
   * The tokens rotations replaced that are still in their grace period at `now` (HOME/token.previous:
   * a list, or the one object releases before it wrote; unreadable: none).
   */
  private previousTokens(now: number): Array<{ token: string; until: string }> {
    try {
      const v = JSON.parse(readFileSync(this.paths.previousToken, 'utf8')) as unknown;
      return (Array.isArray(v) ? v : [v]).filter((p): p is { token: string; until: string } => typeof p?.token === 'string' && typeof p?.until === 'string' && Date.parse(p.until) > now);
    } catch {
      return [];
    }
  }

  /**
   * Replace the API token with a new one. The old one is still taken for `graceMs` (so the peer
   * can be given the new one with `appliance peer update` without a failed sync meanwhile); 0
   * revokes it at once (a token that leaked), and with it every earlier one still in its grace.
   * Another rotation's grace goes on (a second rotation does not cut the first one's short).
   * Rotations run one at a time (a home lock): two at once each replaced the token the other
   * had just written. The new token is written last: a crash leaves the old one in force.
   * Returns it and when the old one stops being taken.
   */
  async rotateToken(graceMs: number): Promise<{ token: string; previousUntil: string | null }> {
    return withHomeLock(this.paths.locks, 'token', 'token rotate', () => {
      const now = Date.now();
      const old = this.token();
      const token = randomBytes(32).toString('base64url');
      const until = graceMs > 0 ? new Date(now + graceMs).toISOString() : null;
      if (until !== null) writeFileAtomic(this.paths.previousToken, JSON.stringify([...this.previousTokens(now), { token: old, until }]) + '\n', 0o600);
      else rmSync(this.paths.previousToken, { force: true });
      writeFileAtomic(this.paths.token, token + '\n', 0o600);
      return { token, previousUntil: until };
    });
  }

  tls(): { key: string; cert: string } {
    return { key: readFileSync(this.paths.tlsKey, 'utf8'), cert: readFileSync(this.paths.tlsCert, 'utf8') };
  }

  fingerprint(): string {
    return certFingerprint(readFileSync(this.paths.tlsCert, 'utf8'));
  }

  /**
   * First half of `appliance tls rotate --now`: a new key and self-signed certificate, written
   * beside the ones in use (tls/key.pem.next, then tls/cert.pem.next). Returns the new fingerprint.
   */
  async prepareTlsRotation(): Promise<string> {
    const pems = await newKeyAndCertificate(this.identity.name);
    writeFileAtomic(`${this.paths.tlsKey}.next`, pems.key, 0o600);
    writeFileAtomic(`${this.paths.tlsCert}.next`, pems.cert, 0o644);
    return certFingerprint(pems.cert);
  }

  /**
   * `appliance tls rotate` without --now: a new key and certificate kept beside the ones in use
   * (tls/key.pem.staged, then tls/cert.pem.staged: the certificate last, so a staged certificate
   * always has its key). The server goes on serving the current pair and names the staged one's
   * fingerprint in GET /v1/health, so the peers that pin this appliance learn it over a
   * connection pinned to the current one and accept both ({@link activateStagedTls} then breaks
   * no sync). A second staging replaces the first. Returns the staged fingerprint.
   */
  async stageTlsRotation(): Promise<string> {
    const pems = await newKeyAndCertificate(this.identity.name);
    rmSync(this.tlsAcksPath(), { force: true });
    writeFileAtomic(`${this.paths.tlsKey}.staged`, pems.key, 0o600);
    writeFileAtomic(`${this.paths.tlsCert}.staged`, pems.cert, 0o644);
    return certFingerprint(pems.cert);
  }

  /** The staged certificate's fingerprint and when it was staged; null when none is. */
  stagedTls(): { fingerprint: string; since: string } | null {
    const cert = `${this.paths.tlsCert}.staged`;
    try {
      const pem = readFileSync(cert, 'utf8');
      if (!existsSync(`${this.paths.tlsKey}.staged`)) return null;
      return { fingerprint: certFingerprint(pem), since: statSync(cert).mtime.toISOString() };
    } catch {
      return null;
    }
  }

  /**
   * Serve the staged pair (`appliance tls rotate --activate`): written as a rotation's new pair
   * (key.pem.next, cert.pem.next) and put in place by {@link finishTlsRotation}; the staged files
   * go last. ERR_TLS_NOT_STAGED when none is staged. Returns the new and the previous fingerprint.
   */
  activateStagedTls(): { fingerprint: string; previous: string } {
    const staged = this.stagedTls();
    if (!staged) throw new TandemError('ERR_TLS_NOT_STAGED', 'no certificate is staged; stage one with `appliance tls rotate` (the peers learn it), then activate it');
    const previous = this.fingerprint();
    writeFileAtomic(`${this.paths.tlsKey}.next`, readFileSync(`${this.paths.tlsKey}.staged`), 0o600);
    writeFileAtomic(`${this.paths.tlsCert}.next`, readFileSync(`${this.paths.tlsCert}.staged`), 0o644);
    this.finishTlsRotation();
    return { fingerprint: staged.fingerprint, previous };
  }

  /**
   * The peers that said they accept the staged certificate (POST /v1/tls/ack): {id, name, at},
   * one per appliance. `staged`: {@link stagedTls}, when the caller has it already.
   */
  tlsAcks(staged = this.stagedTls()): Array<{ id: string; name: string; at: string }> {
    try {
      const acks = JSON.parse(readFileSync(this.tlsAcksPath(), 'utf8')) as { fingerprint?: string; peers?: Array<{ id: string; name: string; at: string }> };
      return staged && acks.fingerprint === staged.fingerprint && Array.isArray(acks.peers) ? acks.peers : [];
    } catch {
      return [];
    }
  }

  /** Record that appliance {id, name} accepts the staged certificate `fingerprint`; false when that is not the one staged. */
  ackStagedTls(fingerprint: string, peer: { id: string; name: string }): boolean {
    const staged = this.stagedTls();
    if (!staged || staged.fingerprint !== fingerprint) return false;
    // The newest few: a peer token holder cannot grow the file without bound.
    const others = this.tlsAcks(staged).filter((a) => a.id !== peer.id).slice(-(MAX_TLS_ACKS - 1));
    writeFileAtomic(this.tlsAcksPath(), JSON.stringify({ fingerprint, peers: [...others, { ...peer, at: new Date().toISOString() }] }) + '\n');
    return true;
  }

  private tlsAcksPath(): string {
    return join(this.dir, 'tls', 'staged-acks.json');
  }

  /**
   * Second half: put the new pair in place, key first. Every process that loads the home calls
   * this, so a rotation cut short between the two renames is finished by the next one:
   * cert.pem.next exists only once key.pem.next is complete, and alone only once the key was
   * renamed, so it is always rolled forward. Two processes finishing at once agree (a rename
   * the other did first is skipped). A lone key.pem.next is a rotation still writing its
   * certificate, or one cut short before it: it is dropped once older than a minute. A running
   * server takes the new pair within a second (api/server.ts).
   */
  finishTlsRotation(): void {
    const key = `${this.paths.tlsKey}.next`;
    const cert = `${this.paths.tlsCert}.next`;
    const moveIfThere = (from: string, to: string) => {
      try {
        renameSync(from, to);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
    };
    if (existsSync(cert)) {
      moveIfThere(key, this.paths.tlsKey);
      moveIfThere(cert, this.paths.tlsCert);
      syncDir(join(this.dir, 'tls'));
    } else {
      const st = statSync(key, { throwIfNoEntry: false });
      if (st && Date.now() - st.mtimeMs > LONE_KEY_MS) rmSync(key, { force: true });
    }
    // A staged pair now in use (`tls rotate --activate`, perhaps cut short here) is staged no
    // more: its certificate goes first.
    if (existsSync(`${this.paths.tlsCert}.staged`) && this.stagedTls()?.fingerprint === this.fingerprint()) {
      rmSync(`${this.paths.tlsCert}.staged`, { force: true });
      rmSync(`${this.paths.tlsKey}.staged`, { force: true });
      rmSync(this.tlsAcksPath(), { force: true });
    }
  }

  /**
   * Open this home's store. In a process that serves this home (see {@link Home.shareStore}) it
   * returns the server's open store, whose close() is then a no-op: commands can always
   * `try { ... } finally { await store.close() }`.
   *
   * One process at a time holds the store. A command that finds it held by another command (a
   * snapshot, gc or restore of another volume: the volume lock, taken first, already refused
   * one of the same volume) waits for it to end, as cron jobs of two volumes must, telling
   * `onWait` (default: a note on stderr) once; after {@link STORE_WAIT_MS}, ERR_STORE_BUSY.
   * Held by this home's server (started after the command looked for one to forward to):
   * ERR_STORE_BUSY at once, since a server does not let go (run again, the command is forwarded).
   */
  async openStore(opts: { readonly onWait?: (message: string) => void; /** For `serve` or `daemon`, which are never sent to a running server. */ readonly server?: boolean } = {}): Promise<Store> {
    const shared = sharedStores.get(this.paths.store);
    if (shared) return shared;
    const { Store } = await import('../store/index.js');
    const started = Date.now();
    let told = false;
    for (;;) {
      try {
        return await Store.open(this.paths.store);
      } catch (e) {
        if (!(e instanceof TandemError) || e.code !== 'ERR_STORE_BUSY') throw e;
        const pid = typeof e.details.pid === 'number' ? e.details.pid : undefined;
        if (pid !== undefined && pid === this.runningServer()?.pid && opts.server) {
          // A server killed a moment ago (kill -9, then a restart) still holds the store until the
          // kernel has torn it down: give it that long before calling it running.
          if (Date.now() - started < SERVER_EXIT_GRACE_MS) {
            await new Promise((r) => setTimeout(r, 50));
            continue;
          }
          throw new TandemError('ERR_STORE_BUSY', `a server of this home is running already (pid ${pid}): one serve or daemon per home. Use it (commands on this home are sent to it), or stop it (kill -TERM ${pid}) before starting another`, { cause: e, details: e.details });
        }
        if (pid !== undefined && pid === this.runningServer()?.pid) {
          throw new TandemError('ERR_STORE_BUSY', `the store ${this.paths.store} is held by this home's server (pid ${pid}), which started after this command looked for one; run the command again: it is sent to the server`, { cause: e, details: e.details });
        }
        const who = describeProcess(pid);
        const waited = Date.now() - started;
        if (waited >= STORE_WAIT_MS) {
          throw new TandemError('ERR_STORE_BUSY', `the store ${this.paths.store} is still held by ${who} after ${Math.round(waited / 60_000)} min of waiting; let it finish${pid === undefined ? '' : ` or stop it (kill ${pid})`}, then rerun. Running \`appliance daemon\` on this home lets commands run side by side`, { cause: e, details: e.details });
        }
        if (!told) {
          told = true;
          const say = opts.onWait ?? ((m: string) => void process.stderr.write(`note: ${m}\n`));
          say(`the store is in use by ${who}: waiting for it to finish (up to ${STORE_WAIT_MS / 60_000} min; Ctrl-C stops waiting)`);
        }
        await new Promise((r) => setTimeout(r, STORE_POLL_MS));
      }
    }
  }

  /** This home's running server, as run/server.json names it (null: none, or its pid is gone). */
  runningServer(): { pid: number; url: string } | null {
    try {
      const s = JSON.parse(readFileSync(join(this.paths.run, 'server.json'), 'utf8')) as { pid?: unknown; url?: unknown };
      return typeof s.pid === 'number' && typeof s.url === 'string' && pidAlive(s.pid) ? { pid: s.pid, url: s.url } : null;
    } catch {
      return null; // none, or a file being rewritten: as if no server ran
    }
  }

  /**
   * Make `store` (open for this home) the one every `openStore()` in this process returns,
   * until the returned function is called. Used by `serve`/`daemon`, which hold the store for
   * their lifetime and execute forwarded CLI commands (appliance/cli/forward.ts).
   */
  shareStore(store: Store): () => void {
    const key = this.paths.store;
    const view = new Proxy(store, {
      get(target, prop) {
        if (prop === 'close') return async () => {};
        const v = Reflect.get(target, prop, target) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    sharedStores.set(key, view);
    return () => {
      if (sharedStores.get(key) === view) sharedStores.delete(key);
    };
  }

  /** Take the per-volume lock; returns the release function (appliance/locks.ts). */
  lockVolume(volume: string, op: string): () => void {
    return acquireVolumeLock(this.paths.locks, volume, op);
  }
}

/** How long {@link Home.openStore} waits for another command to let go of the store. */
export const STORE_WAIT_MS = 10 * 60_000;
/** How often it tries again meanwhile. */
const STORE_POLL_MS = 200;
/**
 * How long a `serve` or `daemon` waits for a server of its home that holds the store to be gone
 * before refusing to start: a restart right after `kill -9` of the last one met ERR_STORE_BUSY twice
 * in an audit's runs, the killed process still exiting.
 */
const SERVER_EXIT_GRACE_MS = 2000;

/** `pid 123 (appliance snapshot db)`, from its command line where /proc tells it; else `pid 123`. */
function describeProcess(pid: number | undefined): string {
  if (pid === undefined) return 'another appliance process';
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((a) => a !== '');
    const at = argv.findIndex((a) => /[\\/]bin\.c?[jt]s$|[\\/]appliance$/.test(a));
    const words: string[] = [];
    for (let i = at + 1; at >= 0 && i < argv.length; i++) {
      if (argv[i] === '--home') i++;
      else if (argv[i] !== '--json' && !argv[i]!.startsWith('--home=')) words.push(argv[i]!);
    }
    return words.length > 0 ? `pid ${pid} (appliance ${words.join(' ')})` : `pid ${pid}`;
  } catch {
    return `pid ${pid}`;
  }
}

export function defaultConfig(name: string): string {
  return `# Tandem appliance configuration (validated by \`appliance config check\`).
# See README.md, "Configuration", for every key.
appliance:
  name: ${name}
`;
}
