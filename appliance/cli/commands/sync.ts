/**
 * `appliance sync VOL --peer NAME [--reverse] [--apply [--force] [--no-keep]] [--dry-run] [--changed-blocks FILE] [--bwlimit RATE]`:
 * push a fresh snapshot of VOL to a peer, or pull the peer's latest (--reverse) and write it onto
 * the local volume (--apply, failback). See appliance/replicate.ts and sync/README.md.
 */
import type { Command } from 'commander';
import { formatBytes, parseSize, run } from '../output.js';
import type { Rate } from '../../../sync/bwlimit.js';

export const order = 80;

export function define(program: Command): void {
  program
    .command('sync <volume>')
    .description("push a fresh snapshot of VOL to a peer, sending only the blocks it lacks; --reverse pulls the peer's latest, --apply writes it onto the local volume (failback)")
    .requiredOption('--peer <name>', 'the peer (see `appliance peer list`)')
    .option('--reverse', "pull the peer's latest snapshot of VOL instead of pushing")
    .option('--apply', 'with --reverse: write the pulled snapshot onto the local volume, then verify it by rescanning')
    .option('--force', 'with --reverse --apply: write onto a local volume of another size (an image is resized to the snapshot; a larger device gets it on its first bytes)')
    .option('--no-keep', 'with --reverse --apply: do not snapshot what the volume holds before writing over it')
    .option('--dry-run', 'report what would be sent; change nothing on the receiving side')
    .option('--changed-blocks <file>', 'read only the blocks listed in FILE for the fresh snapshot (no full rescan)')
    .option('--bwlimit <rate>', "cap block traffic at RATE bytes per second, e.g. 10MiB; 0: no cap (default: config.yaml's replication cap when NAME is replication.peer)")
    .action(run(async (g, cmd, args) => {
      const volume = args[0] as string;
      const o = cmd.opts<{ peer: string; reverse?: boolean; apply?: boolean; force?: boolean; keep?: boolean; dryRun?: boolean; changedBlocks?: string; bwlimit?: string }>();
      // --bwlimit: this sync's cap (0: none); absent: the cap config.yaml gives the replication peer.
      const optionCap = o.bwlimit === undefined ? undefined : parseSize(o.bwlimit);
      const { commandSignal, currentIO, ownCommandLine } = await import('../output.js');
      // A push that rescans the volume, or a failback that rescans it before writing: a one-shot
      // CLI starts the scan's hash workers now (store/scan.ts prestartScan).
      if ((o.reverse === true ? o.apply === true : o.changedBlocks === undefined) && ownCommandLine()) (await import('../../../store/scan.js')).prestartScan();
      const { Home } = await import('../../home.js');
      const { trace } = await import('../../../sync/trace.js');
      trace('sync command: home module loaded');
      // The engine, the peer client (undici) and the progress bar load while the store opens
      // (LevelDB opens on the I/O threads): module compile time overlaps the open.
      const modules = Promise.all([import('../../replicate.js'), import('../progress.js')]);
      modules.catch(() => undefined);
      const home = Home.load(g.home);
      // The volume lock first: a second sync of the volume gets ERR_VOLUME_LOCKED, not ERR_STORE_BUSY.
      // The op name is replicate.ts's syncLockOp (inlined: replicate.js is still loading).
      const release = home.lockVolume(volume, o.reverse === true ? 'sync --reverse' : 'sync');
      trace('home loaded, volume locked');
      const store = await home.openStore().catch((e: unknown) => {
        release();
        throw e;
      });
      trace('store open');
      let syncVolumeLocked: typeof import('../../replicate.js').syncVolumeLocked;
      let configuredCap: typeof import('../../replicate.js').configuredCap;
      let describeCap: typeof import('../../replicate.js').describeCap;
      let startProgress: typeof import('../progress.js').startProgress;
      try {
        [{ syncVolumeLocked, configuredCap, describeCap }, { startProgress }] = await modules;
      } catch (e) {
        await store.close();
        release();
        throw e;
      }
      trace('sync modules loaded');
      let bwlimit: Rate = optionCap ?? 0;
      if (optionCap === undefined && o.dryRun !== true) {
        try {
          const cap = await configuredCap(home, o.peer);
          if (cap) {
            bwlimit = cap.rate;
            currentIO().err(`note: ${describeCap(cap, formatBytes)}\n`);
          }
        } catch (e) {
          await store.close();
          release();
          throw e;
        }
      }
      let bar: ReturnType<typeof startProgress> | null = null;
      let phase = '';
      try {
        const signal = commandSignal();
        const r = await syncVolumeLocked(home, store, volume, o.peer, {
          ...(signal ? { signal } : {}),
          reverse: o.reverse === true,
          apply: o.apply === true,
          ...(o.force === true ? { force: true } : {}),
          ...(o.keep === false ? { keep: false } : {}),
          dryRun: o.dryRun === true,
          ...(o.changedBlocks !== undefined ? { changedBlocksFile: o.changedBlocks } : {}),
          ...(bwlimit !== 0 ? { bwlimit } : {}),
          onNotice: (m) => currentIO().err(`note: ${m}\n`),
          onProgress: (p) => {
            if (p.phase !== phase || bar === null) {
              bar?.stop();
              phase = p.phase;
              bar = startProgress(g, { total: Math.max(1, p.total), unit: 'bytes', label: p.phase });
            }
            bar.setTotal(p.total); // early sending's tail, then the engine's blocks
            bar.update(p.done, { blocks: p.blocks });
          },
        });
        (bar as ReturnType<typeof startProgress> | null)?.stop();
        const rate = r.seconds > 0 ? r.bytesSent / r.seconds : 0;
        const dir = r.direction === 'push' ? `${volume} -> ${r.peer}` : `${r.peer} -> ${volume}`;
        // A dry run sends no block: its time says nothing of a transfer's, so instead of a rate it
        // gives how long the blocks would take at this volume's measured replication rate (the
        // daemon's pushes, appliance/scheduler/deadline.ts), or --bwlimit's if lower.
        const estimate = r.dryRun ? await dryRunEstimate(store, volume, r.bytesSent, typeof optionCap === 'number' && optionCap > 0 ? optionCap : null) : null;
        const lines = [
          r.dryRun
            ? `dry run ${dir}: would send ${r.blocksSent} blocks (${formatBytes(r.bytesSent)} at most) and ${r.nodesSent} nodes of snapshot ${r.snapshot}`
            : r.upToDate
              ? `${dir}: up to date (snapshot ${r.snapshot}, root ${r.root.slice(0, 16)}...)`
              : `${dir}: sent ${r.blocksSent} blocks (${formatBytes(r.bytesSent)}, ${formatBytes(r.wireBytes)} on the wire) and ${r.nodesSent} nodes of snapshot ${r.snapshot}`,
          estimate
            ? `${r.requests} requests in ${r.seconds.toFixed(2)} s, no block sent; the blocks would take about ${estimate.duration} at ${formatBytes(estimate.bytesPerSec)}/s (${estimate.basis})`
            : `${r.requests} requests in ${r.seconds.toFixed(2)} s (${formatBytes(rate)}/s)`,
        ];
        if (r.applied) {
          lines.push(`applied onto the local volume: ${r.applied.blocksCompared} blocks compared, ${r.applied.blocksWritten} written, ${r.applied.blocksZeroed} zeroed (${formatBytes(r.applied.bytesWritten)}); verified: the volume's tree equals the snapshot`);
          if (r.applied.keptAs) lines.push(`what the volume held before is kept as snapshot ${volume}@${r.applied.keptAs} (\`appliance restore ${volume}@${r.applied.keptAs} --to PATH\`)`);
        }
        return { json: estimate ? { ...r, estimate } : r, text: lines.join('\n') };
      } finally {
        (bar as ReturnType<typeof startProgress> | null)?.stop();
        await store.close();
        release();
        trace('store closed');
      }
    }));
}

/** How long `bytes` would take to send: at the volume's measured replication rate, or `cap` if lower; the default rate until one is measured. */
async function dryRunEstimate(store: import('../../../store/index.js').Store, volume: string, bytes: number, cap: number | null): Promise<{ seconds: number; duration: string; bytesPerSec: number; basis: string }> {
  // Loaded here, for dry runs only: a sync's path loads no config module (config/index.js, with
  // its YAML parser and schemas, took a cold no-op sync from 151 to 250 ms).
  const { readRates } = await import('../../scheduler/state.js');
  const { formatDuration } = await import('../../config/duration.js');
  const rates = await readRates(store, volume);
  const measured = rates.samples > 0;
  const capped = cap !== null && cap < rates.syncBytesPerSec;
  const bytesPerSec = capped ? cap : rates.syncBytesPerSec;
  const basis = capped ? '--bwlimit' : measured ? `the rate measured over ${rates.samples} replication(s) of ${volume}, the last ${rates.updated}` : 'a default rate: no replication of this volume has been measured yet';
  const seconds = bytes / bytesPerSec;
  return { seconds, duration: seconds < 1 ? 'under a second' : formatDuration(seconds * 1000), bytesPerSec, basis };
}

