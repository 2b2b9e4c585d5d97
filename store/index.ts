/**
 * The block store's public surface (see store/README.md for the on-disk format).
 */
export * from './types.js';
export { diffBlock, applyPatches, composeDeltas, mayBeSparse } from './delta.js';
export { hashBlock, isZeroBlock, ZERO_HASH, HASH_LENGTH, toHex, parseHex } from './hash.js';
export { newSnapshotId, snapshotIdTime, isValidVolumeName, isValidSnapshotId } from './ids.js';
export { mergeRanges, rangesOf, indicesIn, type BlockRanges } from './block-ranges.js';
export { FANOUT, treeHeight, blockCount, nodeHash, makeNode } from './tree.js';
export type { BlockChange } from './tree.js';
export { Store, DEFAULT_BLOCK_SIZE, RESERVE_BYTES } from './store.js';
export type { BuildSnapshotOptions, PutBlocksOptions } from './store.js';
export { ByteBudget } from './budget.js';
export type { VerifyOptions } from './verify.js';
