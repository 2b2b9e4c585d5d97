/**
 * The one error catalog of Tandem.
 *
 * Every error a user, an operator or a peer can see is a {@link TandemError} with a stable
 * `code` from {@link CATALOG}. The catalog says which HTTP status the API answers with and
 * which exit code the CLI returns, so those mappings live in exactly one place.
 *
 * Messages are written for the operator: they say what happened and what to do next.
 *
 * To add a code, add one line in the section of your area. Codes are never renamed or
 * reused: scripts and peers match on them.
 */

export interface CatalogEntry {
  /** HTTP status the API answers with. */
  readonly http: number;
  /** Exit code of the CLI: 1 failed, 2 bad usage, 130 interrupted (Ctrl-C, as a shell reports it). */
  readonly exit: 1 | 2 | 130;
  /** One line on what it means, for docs and `--help`. */
  readonly summary: string;
}

export const CATALOG = {
  // --- general --------------------------------------------------------------------------
  ERR_USAGE: { http: 400, exit: 2, summary: 'the command line is malformed' },
  ERR_BAD_REQUEST: { http: 400, exit: 2, summary: 'a request or argument failed validation' },
  ERR_INTERNAL: { http: 500, exit: 1, summary: 'an unexpected failure; report it with the log' },
  ERR_INTERRUPTED: { http: 409, exit: 130, summary: 'the operator stopped the command (Ctrl-C, SIGTERM, or the CLI of a forwarded command went away); it stopped at a safe point' },
  ERR_NOT_INITIALIZED: { http: 409, exit: 1, summary: 'the home directory has no appliance; run `appliance init`' },
  ERR_ALREADY_INITIALIZED: { http: 409, exit: 1, summary: 'the home directory already holds an appliance' },
  ERR_HOME_BUSY: { http: 409, exit: 1, summary: 'another command is changing the same part of the home (init, token rotation) and did not finish in time; retry' },
  ERR_CONFIG_INVALID: { http: 400, exit: 1, summary: 'the configuration file does not validate' },
  ERR_DISK_FULL: { http: 507, exit: 1, summary: 'no space left on the store or target device' },
  ERR_IO: { http: 500, exit: 1, summary: 'an I/O operation failed' },
  ERR_SERVER_BUSY: { http: 503, exit: 1, summary: 'the peer is receiving as many block streams as it takes at once, or ended this one for sending under 16 KiB/s while another waited: rerun the sync shortly (under --bwlimit, with at least 48 KiB/s)' },
  ERR_SERVER_STOPPING: { http: 503, exit: 1, summary: 'the server of the home is stopping: the forwarded command was not run; run it again' },
  ERR_FORWARD_LOST: { http: 502, exit: 1, summary: 'the server of the home stopped answering while it ran the forwarded command: it may have finished or stopped midway, and was not run again' },

  // --- store ----------------------------------------------------------------------------
  ERR_STORE_BUSY: { http: 409, exit: 1, summary: 'another appliance process holds the store open' },
  ERR_STORE_CORRUPT: { http: 500, exit: 1, summary: 'the store failed an integrity check' },
  ERR_BLOCK_CORRUPT: { http: 422, exit: 1, summary: 'a block does not match its hash' },
  ERR_BLOCK_MISSING: { http: 404, exit: 1, summary: 'a block is not in the store' },
  ERR_NODE_CORRUPT: { http: 422, exit: 1, summary: 'a tree node does not match its hash or is malformed' },
  ERR_NODE_MISSING: { http: 404, exit: 1, summary: 'a tree node is not in the store' },
  ERR_SNAPSHOT_NOT_FOUND: { http: 404, exit: 1, summary: 'no such snapshot' },
  ERR_SNAPSHOT_INCOMPLETE: { http: 409, exit: 1, summary: 'a snapshot references nodes or blocks the store lacks' },
  ERR_SNAPSHOT_INVALID: { http: 422, exit: 1, summary: "a snapshot's tree names a block of the wrong length for its place: it does not fit the snapshot's size" },
  ERR_SNAPSHOT_HELD: { http: 409, exit: 1, summary: 'the snapshot is held: release it with `appliance snapshots VOL --release ID` before deleting it' },
  ERR_SNAPSHOT_IN_USE: { http: 409, exit: 1, summary: 'the snapshot is the newest, or a base the next sync or EBS export builds on: --force deletes it anyway' },
  ERR_VERIFY_FAILED: { http: 500, exit: 1, summary: '`verify` found bad blocks or nodes' },

  // --- volumes --------------------------------------------------------------------------
  ERR_VOLUME_NOT_FOUND: { http: 404, exit: 1, summary: 'no such volume' },
  ERR_VOLUME_EXISTS: { http: 409, exit: 1, summary: 'a volume with that name, or on that device or image, exists' },
  ERR_VOLUME_LOCKED: { http: 409, exit: 1, summary: 'another snapshot, sync or restore of this volume is running' },
  ERR_VOLUME_PAUSED: { http: 409, exit: 1, summary: "the volume's scheduled jobs are paused (`appliance resume VOL`)" },
  ERR_VOLUME_UNREADABLE: { http: 400, exit: 1, summary: 'the volume path is missing or cannot be opened' },
  ERR_VOLUME_EMPTY: { http: 400, exit: 1, summary: 'the volume has size 0' },
  ERR_VOLUME_SIZE_MISMATCH: { http: 409, exit: 1, summary: 'the target has another size than the snapshot' },
  ERR_VOLUME_IN_USE: { http: 409, exit: 1, summary: "the target is mounted, held by another program (LVM, RAID, a VM), or another volume's device or image: unmount or stop it, or choose another target" },
  ERR_VOLUME_MATERIALIZING: { http: 409, exit: 1, summary: 'the volume is being written and cannot be a sync source' },
  ERR_VOLUME_NAME_TAKEN: { http: 409, exit: 1, summary: 'the peer replicates a volume of that name from another appliance' },
  ERR_VOLUME_FAILED_OVER: { http: 409, exit: 1, summary: 'the volume runs in EC2 after a failover: no push of it and no second failover until failback or `failover VOL --end`' },
  ERR_CHANGED_BLOCKS_INVALID: { http: 400, exit: 2, summary: 'the changed-blocks file is malformed' },
  ERR_BLOCK_SIZE_INVALID: { http: 400, exit: 2, summary: 'the block size is not a supported value' },
  ERR_BLOCK_SIZE_MISMATCH: { http: 409, exit: 1, summary: 'the two appliances hold the volume in blocks of different sizes' },

  // --- peers, sync, API -----------------------------------------------------------------
  ERR_UNAUTHORIZED: { http: 401, exit: 1, summary: 'missing or wrong API token' },
  ERR_FORBIDDEN: { http: 403, exit: 1, summary: "the token does not open this route: commands take the appliance's admin token; the monitor token reads /metrics and /v1/status only" },
  ERR_TLS_NOT_STAGED: { http: 409, exit: 1, summary: 'no staged certificate to activate: stage one with `appliance tls rotate`' },
  ERR_NOT_FOUND: { http: 404, exit: 1, summary: 'no such route' },
  ERR_PAYLOAD_TOO_LARGE: { http: 413, exit: 1, summary: 'a request body exceeds the limit' },
  ERR_PEER_NOT_FOUND: { http: 404, exit: 1, summary: 'no such peer' },
  ERR_PEER_EXISTS: { http: 409, exit: 1, summary: 'a peer with that name exists' },
  ERR_PEER_UNREACHABLE: { http: 502, exit: 1, summary: 'the peer did not answer' },
  ERR_PEER_FINGERPRINT: { http: 502, exit: 1, summary: "the peer's certificate does not match the pinned fingerprint" },
  ERR_PEER_PROTOCOL: { http: 502, exit: 1, summary: 'the peer answered something the protocol does not allow' },
  ERR_PEER_REJECTED: { http: 502, exit: 1, summary: 'the peer refused the request' },
  ERR_NOTHING_TO_SYNC: { http: 404, exit: 1, summary: 'the source has no snapshot of the volume' },

  // --- AWS / EBS / EC2 ------------------------------------------------------------------
  ERR_AWS_CREDENTIALS: { http: 500, exit: 1, summary: 'no AWS credentials or region could be found' },
  ERR_AWS_ACCESS_DENIED: { http: 403, exit: 1, summary: 'AWS refused the request for lack of permission' },
  ERR_AWS_VALIDATION: { http: 400, exit: 1, summary: 'AWS rejected a request as invalid' },
  ERR_AWS_NOT_FOUND: { http: 404, exit: 1, summary: 'the AWS resource does not exist' },
  ERR_AWS_THROTTLED: { http: 503, exit: 1, summary: 'AWS kept throttling after every retry' },
  ERR_AWS_FAILED: { http: 502, exit: 1, summary: 'an AWS call failed' },
  ERR_EBS_CHECKSUM: { http: 502, exit: 1, summary: 'a block from EBS does not match its checksum' },
  ERR_EBS_NOT_EXPORTED: { http: 409, exit: 1, summary: 'the volume has no EBS export to work from' },

  // --- DR workflows ---------------------------------------------------------------------
  ERR_HOOK_FAILED: { http: 500, exit: 1, summary: 'a pre- or post-snapshot hook failed' },
  ERR_POLICY_NOT_FOUND: { http: 404, exit: 1, summary: 'no such policy' },
  ERR_PLAN_INVALID: { http: 400, exit: 1, summary: 'the recovery plan in the config is incomplete' },
  ERR_FAILOVER_FAILED: { http: 500, exit: 1, summary: 'failover could not launch the recovery instances' },
  ERR_FAILOVER_PARTIAL: { http: 500, exit: 1, summary: 'failover brought some recovery plans up and not others' },
  ERR_DRILL_FAILED: { http: 500, exit: 1, summary: 'the drill did not pass its checks' },
} as const satisfies Record<string, CatalogEntry>;

