/**
 * `appliance support-bundle`: one .tar.gz an operator can attach to a support request, with what
 * it takes to understand the appliance's state and nothing secret:
 *
 * | file | what |
 * | --- | --- |
 * | `manifest.json` | Tandem and Node versions, platform, when, the appliance's name and id, each command below and its exit code |
 * | `doctor.json`, `status.json`, `volume-list.json`, `snapshots-VOL.json` (each volume), `peer-list.json`, `config-check.json`, `tls-show.json`, `audit.json` | those commands' `--json` output (and `*.stderr.txt` when they wrote to stderr) |
 * | `config.yaml` | HOME/config.yaml with every URL cut to its scheme and host (a webhook URL may hold a secret) |
 *
 * Never in it: the tokens (HOME/token, admin.token, monitor.token, token.previous), the TLS key,
 * block data. Peer tokens are shown as in `peer list` (four characters). The bundle is written
 * to FILE.tmp and renamed when complete, mode 0600. The daemon's own log is not in HOME
 * (journald: `journalctl -u tandem`); add it by hand.
 */
import { createWriteStream, readFileSync, renameSync, rmSync } from 'node:fs';
import { arch, platform } from 'node:os';
import { createGzip } from 'node:zlib';
import { finished } from 'node:stream/promises';
import type { Home } from './home.js';

/** One command of the bundle as run: its arguments after `appliance`, exit code and output. */
export interface CommandRun {
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `appliance --home HOME --json ARGS...` in this process and returns what it printed. */
export type RunCommand = (args: string[]) => Promise<CommandRun>;

/** A USTAR header block for a regular file `name` (< 100 bytes) of `size` bytes. */
function tarHeader(name: string, size: number, mtime: number): Buffer {
  const h = Buffer.alloc(512);
  const field = (off: number, len: number, value: string) => h.write(value, off, len, 'utf8');
  const octal = (off: number, len: number, n: number) => field(off, len, n.toString(8).padStart(len - 1, '0') + '\0');
  field(0, 100, name);
  octal(100, 8, 0o600);
  octal(108, 8, 0);
  octal(116, 8, 0);
  octal(124, 12, size);
  octal(136, 12, Math.floor(mtime / 1000));
  field(148, 8, ' '.repeat(8)); // the checksum counts its own field as spaces
  field(156, 1, '0');
  field(257, 6, 'ustar\0');
  field(263, 2, '00');
  field(265, 32, 'tandem');
  field(297, 32, 'tandem');
  let sum = 0;
  for (const b of h) sum += b;
  field(148, 8, sum.toString(8).padStart(6, '0') + '\0 ');
  return h;
}

/** `text` with every http(s) URL cut to its scheme and host. */
export function redactUrls(text: string): string {
  return text.replace(/(https?:\/\/)(?:[^\s"'@/]*@)?([^\s"'/?#]+)[^\s"']*/g, (_m, scheme: string, host: string) => `${scheme}${host}/…`);
}

/** The commands a bundle holds: file name (without .json) → arguments after `appliance`. */
function commandsFor(volumes: readonly string[]): Array<[string, string[]]> {
  return [
    ['doctor', ['doctor']],
    ['status', ['status']],
    ['volume-list', ['volume', 'list']],
    // A tar name holds 100 bytes: a long volume name is numbered instead.
    ...volumes.map((v, i): [string, string[]] => [`snapshots-${v.length <= 80 ? v : `volume-${i + 1}`}`, ['snapshots', v]]),
    ['peer-list', ['peer', 'list']],
    ['config-check', ['config', 'check']],
    ['tls-show', ['tls', 'show']],
    ['audit', ['audit', '--limit', '1000']],
  ];
}

/** Write the bundle of `home` to `to` (see the module comment). Returns the files it holds. */
export async function writeSupportBundle(home: Home, to: string, run: RunCommand, version: string): Promise<{ files: string[]; bytes: number }> {
  const now = Date.now();
  const entries: Array<[string, Buffer]> = [];
  const ran: Array<{ file: string; args: string[]; exitCode: number }> = [];
  const add = async (file: string, args: string[]) => {
    const r = await run(args);
    ran.push({ file: `${file}.json`, args, exitCode: r.exitCode });
    entries.push([`${file}.json`, Buffer.from(r.stdout)]);
    if (r.stderr.trim() !== '') entries.push([`${file}.stderr.txt`, Buffer.from(r.stderr)]);
    return r;
  };
  const list = await add('volume-list', ['volume', 'list']);
  let volumes: string[] = [];
  try {
    const parsed = JSON.parse(list.stdout) as { volumes?: Array<{ name?: unknown }> } | Array<{ name?: unknown }>;
    const rows = Array.isArray(parsed) ? parsed : parsed.volumes ?? [];
    volumes = rows.map((v) => v.name).filter((n): n is string => typeof n === 'string');
  } catch {
    /* no list: no per-volume files */
  }
  for (const [file, args] of commandsFor(volumes)) if (file !== 'volume-list') await add(file, args);
  try {
    entries.push(['config.yaml', Buffer.from(redactUrls(readFileSync(home.paths.config, 'utf8')))]);
  } catch {
    /* no config file: config-check.json says so */
  }
  const manifest = {
    tandem: version,
    node: process.version,
    platform: `${platform()} ${arch()}`,
    created: new Date(now).toISOString(),
    appliance: { name: home.identity.name, id: home.identity.id },
    commands: ran,
  };
  entries.unshift(['manifest.json', Buffer.from(JSON.stringify(manifest, null, 2) + '\n')]);

  const tmp = `${to}.tmp`;
  const gzip = createGzip();
  const out = createWriteStream(tmp, { mode: 0o600 });
  gzip.pipe(out);
  let bytes = 0;
  try {
    for (const [name, data] of entries) {
      gzip.write(tarHeader(name, data.length, now));
      gzip.write(data);
      const pad = (512 - (data.length % 512)) % 512;
      if (pad > 0) gzip.write(Buffer.alloc(pad));
    }
    gzip.end(Buffer.alloc(1024)); // two zero blocks end the archive
    await finished(out);
    bytes = out.bytesWritten;
    renameSync(tmp, to);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  return { files: entries.map(([n]) => n), bytes };
}
