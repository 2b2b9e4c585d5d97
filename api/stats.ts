/**
 * Receiving-side counters, served at GET /v1/stats so tests and operators count what really
 * arrived (not what a client claims it sent).
 */
export interface ServerStats {
  /** Requests answered, every route but GET /v1/stats itself. */
  requests: number;
  /** Requests by "METHOD /route". */
  routes: Record<string, number>;
  blocksReceived: number;
  /** Uncompressed bytes of the blocks received. */
  bytesReceived: number;
  /** Blocks received that the store did not hold yet, counted when an upload completes (an aborted upload's blocks are stored but not counted here). */
  blocksStored: number;
  /** Blocks received as deltas of a block held here (counted in blocksReceived and, whole, in bytesReceived). */
  deltasReceived: number;
  blocksSent: number;
  bytesSent: number;
  nodesReceived: number;
  nodesSent: number;
  snapshotsCommitted: number;
}

export function newStats(): ServerStats {
  return {
    requests: 0,
    routes: {},
    blocksReceived: 0,
    bytesReceived: 0,
    blocksStored: 0,
    deltasReceived: 0,
    blocksSent: 0,
    bytesSent: 0,
    nodesReceived: 0,
    nodesSent: 0,
    snapshotsCommitted: 0,
  };
}
