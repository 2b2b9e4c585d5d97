/** The appliance API: the fastify server and the undici client of a peer. */
export { buildServer, startServer, parseListen } from './server.js';
export type { BuildServerOptions, StartServerOptions, RunningServer, ServerContext } from './server.js';
export type { ServerStats } from './stats.js';
export { RemotePeer, normalizeFingerprint } from './client.js';
export type { RemotePeerOptions, PeerHealth, LockAnswer } from './client.js';
export { errorAnswer, toTandemError } from './errors.js';
