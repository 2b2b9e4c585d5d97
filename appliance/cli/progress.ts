/**
 * Progress bars for long CLI operations (snapshot, restore, sync, EBS transfers).
 *
 * Drawn on stderr with cli-progress, with rate and ETA, only when `interactive(g)` (a TTY and
 * no --json); otherwise every call is a no-op, so callers never branch on it. cli-progress is
 * loaded only when a bar is really drawn, so importing this module costs nothing.
 *
 * ```ts
 * const bar = startProgress(g, { total: bytes, unit: 'bytes', label: 'snapshot' });
 * bar.update(done, { stored: 12 });
 * bar.stop();
 * ```
 */
import { interactive, formatBytes, type GlobalOptions } from './output.js';

export interface ProgressOptions {
  /** The value at completion. */
  readonly total: number;
  /** How values are shown: byte counts (KiB, MiB...) or plain counts of blocks. */
  readonly unit: 'bytes' | 'blocks';
  /** A word in front of the bar. */
  readonly label?: string;
}

export interface Progress {
  /** Set the current value; `extra` is shown after the bar as `key=value` pairs. */
  update(done: number, extra?: Readonly<Record<string, string | number>>): void;
  /** Change the value at completion (work found along the way). */
  setTotal(total: number): void;
  /** Finish the bar (idempotent). */
  stop(): void;
}

const SILENT: Progress = { update() {}, setTotal() {}, stop() {} };

/** Redraws per second: smooth enough to read, cheap enough not to slow a scan. */
const FPS = 5;
/** ETA is averaged over this many updates so it does not jump with every block. */
const ETA_BUFFER = 50;

export function startProgress(g: GlobalOptions, opts: ProgressOptions): Progress {
  if (!interactive(g) || opts.total <= 0) return SILENT;
  const cliProgress = require('cli-progress') as typeof import('cli-progress');
  const fmt = (n: number) => (opts.unit === 'bytes' ? formatBytes(n) : String(Math.round(n)));
  const bar = new cliProgress.SingleBar(
    {
      format: `${opts.label ?? ''} [{bar}] {percentage}% | {doneF}/{totalF} | {rate}/s | ETA {eta_formatted}{extra}`.trimStart(),
      fps: FPS,
      etaBuffer: ETA_BUFFER,
      hideCursor: true,
      clearOnComplete: false,
      stream: process.stderr,
    },
    cliProgress.Presets.shades_classic,
  );
  const started = Date.now();
  bar.start(opts.total, 0, { doneF: fmt(0), totalF: fmt(opts.total), rate: fmt(0), extra: '' });
  let stopped = false;
  let total = opts.total;
  return {
    update(done, extra) {
      if (stopped) return;
      const secs = Math.max(0.001, (Date.now() - started) / 1000);
      const tail = extra ? ' | ' + Object.entries(extra).map(([k, v]) => `${k}=${v}`).join(' ') : '';
      bar.update(done, { doneF: fmt(done), totalF: fmt(total), rate: fmt(done / secs), extra: tail });
    },
    setTotal(t) {
      if (stopped || t === total || t <= 0) return;
      total = t;
      bar.setTotal(t);
    },
    stop() {
      if (stopped) return;
      stopped = true;
      bar.stop();
    },
  };
}
