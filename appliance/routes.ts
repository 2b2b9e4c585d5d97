/**
 * The appliance's management routes beyond the peer protocol, mounted by both `serve` and
 * `daemon` (through buildServer's `extraRoutes`), so every way of running an appliance answers
 * the same API. The daemon adds its scheduler routes (/metrics, /v1/status) on top.
 */
import type { FastifyInstance } from 'fastify';
import type { Home } from './home.js';
import type { Store } from '../store/index.js';
import { recoveryRoutes } from './recovery/routes.js';

export function applianceRoutes(home: Home, store: Store) {
  const recovery = recoveryRoutes(home, store);
  return async (app: FastifyInstance): Promise<void> => {
    await recovery(app);
  };
}
