/**
 * SHA-256 checksums as the EBS direct APIs want them.
 *
 * - Per block: base64 of SHA-256 of the 524288 bytes sent (PutSnapshotBlock `Checksum`) or
 *   received (GetSnapshotBlock `Checksum`, checked before a block enters the store).
 * - Per snapshot, LINEAR aggregation (CompleteSnapshot `Checksum`): SHA-256 over the
 *   concatenated raw 32-byte digests of every block written to the snapshot, in ascending
 *   block index order, base64-encoded.
 */
import { createHash } from 'node:crypto';

export function sha256(data: Buffer | Uint8Array): Buffer {
  return createHash('sha256').update(data).digest();
}

export function sha256Base64(data: Buffer | Uint8Array): string {
  return sha256(data).toString('base64');
}

/**
 * The LINEAR aggregate checksum, fed block digests in ascending block index order.
 * Memory is constant whatever the number of blocks. `add` refuses an index that does not
 * ascend, because AWS would reject the aggregate at CompleteSnapshot anyway, much later.
 */
export class LinearChecksum {
  private readonly hash = createHash('sha256');
  private last = -1;
  private n = 0;

  add(blockIndex: number, digest: Buffer): void {
    if (blockIndex <= this.last) throw new Error(`LINEAR checksum needs ascending block indices (${blockIndex} after ${this.last})`);
    if (digest.length !== 32) throw new Error(`a SHA-256 digest has 32 bytes, not ${digest.length}`);
    this.last = blockIndex;
    this.n++;
    this.hash.update(digest);
  }

  /** Number of blocks added: CompleteSnapshot's ChangedBlocksCount. */
  get count(): number {
    return this.n;
  }

  /** base64 of the aggregate; call once. */
  digest(): string {
    return this.hash.digest('base64');
  }
}
