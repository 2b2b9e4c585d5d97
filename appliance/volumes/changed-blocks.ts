/**
 * The changed-blocks file of `appliance snapshot VOL --changed-blocks FILE` (format in
 * appliance/volumes/README.md): one entry per line, a block index `123`, a block range
 * `100-199` (inclusive), or a byte range `bytes 4096+8192` (offset+length) or
 * `bytes 4096-12287` (inclusive); `#` starts a comment; blank lines are ignored.
 *
 * The result is merged ranges (store/block-ranges.ts): memory follows the number of lines, not
 * of blocks (one line `0-16777215` is one range). Anything malformed or outside the volume is
 * ERR_CHANGED_BLOCKS_INVALID naming the line; nothing is snapshotted then.
 */
import { readFile } from 'node:fs/promises';
import { TandemError } from '../../common/errors.js';
import { mergeRanges, type BlockRanges } from '../../store/block-ranges.js';

interface Interval {
  first: number;
  last: number;
}

function invalid(source: string, line: number, why: string): TandemError {
  return new TandemError('ERR_CHANGED_BLOCKS_INVALID', `${source} line ${line}: ${why}; see appliance/volumes/README.md for the format`, {
    details: { file: source, line },
  });
}

function parseNumber(s: string, source: string, line: number): number {
  if (!/^\d+$/.test(s)) throw invalid(source, line, `"${s}" is not a non-negative integer`);
  const n = Number(s);
  if (!Number.isSafeInteger(n)) throw invalid(source, line, `${s} is too large`);
  return n;
}

/**
 * Parse the text of a changed-blocks file for a volume of `size` bytes in blocks of
 * `blockSize`. Returns the blocks listed, as merged ranges.
 */
export function parseChangedBlocks(text: string, size: number, blockSize: number, source = 'changed-blocks file'): BlockRanges {
  const blocks = Math.ceil(size / blockSize);
  const intervals: Interval[] = [];
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const lineNo = i + 1;
    const entry = lines[i]!.replace(/#.*$/, '').trim();
    if (entry === '') continue;
    let first: number;
    let last: number;
    let m: RegExpExecArray | null;
    if ((m = /^bytes\s+(\S+?)\s*\+\s*(\S+)$/i.exec(entry))) {
      const off = parseNumber(m[1]!, source, lineNo);
      const len = parseNumber(m[2]!, source, lineNo);
      if (len === 0) throw invalid(source, lineNo, 'a byte range of length 0');
      if (off + len > size) throw invalid(source, lineNo, `bytes ${off}..${off + len - 1} reach past the end of the volume (${size} bytes)`);
      first = Math.floor(off / blockSize);
      last = Math.floor((off + len - 1) / blockSize);
    } else if ((m = /^bytes\s+(\S+?)\s*-\s*(\S+)$/i.exec(entry))) {
      const a = parseNumber(m[1]!, source, lineNo);
      const b = parseNumber(m[2]!, source, lineNo);
      if (b < a) throw invalid(source, lineNo, `byte range ${a}-${b} ends before it starts`);
      if (b >= size) throw invalid(source, lineNo, `byte ${b} is past the end of the volume (${size} bytes)`);
      first = Math.floor(a / blockSize);
      last = Math.floor(b / blockSize);
    } else if ((m = /^(\S+?)\s*-\s*(\S+)$/.exec(entry))) {
      first = parseNumber(m[1]!, source, lineNo);
      last = parseNumber(m[2]!, source, lineNo);
      if (last < first) throw invalid(source, lineNo, `block range ${first}-${last} ends before it starts`);
    } else {
      first = last = parseNumber(entry, source, lineNo);
    }
    if (last >= blocks) throw invalid(source, lineNo, `block ${last} is past the last block of the volume (${blocks - 1})`);
    intervals.push({ first, last });
  }
  return mergeRanges(intervals);
}

/** Read and parse a changed-blocks file; ERR_CHANGED_BLOCKS_INVALID if it cannot be read. */
export async function readChangedBlocksFile(path: string, size: number, blockSize: number): Promise<BlockRanges> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new TandemError('ERR_CHANGED_BLOCKS_INVALID', `cannot read changed-blocks file ${path}: ${(e as Error).message}; check the path`, { cause: e, details: { file: path } });
  }
  return parseChangedBlocks(text, size, blockSize, path);
}
