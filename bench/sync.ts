/**
 * Sync benchmark: two appliances on loopback against rsync and socat, on one image.
 *
 *   npm run build && node --import tsx bench/sync.ts [--size 4GiB] [--change 1] [--no-wan] [--dir DIR]
 *
 * Steps (each timed; figures printed as a table at the end):
 * 1. socat pipes the image over loopback into a file: the raw throughput reference (timed again
 *    right after the first full sync; the ratios use the mean of both).
 * 2. First full sync (scan + transfer) of the image from appliance A to appliance B; two cp + sync
 *    of the image at once (the writes of both stores, nothing else); then the transfer alone
 *    (the snapshot already taken) to a third appliance C.
 * 3. Change --change % of the 512 KiB blocks with one 4 KiB write each. rsync daemon delta
 *    (`rsync --inplace --no-whole-file --ignore-times` into an rsync:// module holding the original), then
 *    the incremental sync with a full rescan, over a counting TCP proxy (bytes on the wire).
 * 4. Another change of the same size, synced from a change list (--changed-blocks: no rescan),
 *    straight to B like rsync to its daemon: the counting proxy of step 3 is a third process
 *    relaying every byte on the same 2 cores, which rsync's transfer does not pay for.
 * 4b. C (holding the first snapshot) pulls B's latest, as failback does (`sync --reverse`).
 * 5. A no-op sync (empty change list), straight to B as well.
 * 6. WAN: another change synced through a proxy adding 50 ms round-trip time and a 100 Mbit/s cap;
 *    then another change snapshotted (a rescan) and pushed as the daemon's jobs do (its job steps,
 *    in process); then a change of rows of text (compressible) from a change list, against
 *    `rsync -z` of the same change.
 * 7. The same kinds of sync, straight to B, in a running appliance (`serve` on A's home: store open, modules
 *    loaded, workers warm), as the daemon runs them: no-op, change list (five in a row: the
 *    first and the median), rescan.
 * The CLI is bin/appliance, as operators run it; Node's own start (`node -e 0`) is printed
 * (bench/node-start.ts).
 * Peak RSS of both appliance processes is read from /proc (VmHWM); the machine's CPU use during
 * each heavy step from /proc/stat (busy, kernel, I/O wait), to tell CPU-bound from disk-bound.
 *
 * Needs rsync and socat on the PATH (apt-get install -y rsync socat).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomFillSync, randomInt } from 'node:crypto';
import { once } from 'node:events';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync, copyFileSync, statfsSync } from 'node:fs';
import { createServer, connect, type Socket, type AddressInfo } from 'node:net';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { availableParallelism, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseSize, formatBytes } from '../appliance/cli/output.js';
import { APPLIANCE, DIST_MAIN, childEnv, describeNodeStart, nodeStart, peakRss } from './node-start.js';

const ROOT = resolve(__dirname, '..');
const BLOCK = 512 * 1024;
const WRITE = 4096;
/** WAN emulation: 50 ms round trip (25 ms each way) and 100 Mbit/s each way. */
const WAN_ONE_WAY_MS = 25;
const WAN_BYTES_PER_SEC = 100e6 / 8;
/** Forwarded no-op syncs timed from the CLI (the median is reported). */
const FORWARDED_RUNS = 7;

function arg(name: string, def?: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : def;
}
const SIZE = parseSize(arg('size', '4GiB')!);
const CHANGE_PCT = Number(arg('change', '1'));
const WAN = !process.argv.includes('--no-wan');
const base = arg('dir') ?? tmpdir();
const dir = mkdtempSync(join(base, 'tandem-bench-'));

const rows: Array<[string, string, string]> = [];
function row(what: string, value: string, note = ''): void {
  rows.push([what, value, note]);
  process.stderr.write(`  ${what}: ${value} ${note}\n`);
}

function now(): number {
  return performance.now();
}

/** CPU seconds (user + kernel) a live process has used so far, from /proc (0 once it is gone). */
function cpuSecs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
  } catch {
    return 0;
  }
}

