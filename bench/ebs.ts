/**
 * EBS export/import throughput against the AWS emulator on loopback with added latency per
 * request (default 5 ms), the request count per changed block, and throughput with 20 %
 * throttling. Not a test: prints a table.
 *
 *   node --import tsx bench/ebs.ts [--size 4GiB] [--latency 5] [--change 1]
 *
 * The image is written with every 8th block zero (sparse-like) and random data elsewhere.
 */
import { mkdtempSync, rmSync, mkdirSync, openSync, writeSync, closeSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Store } from '../store/index.js';
import { openVolumeReader } from '../appliance/volumes/index.js';
import { exportSnapshot, importSnapshot } from '../appliance/ebs/index.js';
import { parseSize } from '../appliance/cli/output.js';
import { startAwsEmulator } from '../emulators/aws/index.js';

const BS = 524288;
const { values } = parseArgs({ options: { size: { type: 'string', default: '4GiB' }, latency: { type: 'string', default: '5' }, change: { type: 'string', default: '1' } } });
const size = parseSize(values.size!);
const latencyMs = Number(values.latency);
const changePct = Number(values.change);
const blocks = Math.ceil(size / BS);

async function main(): Promise<void> {
  const emu = await startAwsEmulator({ port: 0 });
  Object.assign(process.env, { AWS_ENDPOINT_URL_EBS: emu.url, AWS_REGION: 'us-east-1', AWS_ACCESS_KEY_ID: 'bench', AWS_SECRET_ACCESS_KEY: 'bench', AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' });
  const control = async (path: string, body: unknown = {}) => (await fetch(emu.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })).json();
  const stats = async () => (await fetch(emu.url + '/_emulator/stats')).json() as Promise<{ operations: Record<string, number>; errors: Record<string, number>; throttled: number }>;
  const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-ebs-'));
  const rows: string[][] = [];
  const row = (...cells: Array<string | number>) => rows.push(cells.map(String));

  function writeImage(path: string, seedBlocks: (i: number) => boolean): void {
    const fd = openSync(path, 'w');
    const buf = Buffer.alloc(BS);
    for (let i = 0; i < blocks; i++) {
      const len = Math.min(BS, size - i * BS);
      if (i % 8 === 7) { buf.fill(0); } else if (seedBlocks(i)) randomFillSync(buf);
      writeSync(fd, buf, 0, len, i * BS);
    }
    closeSync(fd);
  }

  async function scan(store: Store, path: string) {
    const r = await openVolumeReader(path);
    try { return await store.scanVolume(r, { volume: 'bench', blockSize: BS }); } finally { await r.close(); }
  }

  try {
    mkdirSync(join(dir, 'a'));
    mkdirSync(join(dir, 'b'));
    const store = await Store.open(join(dir, 'a'));
    const image = join(dir, 'vol.img');
    writeImage(image, () => true);
    const snap1 = await scan(store, image);
    await control('/_emulator/faults', { latencyMs });

    await control('/_emulator/stats/reset');
    const e1 = await exportSnapshot(store, snap1);
    const s1 = await stats();
    row('full export', e1.blocksUploaded, (e1.bytesUploaded / 1e6 / e1.seconds).toFixed(1), e1.seconds.toFixed(1), s1.operations.PutSnapshotBlock ?? 0, e1.requests);

    // Change `changePct` % of the blocks (spread over the volume) and export again.
    const step = Math.max(1, Math.round(100 / changePct));
    const fd = openSync(image, 'r+');
    const buf = Buffer.alloc(BS);
    let changed = 0;
    for (let i = 3; i < blocks; i += step) {
      if (i % 8 === 7) continue;
      randomFillSync(buf);
      writeSync(fd, buf, 0, Math.min(BS, size - i * BS), i * BS);
      changed++;
    }
    closeSync(fd);
    const snap2 = await scan(store, image);
    await control('/_emulator/stats/reset');
    const e2 = await exportSnapshot(store, snap2);
    const s2 = await stats();
    row(`incremental export (${changed} changed)`, e2.blocksUploaded, (e2.bytesUploaded / 1e6 / e2.seconds).toFixed(1), e2.seconds.toFixed(1), s2.operations.PutSnapshotBlock ?? 0, e2.requests);

    const other = await Store.open(join(dir, 'b'));
    await control('/_emulator/stats/reset');
    const i1 = await importSnapshot(other, e1.ebsSnapshotId, 'bench');
    const si = await stats();
    row('full import', i1.blocksFetched, (i1.bytesFetched / 1e6 / i1.seconds).toFixed(1), i1.seconds.toFixed(1), `${si.operations.GetSnapshotBlock ?? 0} Get, ${(si.operations.ListSnapshotBlocks ?? 0) + (si.operations.ListChangedBlocks ?? 0)} List`, i1.requests);
    await control('/_emulator/stats/reset');
    const i2 = await importSnapshot(other, e2.ebsSnapshotId, 'bench');
    const si2 = await stats();
    row('incremental import', i2.blocksFetched, (i2.bytesFetched / 1e6 / Math.max(i2.seconds, 0.001)).toFixed(1), i2.seconds.toFixed(1), `${si2.operations.GetSnapshotBlock ?? 0} Get, ${(si2.operations.ListSnapshotBlocks ?? 0) + (si2.operations.ListChangedBlocks ?? 0)} List`, i2.requests);
    await other.close();

    // 20 % throttling: a full export of the changed image as a new lineage (fresh store).
    mkdirSync(join(dir, 'c'));
    const third = await Store.open(join(dir, 'c'));
    const snap3 = await scan(third, image);
    await control('/_emulator/faults', { latencyMs, throttlePercent: 20, seed: 3 });
    await control('/_emulator/stats/reset');
    const e3 = await exportSnapshot(third, snap3);
    const s3 = await stats();
    row('full export, 20 % throttled', e3.blocksUploaded, (e3.bytesUploaded / 1e6 / e3.seconds).toFixed(1), e3.seconds.toFixed(1), `${s3.operations.PutSnapshotBlock ?? 0} ok, ${s3.throttled} throttled`, e3.requests);
    await third.close();
    await store.close();
  } finally {
    await emu.close();
    rmSync(dir, { recursive: true, force: true });
  }

  const head = ['run', 'blocks', 'MB/s', 'seconds', 'emulator requests', 'client requests'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ');
  console.log(`EBS bench: ${values.size} image (${blocks} blocks), ${latencyMs} ms added latency per request, ${changePct} % changed`);
  console.log(line(head));
  for (const r of rows) console.log(line(r));
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
