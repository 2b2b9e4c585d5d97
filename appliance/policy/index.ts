/** Policies: retention selection and application, pinned snapshots. */
export { selectRetained } from './retention.js';
export type { Dated } from './retention.js';
export { applyRetention, pinnedSnapshots, snapshotPins } from './apply.js';
export type { RetentionResult, RetentionStore } from './apply.js';
