/**
 * Sizes and rates as operators write them (config `bwlimit`, `--block-size`, `--bwlimit`):
 * "512KiB", "4MiB", "1G", or a byte count. Pure; no I/O.
 */
import { TandemError } from '../../common/errors.js';

/** Parse a size such as 512KiB, 4MiB, 1048576 into bytes. Throws ERR_USAGE for anything else. */
export function parseSize(s: string): number {
  const m = /^(\d+)\s*(B|KiB|MiB|GiB|TiB|K|M|G|T)?$/i.exec(String(s).trim());
  if (!m) throw new TandemError('ERR_USAGE', `not a size: "${s}"; write e.g. 512KiB, 4MiB or a byte count`);
  const unit = (m[2] ?? 'B').toUpperCase().replace('IB', '');
  const mult: Record<string, number> = { B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };
  return Number(m[1]) * mult[unit]!;
}