/** Run the CLI; returns parsed JSON, wall seconds, the peak RSS and CPU seconds seen (polled until exit). */
async function appliance(home: string, args: string[]): Promise<{ json: any; secs: number; rss: number; cpu: number }> {
  const t0 = now();
  const child = spawn(APPLIANCE, ['--home', home, '--json', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  let rss = 0;
  let cpu = 0;
  const poll = setInterval(() => {
    rss = Math.max(rss, peakRss(child.pid!));
    cpu = Math.max(cpu, cpuSecs(child.pid!));
  }, 20);
  const [code] = (await once(child, 'close')) as [number];
  clearInterval(poll);
  const secs = (now() - t0) / 1000;
  if (code !== 0) throw new Error(`appliance ${args.join(' ')} failed (${code}): ${err}`);
  return { json: JSON.parse(out), secs, rss, cpu };
}

/** A TCP proxy counting bytes, optionally delaying and rate-limiting each direction of the whole link (WAN). */
async function proxy(target: number, wan: boolean): Promise<{ port: number; bytes: () => number; reset: () => void; close: () => void }> {
  let bytes = 0;
  const sockets = new Set<Socket>();
  // One link: the rate cap holds for all connections together, per direction (parallel block
  // streams share the 100 Mbit/s as they would share a real WAN link).
  const link = { up: { lastDeparture: 0 }, down: { lastDeparture: 0 } };
  function pipe(from: Socket, to: Socket, dir: { lastDeparture: number }): void {
    if (!wan) {
      from.on('data', (c: Buffer) => {
        bytes += c.length;
        if (!to.write(c)) from.pause();
      });
      to.on('drain', () => from.resume());
      return;
    }
    // Each chunk leaves at max(arrival + one-way delay, previous departure + its serialization
    // time), strictly in order: one FIFO and one timer per direction (separate timers could
    // reorder chunks whose delays round to the same millisecond).
    let queued = 0;
    const fifo: Array<{ at: number; c: Buffer }> = [];
    let timer: NodeJS.Timeout | null = null;
    const pump = () => {
      timer = null;
      while (fifo.length > 0 && fifo[0]!.at <= now()) {
        const { c } = fifo.shift()!;
        queued -= c.length;
        to.write(c);
      }
      if (queued < 1024 * 1024) from.resume();
      if (fifo.length > 0) timer = setTimeout(pump, Math.max(1, fifo[0]!.at - now()));
    };
    from.on('data', (c: Buffer) => {
      bytes += c.length;
      const departure = Math.max(now() + WAN_ONE_WAY_MS, dir.lastDeparture + (c.length / WAN_BYTES_PER_SEC) * 1000);
      dir.lastDeparture = departure;
      queued += c.length;
      fifo.push({ at: departure, c });
      if (queued > 4 * 1024 * 1024) from.pause();
      if (!timer) timer = setTimeout(pump, Math.max(1, departure - now()));
    });
  }
  const server = createServer((client) => {
    const upstream = connect(target, '127.0.0.1');
    sockets.add(client).add(upstream);
    pipe(client, upstream, link.up);
    pipe(upstream, client, link.down);
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    bytes: () => bytes,
    reset: () => void (bytes = 0),
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/** Overwrite 4 KiB at a random offset inside `n` distinct random blocks; returns their indices. */
function change(img: string, n: number, blocks: number, fill: (buf: Buffer, block: number) => void = (buf) => randomFillSync(buf)): number[] {
  const picked = new Set<number>();
  while (picked.size < n) picked.add(randomInt(0, blocks));
  const fd = openSync(img, 'r+');
  const buf = Buffer.alloc(WRITE);
  for (const b of picked) {
    fill(buf, b);
    writeSync(fd, buf, 0, WRITE, b * BLOCK + randomInt(0, BLOCK / WRITE) * WRITE);
  }
  closeSync(fd);
  return [...picked].sort((x, y) => x - y);
}

/** A page of rows of text, as a database writes them (compressible, unlike the random writes). */
function textRows(buf: Buffer, block: number): void {
  let text = '';
  for (let i = 0; text.length < buf.length; i++) text += `${block * 1000 + i},pending,${(((block + i) * 37) % 10000) / 100},2026-12-06T08:00:${String(i % 60).padStart(2, '0')}Z\n`;
  buf.write(text.slice(0, buf.length), 'latin1');
}

/**
 * Write back dirty pages before a timed step, so that no step pays for the previous one's
 * writes (the image just created, a store just filled): the disk is shared by every tool here.
 */
function settle(): void {
  spawnSync('sync');
}

/** The machine's CPU counters (/proc/stat, all cores): what a step used, busy or waiting on the disk. */
function cpuMark(): number[] {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  return line.trim().split(/\s+/).slice(1, 9).map(Number);
}

/** Since `mark`: the share of all cores' time busy, and the share idle waiting on I/O. */
function cpuSince(mark: number[]): string {
  const d = cpuMark().map((v, i) => v - mark[i]!);
  const total = d.reduce((a, b) => a + b, 0) || 1;
  const [user, nice, system, idle, iowait, irq, softirq, steal] = d as [number, number, number, number, number, number, number, number];
  const busy = user + nice + system + irq + softirq;
  return `machine CPU ${((100 * busy) / total).toFixed(0)} % busy (${((100 * system) / total).toFixed(0)} % kernel), ${((100 * iowait) / total).toFixed(0)} % I/O wait${steal > 0 ? `, ${((100 * steal) / total).toFixed(0)} % stolen` : ''}`;
}

function loopbackBytes(): number {
  const line = readFileSync('/proc/net/dev', 'utf8').split('\n').find((l) => l.trim().startsWith('lo:'));
  return line ? Number(line.trim().split(/\s+/)[1]) : 0;
}

async function main(): Promise<void> {
  if (!existsSync(DIST_MAIN)) throw new Error('run `npm run build` first');
  for (const tool of ['rsync', 'socat']) if (spawnSync('which', [tool]).status !== 0) throw new Error(`${tool} is not installed: apt-get install -y rsync socat`);
  // At its peak (the image written twice next to the image and two stores) the bench holds 5
  // images' worth on this disk; a full disk would fail a step half-way with a bare exit code.
  const { bavail, bfree, bsize, blocks: diskBlocks } = statfsSync(dir);
  // A nearly full disk writes far slower (socat 10.7-11.6 s at 91 % used, 3.95-4.38 s at 22 %):
  // the figures that compare with socat or cp say which disk they had.
  const disk = `disk ${formatBytes(bavail * bsize)} free of ${formatBytes(diskBlocks * bsize)} (${Math.round((100 * (diskBlocks - bfree)) / (diskBlocks - bfree + bavail))} % used, as df counts) at the start`;
  if (bavail * bsize < 5.5 * SIZE) throw new Error(`bench/sync needs about ${formatBytes(5.5 * SIZE)} free in ${base}, and it has ${formatBytes(bavail * bsize)}: free space, or pass --dir DIR on a larger disk (or a smaller --size)`);
  const blocks = Math.ceil(SIZE / BLOCK);
  const nChange = Math.max(1, Math.round((blocks * CHANGE_PCT) / 100));
  process.stderr.write(`bench: ${formatBytes(SIZE)} image, ${blocks} blocks of 512 KiB, ${nChange} changed per step, in ${dir}\n`);

  // The image: random data (incompressible, the worst case for the sync and for rsync).
  const img = join(dir, 'disk.img');
  const fd = openSync(img, 'w');
  const chunk = Buffer.alloc(8 * 1024 * 1024);
  for (let off = 0; off < SIZE; off += chunk.length) {
    randomFillSync(chunk);
    writeSync(fd, chunk, 0, Math.min(chunk.length, SIZE - off));
  }
  closeSync(fd);

  // 1. socat over loopback: timed again right after the first full sync, which is compared with
  // the mean of both (the disk's speed changes from minute to minute: socat took 4.2 s and 10.5 s
  // in two runs of one session, with the same disk use).
  const socat = async (): Promise<{ secs: number; cpu: string }> => {
    const sock = join(dir, 'socat.out');
    const lport = await freePort();
    const rx = spawn('socat', ['-u', `TCP-LISTEN:${lport},bind=127.0.0.1,reuseaddr`, `OPEN:${sock},creat,trunc`]);
    await new Promise((r) => setTimeout(r, 300));
    settle();
    const mark = cpuMark();
    const start = now();
    spawnSync('socat', ['-u', `FILE:${img}`, `TCP:127.0.0.1:${lport}`]);
    await once(rx, 'close');
    const secs = (now() - start) / 1000;
    const used = cpuSince(mark);
    rmSync(sock);
    return { secs, cpu: used };
  };
  const socatBefore = await socat();
  row('socat image over loopback', `${socatBefore.secs.toFixed(2)} s`, `${formatBytes(SIZE / socatBefore.secs)}/s; ${socatBefore.cpu}`);
  let cpu: ReturnType<typeof cpuMark>;
  let t0: number;

  // Two appliances; B serves, A reaches it through a counting proxy.
  const homeA = join(dir, 'a');
  const homeB = join(dir, 'b');
  await appliance(homeA, ['init', '--name', 'onprem']);
  const b = (await appliance(homeB, ['init', '--name', 'cloud'])).json;
  const serve = spawn(APPLIANCE, ['--home', homeB, '--json', 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.push(serve);
  const [line] = (await once(serve.stdout!, 'data')) as [Buffer];
  const url = JSON.parse(line.toString()).url as string;
  const bPort = Number(new URL(url).port);
  const lan = await proxy(bPort, false);
  const wan = await proxy(bPort, true);
  await appliance(homeA, ['peer', 'add', 'cloud', '--url', `https://127.0.0.1:${lan.port}`, '--token', b.token, '--fingerprint', b.fingerprint]);
  await appliance(homeA, ['peer', 'add', 'cloud-wan', '--url', `https://127.0.0.1:${wan.port}`, '--token', b.token, '--fingerprint', b.fingerprint, '--no-check']);
  await appliance(homeA, ['volume', 'add', 'vol', '--path', img]);
  let rssA = 0;

  // 2. First full sync, straight to B (as socat: no proxy in the path).
  await appliance(homeA, ['peer', 'add', 'cloud-direct', '--url', url, '--token', b.token, '--fingerprint', b.fingerprint]);
  settle();
  cpu = cpuMark();
  const cpuB0 = cpuSecs(serve.pid!);
  const full = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud-direct']);
  const cpuB = cpuSecs(serve.pid!) - cpuB0;
  rssA = Math.max(rssA, full.rss);
  const fullCpu = cpuSince(cpu);
  const socatAfter = await socat();
  const socatSecs = (socatBefore.secs + socatAfter.secs) / 2;
  row('first full sync (scan + transfer)', `${full.secs.toFixed(2)} s`, `${formatBytes(SIZE / full.secs)}/s = ${(socatSecs / full.secs).toFixed(2)}x socat's throughput (target >= 0.8; the mean of the socat before and after); ${fullCpu}`);
  row('  of which in the sync command (scan + transfer, no process start)', `${full.json.seconds.toFixed(2)} s`, `${full.json.blocksSent} blocks, ${formatBytes(full.json.wireBytes)} of block streams`);
  row('  CPU used by each appliance', `${full.cpu.toFixed(1)} s + ${cpuB.toFixed(1)} s`, `A (scan, send) + B (receive, verify, store), over ${full.secs.toFixed(1)} s on ${availableParallelism()} cores shared by both`);
  row('socat again, right after', `${socatAfter.secs.toFixed(2)} s`, `${formatBytes(SIZE / socatAfter.secs)}/s; ${socatAfter.cpu}`);
  // What the disk allows: both appliances store the image on this one disk, durably, at the
  // same time; two `cp + sync` of it running together do the same writes and nothing else.
  settle();
  t0 = now();
  await Promise.all(
    ['copy1.img', 'copy2.img'].map(async (name) => {
      const copy = spawn('sh', ['-c', `cp "${img}" "${join(dir, name)}" && sync "${join(dir, name)}"`], { stdio: 'ignore' });
      const [code] = (await once(copy, 'close')) as [number];
      if (code !== 0) throw new Error(`cp + sync of the image exited ${code}`);
    }),
  );
  const twice = (now() - t0) / 1000;
  for (const name of ['copy1.img', 'copy2.img']) rmSync(join(dir, name));
  row('  the image written twice at once, durably (two cp + sync)', `${twice.toFixed(2)} s`, `${(socatSecs / twice).toFixed(2)}x socat's throughput (the mean): the disk's bound for a first sync between two stores on it; the sync took ${(full.secs / twice).toFixed(2)}x this`);

  // 2b. The transfer alone, to a third appliance C: the snapshot is taken first, then synced
  // with an empty change list (no rescan). On this one machine both appliances write their
  // store to the same disk, so the combined figure above writes the image twice to socat's once.
  const homeC = join(dir, 'c');
  const c = (await appliance(homeC, ['init', '--name', 'cloud2'])).json;
  const serveC = spawn(APPLIANCE, ['--home', homeC, '--json', 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.push(serveC);
  const [lineC] = (await once(serveC.stdout!, 'data')) as [Buffer];
  await appliance(homeA, ['peer', 'add', 'cloud2', '--url', JSON.parse(lineC.toString()).url as string, '--token', c.token, '--fingerprint', c.fingerprint]);
  const emptyList = join(dir, 'empty.txt');
  writeFileSync(emptyList, '');
  settle();
  cpu = cpuMark();
  const cpuC0 = cpuSecs(serveC.pid!);
  const xfer = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud2', '--changed-blocks', emptyList]);
  const cpuC = cpuSecs(serveC.pid!) - cpuC0;
  rssA = Math.max(rssA, xfer.rss);
  row('first full sync, transfer only (snapshot already taken)', `${xfer.secs.toFixed(2)} s`, `${formatBytes(SIZE / xfer.secs)}/s = ${(socatSecs / xfer.secs).toFixed(2)}x socat's throughput (the mean); ${xfer.json.blocksSent} blocks; ${cpuSince(cpu)}`);
  row('  CPU used by each appliance', `${xfer.cpu.toFixed(1)} s + ${cpuC.toFixed(1)} s`, `A (read, verify, send) + C (receive, verify, store): ${(xfer.cpu / (SIZE / 2 ** 30)).toFixed(2)} s and ${(cpuC / (SIZE / 2 ** 30)).toFixed(2)} s per GiB`);
  // C stays up: after the changes below it pulls them from B (step 4b).

  // 3. rsync baseline and incremental sync with rescan, same change.
  const mod = join(dir, 'rsync-module');
  mkdirSync(mod);
  copyFileSync(img, join(mod, 'disk.img'));
  const rport = await freePort();
  writeFileSync(join(dir, 'rsyncd.conf'), `use chroot = no\n[mod]\n  path = ${mod}\n  read only = no\n  uid = root\n  gid = root\n`);
  const rsyncd = spawn('rsync', ['--daemon', '--no-detach', `--config=${join(dir, 'rsyncd.conf')}`, `--port=${rport}`, '--address=127.0.0.1'], { stdio: 'ignore' });
  started.push(rsyncd);
  await listening(rport);
  const changed1 = change(img, nChange, blocks);
  const payload = changed1.length * BLOCK;
  settle();
  cpu = cpuMark();
  t0 = now();
  const rs = spawnSync('rsync', ['--inplace', '--no-whole-file', '--ignore-times', '--stats', img, `rsync://127.0.0.1:${rport}/mod/disk.img`], { encoding: 'utf8' });
  const rsyncSecs = (now() - t0) / 1000;
  if (rs.status !== 0) throw new Error(`rsync failed: ${rs.stderr}`);
  const rsSent = /Total bytes sent: ([\d,.]+)/.exec(rs.stdout)?.[1] ?? '?';
  row('rsync --inplace --no-whole-file to rsync://', `${rsyncSecs.toFixed(2)} s`, `bytes sent ${rsSent}; ${cpuSince(cpu)}`);
  rsyncd.kill();

  lan.reset();
  settle();
  const lo0 = loopbackBytes();
  cpu = cpuMark();
  const inc = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud']);
  const incCpu = cpuSince(cpu);
  const lo1 = loopbackBytes();
  rssA = Math.max(rssA, inc.rss);
  row('incremental sync with rescan', `${inc.secs.toFixed(2)} s`, `${(inc.secs / rsyncSecs).toFixed(3)}x rsync (target <= 0.5); ${inc.json.blocksSent} blocks sent; ${inc.json.seconds.toFixed(2)} s in the command; ${incCpu}`);
  const wire = lan.bytes();
  row('  bytes on the wire (proxy count, both directions)', formatBytes(wire), `${(wire / (payload + 1024 * 1024)).toFixed(3)}x (changed payload ${formatBytes(payload)} + 1 MiB) (target <= 1.05); /proc/net/dev lo delta ${formatBytes(lo1 - lo0)} (shared machine: includes others' traffic, each byte counted twice through the proxy)`);

  // 4. From a change list, straight to B (no proxy in the path, as rsync has none).
  const changed2 = change(img, nChange, blocks);
  const list = join(dir, 'changed.txt');
  writeFileSync(list, changed2.join('\n') + '\n');
  settle();
  const fromList = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud-direct', '--changed-blocks', list]);
  rssA = Math.max(rssA, fromList.rss);
  row('incremental sync from a change list (no rescan)', `${fromList.secs.toFixed(2)} s`, `${(fromList.secs / rsyncSecs).toFixed(3)}x rsync (target <= 0.05); ${fromList.json.blocksSent} blocks; ${fromList.json.seconds.toFixed(2)} s in the command`);

  // 4b. A pull, as failback runs it (`sync --reverse`): C, which holds the first snapshot, pulls
  // B's latest (the changes of steps 3 and 4) in its running appliance.
  await appliance(homeC, ['peer', 'add', 'cloud', '--url', url, '--token', b.token, '--fingerprint', b.fingerprint]);
  settle();
  const pulled = await appliance(homeC, ['sync', 'vol', '--peer', 'cloud', '--reverse']);
  row('incremental pull (sync --reverse, as failback), C in a running appliance', `${pulled.secs.toFixed(2)} s`, `${pulled.json.blocksSent} blocks (two changes), ${pulled.json.nodesSent} nodes, ${pulled.json.requests} requests; ${pulled.json.seconds.toFixed(2)} s in the command`);
  const rssC = peakRss(serveC.pid!);
  serveC.kill('SIGTERM');
  await once(serveC, 'close');
  rmSync(homeC, { recursive: true, force: true });

  // 5. No-op.
  writeFileSync(list, '');
  const noop = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud-direct', '--changed-blocks', list]);
  row('no-op sync (empty change list)', `${(noop.json.seconds * 1000).toFixed(0)} ms in the command`, `${noop.json.requests} request(s); ${(noop.secs * 1000).toFixed(0)} ms with CLI process start (target < 100 ms)`);

  // 6. WAN.
  if (WAN) {
    const changed3 = change(img, nChange, blocks);
    writeFileSync(list, changed3.join('\n') + '\n');
    wan.reset();
    const w = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud-wan', '--changed-blocks', list]);
    const ideal = (changed3.length * BLOCK) / WAN_BYTES_PER_SEC + 10 * (2 * WAN_ONE_WAY_MS) / 1000;
    row('WAN sync (50 ms RTT, 100 Mbit/s), change list', `${w.json.seconds.toFixed(2)} s`, `${(w.json.seconds / ideal).toFixed(2)}x (changed bytes at 100 Mbit/s + 10 RTT = ${ideal.toFixed(2)} s) (target <= 1.5); ${w.json.requests} requests; ${formatBytes(wan.bytes())} on the wire`);

    // 6b. The daemon's way over the same link: a scheduled job of the volume takes its snapshot
    // (a full rescan: the daemon has no change list) and then pushes it (its job steps,
    // appliance/scheduler/steps.ts, run in this process on A's home as the daemon runs them: no
    // process start). The new blocks travel while the volume is scanned, as with `appliance sync`.
    const changed4 = change(img, nChange, blocks);
    settle();
    const { Home } = await import('../appliance/home.js');
    const { applianceSteps } = await import('../appliance/scheduler/steps.js');
    const home = Home.load(homeA);
    const store = await home.openStore();
    try {
      const steps = applianceSteps(home, store, () => null);
      const signal = new AbortController().signal;
      wan.reset();
      const t0 = now();
      const snap = await steps.snapshot('vol', { labels: {}, signal, replicateTo: 'cloud-wan' });
      const scanned = (now() - t0) / 1000;
      const pushed = await steps.replicate!('vol', snap, 'cloud-wan', signal);
      const secs = (now() - t0) / 1000;
      const idealJob = (changed4.length * BLOCK) / WAN_BYTES_PER_SEC + 10 * (2 * WAN_ONE_WAY_MS) / 1000;
      row(
        "  a daemon job over it: snapshot (rescan) + push",
        `${secs.toFixed(2)} s`,
        `${(secs / idealJob).toFixed(2)}x; the snapshot step ${scanned.toFixed(2)} s, ${pushed.blocksSentEarly} of ${changed4.length} blocks sent during it; ${formatBytes(wan.bytes())} on the wire for ${formatBytes(pushed.bytesSent)} of blocks`,
      );
    } finally {
      await store.close();
    }

    // 6c. Writes of rows of text over the same link: their delta frames go deflated (codec 3).
    // rsync -z of the same change, from a module holding what B holds, for comparison.
    const randomWire = wan.bytes();
    copyFileSync(img, join(mod, 'disk.img'));
    const rsyncdZ = spawn('rsync', ['--daemon', '--no-detach', `--config=${join(dir, 'rsyncd.conf')}`, `--port=${rport}`, '--address=127.0.0.1'], { stdio: 'ignore' });
    started.push(rsyncdZ);
    await listening(rport);
    const changed5 = change(img, nChange, blocks, textRows);
    writeFileSync(list, changed5.join('\n') + '\n');
    settle();
    wan.reset();
    const tw = await appliance(homeA, ['sync', 'vol', '--peer', 'cloud-wan', '--changed-blocks', list]);
    const textWire = wan.bytes();
    const rz = spawnSync('rsync', ['-z', '--inplace', '--no-whole-file', '--ignore-times', '--stats', img, `rsync://127.0.0.1:${rport}/mod/disk.img`], { encoding: 'utf8' });
    if (rz.status !== 0) throw new Error(`rsync -z failed: ${rz.stderr}`);
    rsyncdZ.kill();
    const rzSent = /Total bytes sent: ([\d,.]+)/.exec(rz.stdout)?.[1] ?? '?';
    row(
      'WAN sync of text writes (rows, 4 KiB a block), change list',
      `${tw.json.seconds.toFixed(2)} s`,
      `${formatBytes(textWire)} on the wire (the daemon job's random writes: ${formatBytes(randomWire)}); rsync -z of the same change sent ${rzSent} bytes`,
    );
  }

  // 7. In a running appliance: with `serve` (or `daemon`) on A's home, A's store is open, its
  // modules loaded and its hash workers warm; CLI commands are forwarded to it (POST /v1/cli)
  // and the daemon's scheduled syncs run there with no process start at all. Timed here as the
  // HTTPS request from this process, and as the CLI run that forwards (with its process start).
  const serveA = spawn(APPLIANCE, ['--home', homeA, '--json', 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  started.push(serveA);
  const [lineA] = (await once(serveA.stdout!, 'data')) as [Buffer];
  const aUrl = new URL('/v1/cli', JSON.parse(lineA.toString()).url as string);
  const tokenA = readFileSync(join(homeA, 'admin.token'), 'utf8').trim(); // POST /v1/cli takes the admin token
  const certA = readFileSync(join(homeA, 'tls', 'cert.pem'), 'utf8');
  const agent = new HttpsAgent({ keepAlive: true, ca: certA, checkServerIdentity: () => undefined });
  const inAppliance = async (args: string[]): Promise<{ json: any; secs: number }> => {
    const body = JSON.stringify({ argv: ['node', 'appliance', '--home', homeA, '--json', ...args] });
    const start = now();
    const res = await new Promise<{ status: number; text: string }>((resolvePromise, reject) => {
      const req = httpsRequest(aUrl, { method: 'POST', agent, headers: { 'content-type': 'application/json', authorization: `Bearer ${tokenA}`, 'content-length': Buffer.byteLength(body) } }, (r) => {
        let text = '';
        r.setEncoding('utf8');
        r.on('data', (c: string) => (text += c));
        r.on('end', () => resolvePromise({ status: r.statusCode!, text }));
      });
      req.on('error', reject);
      req.end(body);
    });
    const secs = (now() - start) / 1000;
    const out = JSON.parse(res.text) as { exitCode: number; stdout: string; stderr: string };
    if (res.status !== 200 || out.exitCode !== 0) throw new Error(`appliance ${args.join(' ')} in the running appliance failed: ${res.text}`);
    return { json: JSON.parse(out.stdout), secs };
  };
  writeFileSync(list, '');
  await inAppliance(['sync', 'vol', '--peer', 'cloud-direct', '--changed-blocks', list]); // warms the server's peer client and workers
  const warmNoop = await inAppliance(['sync', 'vol', '--peer', 'cloud-direct', '--changed-blocks', list]);
  row('no-op sync in a running appliance', `${(warmNoop.secs * 1000).toFixed(0)} ms`, `(target < 100 ms) one HTTPS request to it (the daemon's own syncs need none); ${(warmNoop.json.seconds * 1000).toFixed(0)} ms in the command, ${warmNoop.json.requests} request(s) to the peer`);
  // A forwarded command takes ~0.1 s, where one busy moment of the machine shows: the median of
  // FORWARDED_RUNS.
  const forwarded: number[] = [];
  for (let i = 0; i < FORWARDED_RUNS; i++) forwarded.push((await appliance(homeA, ['sync', 'vol', '--peer', 'cloud-direct', '--changed-blocks', list])).secs * 1000);
  const medianOf = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
  const runsOf = (xs: number[]) => `with the CLI process start (target < 100 ms): median of ${xs.map((x) => x.toFixed(0)).join(', ')} ms`;
  row('  the same from the CLI, forwarded to it', `${medianOf(forwarded).toFixed(0)} ms`, runsOf(forwarded));
  const start = nodeStart();
  row("  Node's own start, in every CLI figure", `${start.ms.toFixed(0)} ms`, describeNodeStart(start));
  // Five change-list syncs in a row, as a daemon runs them (each a new change of the same size):
  // the first after the start, and the median of all (the appliance's steady state).
  const listRuns: Array<{ secs: number; blocks: number }> = [];
  for (let i = 0; i < 5; i++) {
    const changed4 = change(img, nChange, blocks);
    writeFileSync(list, changed4.join('\n') + '\n');
    settle();
    const r = await inAppliance(['sync', 'vol', '--peer', 'cloud-direct', '--changed-blocks', list]);
    listRuns.push({ secs: r.secs, blocks: r.json.blocksSent });
  }
  const listMedian = [...listRuns].sort((x, y) => x.secs - y.secs)[2]!;
  row(
    'change-list sync in a running appliance',
    `${listMedian.secs.toFixed(2)} s`,
    `${(listMedian.secs / rsyncSecs).toFixed(3)}x rsync (target <= 0.05): median of ${listRuns.map((r) => r.secs.toFixed(2)).join(', ')} s, the first ${(listRuns[0]!.secs / rsyncSecs).toFixed(3)}x; ${listRuns.map((r) => r.blocks).join('/')} blocks`,
  );
  change(img, nChange, blocks);
  settle();
  const warmInc = await inAppliance(['sync', 'vol', '--peer', 'cloud-direct']);
  row('incremental sync with rescan in a running appliance', `${warmInc.secs.toFixed(2)} s`, `${(warmInc.secs / rsyncSecs).toFixed(3)}x rsync (target <= 0.5); ${warmInc.json.blocksSent} blocks`);
  agent.destroy();
  const rssA2 = peakRss(serveA.pid!);
  serveA.kill('SIGTERM');
  await once(serveA, 'close');
  rssA = Math.max(rssA, rssA2);

  const rssB = peakRss(serve.pid!);
  row('peak RSS appliance A (sync client, CLI and running)', formatBytes(rssA), '(target <= 256 MiB)');
  row('peak RSS appliance B (server)', formatBytes(rssB), '(target <= 256 MiB)');
  row('peak RSS appliance C (server, transfer only)', formatBytes(rssC), '(target <= 256 MiB)');
  serve.kill('SIGTERM');
  await once(serve, 'close');
  lan.close();
  wan.close();

  const w0 = Math.max(...rows.map((r) => r[0].length));
  const w1 = Math.max(...rows.map((r) => r[1].length));
  console.log(`\nTandem sync benchmark: ${formatBytes(SIZE)} image, ${CHANGE_PCT} % of 512 KiB blocks changed by 4 KiB writes per step; ${disk}\n`);
  for (const [a, v, n] of rows) console.log(`${a.padEnd(w0)}  ${v.padStart(w1)}  ${n}`);
}

/**
 * A port nothing listens on now (the kernel's pick for a listener closed at once), for socat and
 * the rsync daemon, which take a port number: a random one could be the port of a server or
 * proxy of this run (rsync then met an HTTPS server: 'did not see server greeting').
 */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((res) => srv.listen(0, '127.0.0.1', res));
  const { port } = srv.address() as AddressInfo;
  await new Promise((res) => srv.close(res));
  return port;
}

/**
 * Resolves once something accepts connections on 127.0.0.1:`port` (an rsync daemon just started:
 * a fixed 0.5 s wait was not always enough while the disk flushed a copied image); fails after 20 s.
 */
async function listening(port: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise<boolean>((res) => {
      const sock = connect(port, '127.0.0.1');
      sock.once('connect', () => (sock.destroy(), res(true)));
      sock.once('error', () => res(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nothing listens on 127.0.0.1:${port} after 20 s (the rsync daemon did not start)`);
}

/** Child processes to stop whatever happens (a failed step must not leave a server running). */
const started: ChildProcess[] = [];

function cleanup(children: ChildProcess[]): void {
  for (const c of children) if (c.exitCode === null) c.kill();
  rmSync(dir, { recursive: true, force: true });
}

main()
  .catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  })
  .finally(() => {
    cleanup(started);
    // A failed step leaves the loopback proxies listening: exit rather than wait on them.
    if (process.exitCode === 1) process.exit(1);
  });
