/**
 * The audit log: every `appliance` command that may change this appliance (a volume removed, a
 * snapshot deleted or held, a token or certificate rotated, a failover, a sync, ...) is recorded
 * in HOME/audit.log (mode 0600), one JSON line each, whether it succeeded or not:
 *
 * ```
 * {"at":"2026-12-04T22:50:01.123Z","user":"alice","pid":4242,"forwarded":true,
 *  "command":["snapshots","db","--delete","20261204T..."],"exitCode":0}
 * ```
 * `user` is who ran the `appliance` command: the login name of the CLI process (with `sudo`,
 * "root (sudo: alice)"); a command forwarded to the running server carries the name its CLI sent
 * (`forwarded: true`). `command` is the command line after `appliance`, with secrets (the value
 * of `--token`) replaced by "…". `error` is the error code of a failed command. Commands that
 * only read (status, doctor, list, show, verify, `--dry-run`, ...) are not recorded; nor are
 * `serve` and `daemon`, whose start, stop and scheduled jobs are in their own log. A command is
 * recorded twice: as it starts (`"started": true`, no exitCode; written, not synced: a `kill -9`
 * keeps it) and as it ends. `appliance audit` lists a start only while no end of it follows, so a
 * command killed midway (after it may have removed a volume or replaced a token) shows as
 * "started, no end recorded" instead of not at all. At 16 MiB the log is renamed audit.log.1 (the one
 * before that is dropped). Each end record is on the disk (fdatasync) before the command returns, so a
 * power cut right after a `volume remove` does not lose its record; a line torn by a crash
 * mid-write is skipped by the reader, and the next record starts on a line of its own.
 * `appliance audit` prints it.
 */
import { closeSync, existsSync, fdatasyncSync, fsyncSync, openSync, readFileSync, readSync, renameSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';

export const AUDIT_FILE = 'audit.log';
/** The log is rotated once it is this large. */
export const AUDIT_ROTATE_BYTES = 16 * 1024 * 1024;

export interface AuditRecord {
  readonly at: string;
  readonly user: string;
  readonly pid: number;
  readonly forwarded?: true;
  readonly command: readonly string[];
  /** How it ended; absent in the record of its start. */
  readonly exitCode?: number;
  readonly error?: string;
  /** The record written as the command starts (its end has exitCode): a command killed midway leaves this one alone. */
  readonly started?: true;
}

/** Commands (their words before any operand) that only read: not recorded. */
const READ_ONLY = new Set(['status', 'doctor', 'config check', 'volume list', 'peer list', 'token show', 'tls show', 'cost', 'verify', 'audit', 'help', 'ebs list', 'support-bundle']);
/** Commands that only read unless given one of these options. */
const WRITING_OPTIONS: Record<string, readonly string[]> = {
  snapshots: ['hold', 'release', 'delete'],
  discover: ['write'],
};
/** Options whose value is a secret. */
const SECRET_OPTIONS = new Set(['--token']);

/** Whether a command with these words and options is recorded (all but those that only read, and `--dry-run`s). */
export function audited(words: string, opts: Record<string, unknown>): boolean {
  if (opts.dryRun === true || READ_ONLY.has(words)) return false;
  const writing = WRITING_OPTIONS[words];
  return writing === undefined || writing.some((o) => opts[o] !== undefined && opts[o] !== false);
}

/** The command line after `appliance`, secrets replaced. */
export function redactArgs(args: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const eq = a.indexOf('=');
    if (eq > 0 && SECRET_OPTIONS.has(a.slice(0, eq))) out.push(`${a.slice(0, eq)}=…`);
    else if (SECRET_OPTIONS.has(a) && i + 1 < args.length) {
      out.push(a, '…');
      i++;
    } else out.push(a);
  }
  return out;
}

/**
 * Append `rec` to HOME/audit.log, rotating it first when it is full. Nothing is written for a
 * directory that holds no appliance (a command that failed before `init`).
 */
export function appendAudit(homeDir: string, rec: AuditRecord, opts: { sync?: boolean } = {}): void {
  if (!existsSync(join(homeDir, 'appliance.json'))) return;
  const path = join(homeDir, AUDIT_FILE);
  let size = statSync(path, { throwIfNoEntry: false })?.size ?? 0;
  if (size >= AUDIT_ROTATE_BYTES) {
    renameSync(path, `${path}.1`);
    size = 0;
  }
  const fd = openSync(path, 'a+', 0o600);
  try {
    // A crash mid-write left a line without its end: the record starts on a new line.
    const last = Buffer.alloc(1);
    const torn = size > 0 && readSync(fd, last, 0, 1, size - 1) === 1 && last[0] !== 0x0a;
    writeSync(fd, (torn ? '\n' : '') + JSON.stringify(rec) + '\n');
    if (opts.sync !== false) fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  // A new file (the first record, or after a rotation) is in its directory for good.
  if (size === 0) {
    const dir = openSync(homeDir, 'r');
    try {
      fsyncSync(dir);
    } finally {
      closeSync(dir);
    }
  }
}

/**
 * The records as `appliance audit` lists them: a start record is dropped once the end record of
 * its command follows (same process and command line); one left has no end: the command was
 * killed, or the machine stopped, after it may have changed something.
 */
export function auditEntries(records: readonly AuditRecord[]): AuditRecord[] {
  const key = (r: AuditRecord) => `${r.pid} ${JSON.stringify(r.command)}`;
  const open = new Map<string, number[]>();
  const ended = new Set<number>();
  records.forEach((r, i) => {
    const k = key(r);
    if (r.started) open.set(k, [...(open.get(k) ?? []), i]);
    else {
      const first = open.get(k)?.shift();
      if (first !== undefined) ended.add(first);
    }
  });
  return records.filter((r, i) => !(r.started && ended.has(i)));
}

/** The records of HOME/audit.log.1 then audit.log, oldest first; a line that is not a record (torn by a crash) is skipped. */
export function readAudit(homeDir: string): AuditRecord[] {
  const out: AuditRecord[] = [];
  for (const f of [`${AUDIT_FILE}.1`, AUDIT_FILE]) {
    let text: string;
    try {
      text = readFileSync(join(homeDir, f), 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) {
      if (line.trim() === '') continue;
      try {
        const r = JSON.parse(line) as AuditRecord;
        if (typeof r.at === 'string' && Array.isArray(r.command)) out.push(r);
      } catch {
        /* a torn line */
      }
    }
  }
  return out;
}
