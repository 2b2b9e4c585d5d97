/**
 * The AWS emulator: the EBS direct API and the EC2 Query API on loopback, so the appliance's
 * AWS code runs unchanged against it (the real SDK clients pointed at it with
 * AWS_ENDPOINT_URL_EBS / AWS_ENDPOINT_URL_EC2). See emulators/README.md.
 */
import type { FastifyInstance } from 'fastify';
import { buildApp } from './app.js';
import { Faults, Stats } from './faults.js';
import { EmulatorState } from './state.js';

export interface AwsEmulatorOptions {
  /** Region served; a request signed for another region gets InvalidSignatureException/AuthFailure. Default us-east-1. */
  region?: string;
  /** Persist state (state.json + block files) in this directory; default in memory. */
  dataDir?: string;
  /** Validity of block tokens from ListSnapshotBlocks/ListChangedBlocks. Default 1 hour. */
  blockTokenTtlMs?: number;
  /** Validity of NextTokens. Default 1 hour. */
  nextTokenTtlMs?: number;
  /** Timeout of a pending snapshot when StartSnapshot gives none, in minutes (fractions allowed). Default 60, as AWS. */
  pendingTimeoutMinutes?: number;
  /** Log requests (pino). Default false. */
  logger?: boolean;
  /** How long instances stay pending / shutting-down. Default 500 ms. */
  instanceDelayMs?: number;
}

/** Default token lifetimes: long enough for a listing of a large volume to be consumed. */
export const DEFAULT_TOKEN_TTL_MS = 60 * 60 * 1000;
/** StartSnapshot's default Timeout on AWS. */
export const DEFAULT_PENDING_TIMEOUT_MINUTES = 60;
/** Instances change state after this delay: short, but long enough for clients to see `pending`. */
export const DEFAULT_INSTANCE_DELAY_MS = 500;

/** Build the emulator app without listening (tests may use app.inject()). Close the app to save state. */
export async function buildAwsEmulator(opts: AwsEmulatorOptions = {}): Promise<FastifyInstance> {
  const state = await EmulatorState.open({ region: opts.region ?? 'us-east-1', dataDir: opts.dataDir });
  const ctx = {
    state,
    faults: new Faults(),
    stats: new Stats(),
    blockTokenTtlMs: opts.blockTokenTtlMs ?? DEFAULT_TOKEN_TTL_MS,
    nextTokenTtlMs: opts.nextTokenTtlMs ?? DEFAULT_TOKEN_TTL_MS,
    pendingTimeoutMinutes: opts.pendingTimeoutMinutes ?? DEFAULT_PENDING_TIMEOUT_MINUTES,
    instanceDelayMs: opts.instanceDelayMs ?? DEFAULT_INSTANCE_DELAY_MS,
    launchFaults: new Map(),
  };
  const app = await buildApp(ctx, opts.logger ?? false);
  // Held requests (a holdAfter fault) are answered before the server waits for its connections.
  app.addHook('preClose', async () => {
    ctx.faults.configure({});
  });
  app.addHook('onClose', async () => {
    await state.flush();
  });
  return app;
}

/** Build and listen (default 127.0.0.1, port 0 = any free port). `close()` stops and saves. */
export async function startAwsEmulator(
  opts: AwsEmulatorOptions & { host?: string; port?: number } = {},
): Promise<{ url: string; close(): Promise<void>; app: FastifyInstance }> {
  const app = await buildAwsEmulator(opts);
  const host = opts.host ?? '127.0.0.1';
  await app.listen({ host, port: opts.port ?? 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : opts.port;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  return { url, app, close: () => app.close() };
}
