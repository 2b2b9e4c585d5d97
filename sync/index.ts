/** Sync: the engine that copies snapshots between stores, the block stream framing, materialize. */
export { copySnapshot } from './engine.js';
export type { CopyOptions, CopyProgress, CopyResult } from './engine.js';
export { encodeFrames, decodeFrames, MAX_BLOCK_BYTES } from './framing.js';
export { throttle, TokenBucket } from './bwlimit.js';
export * as protocol from './protocol.js';
export { materialize } from './materialize.js';
export type { MaterializeOptions, MaterializeProgress, MaterializeResult, MaterializeSource } from './materialize.js';