export type ErrorCode = keyof typeof CATALOG;

export interface TandemErrorOptions {
  cause?: unknown;
  /** Machine-readable facts (volume, block index, hash, ...). Serialized in API answers and `--json`. */
  details?: Record<string, unknown>;
}

/** An error with a stable code from {@link CATALOG}. */
export class TandemError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, options: TandemErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TandemError';
    this.code = code;
    this.details = options.details ?? {};
  }

  get http(): number {
    return CATALOG[this.code].http;
  }

  get exitCode(): 1 | 2 | 130 {
    return CATALOG[this.code].exit;
  }

  toJSON(): { code: ErrorCode; message: string; details: Record<string, unknown> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

export function isTandemError(e: unknown, code?: ErrorCode): e is TandemError {
  return e instanceof TandemError && (code === undefined || e.code === code);
}

/**
 * What work stopped by `signal` throws: the abort's own reason when it is a TandemError (a
 * stop of ours that says why), else ERR_INTERRUPTED with `message`.
 */
export function abortError(signal: AbortSignal, message: string): TandemError {
  const why: unknown = signal.reason;
  return why instanceof TandemError ? why : new TandemError('ERR_INTERRUPTED', message, { cause: why });
}

export function isErrorCode(s: unknown): s is ErrorCode {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(CATALOG, s);
}

/**
 * ERR_DISK_FULL when `e` (not a TandemError) says the disk is full: ENOSPC / EDQUOT from our own
 * writes, or the index (LevelDB), which reports it as a plain "IO error: ... No space left on
 * device" without an errno code. The message is "WHAT: no space left on device (detail); NEXT".
 * Undefined for anything else.
 */
export function diskFullError(e: unknown, what: string, next = 'free space, then rerun'): TandemError | undefined {
  if (e instanceof TandemError) return undefined;
  const err = e as (Error & { code?: string; cause?: { message?: string; code?: string } }) | undefined;
  const detail = err?.message ?? String(e);
  const text = `${err?.code ?? ''} ${detail} ${err?.cause?.code ?? ''} ${err?.cause?.message ?? ''}`;
  if (!/ENOSPC|EDQUOT|No space left on device|Disk quota exceeded/i.test(text)) return undefined;
  return new TandemError('ERR_DISK_FULL', `${what}: no space left on device (${detail}); ${next}`, { cause: e });
}

/** Whether `e` is an I/O error of the store's index (classic-level's LEVEL_IO_ERROR, itself or as the cause). */
export function isIndexIoError(e: unknown): boolean {
  const err = e as { code?: unknown; cause?: { code?: unknown } } | undefined;
  return err?.code === 'LEVEL_IO_ERROR' || err?.cause?.code === 'LEVEL_IO_ERROR';
}

/**
 * An error of the store's index (LevelDB: classic-level's LEVEL_IO_ERROR, itself or as the
 * cause) met where no code expected one, as ERR_IO or ERR_DISK_FULL with what to do. LevelDB
 * keeps the first error of a write (a failed log sync) and refuses every write after it until
 * the index is reopened: a running server answered each push with ERR_INTERNAL (EIO), or with
 * "free space, then rerun" (ENOSPC) that no rerun could follow, until it was restarted. The store
 * now reopens it by itself (Store.reopenIndex).
 */
export function indexError(e: unknown): TandemError | undefined {
  if (e instanceof TandemError || !isIndexIoError(e)) return undefined;
  const err = e as { message?: string; cause?: { message?: string } };
  const restart = "the index takes no write until it is reopened, which a running appliance tries by itself (at once after the disk takes a write again, then every minute at most) and a one-shot command does when run again; if it persists, restart the appliance (`systemctl restart tandem`, or stop and start `appliance serve`/`daemon`)";
  const full = diskFullError(e, "the store's index", `free space on that disk, then ${restart}`);
  if (full) return full;
  const detail = err?.cause?.message ?? err?.message ?? String(e);
  return new TandemError('ERR_IO', `the store's index failed a write (${detail}): check the disk (\`dmesg\`), then ${restart}`, { cause: e });
}

/**
 * Turn a system error (ENOSPC, EACCES, ...) into a TandemError with advice; anything already
 * a TandemError passes through. Used at the boundaries where file I/O happens.
 */
export function fromSystemError(e: unknown, what: string): TandemError {
  if (e instanceof TandemError) return e;
  const full = diskFullError(e, what, 'free space or move the store, then rerun (nothing was committed)');
  if (full) return full;
  switch ((e as NodeJS.ErrnoException | undefined)?.code) {
    case 'ENOENT':
      return new TandemError('ERR_VOLUME_UNREADABLE', `${what}: no such file or directory; check the path`, { cause: e });
    case 'EACCES':
    case 'EPERM':
      return new TandemError('ERR_VOLUME_UNREADABLE', `${what}: permission denied; run as a user that can read it`, { cause: e });
    case 'EIO':
      return new TandemError('ERR_IO', `${what}: ${(e as Error).message}: the disk reported an error; check it (\`dmesg\`), then rerun`, { cause: e });
    default:
      return new TandemError('ERR_IO', `${what}: ${(e as Error)?.message ?? String(e)}`, { cause: e });
  }
}
