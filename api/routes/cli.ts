/**
 * POST /v1/cli: run a CLI command forwarded by `appliance` on the same home while this server
 * holds the store (appliance/cli/forward.ts). Authenticated like every route.
 */
import type { FastifyInstance } from 'fastify';
import { CliBody } from '../schemas.js';

export function cliRoutes(app: FastifyInstance): void {
  app.post('/v1/cli', { schema: { body: CliBody, summary: 'execute a forwarded CLI command line; answers {exitCode, stdout, stderr}' } }, async (req) => {
    const { executeForwarded } = await import('../../appliance/cli/forward.js');
    return executeForwarded(req.body as { argv: string[]; user?: string });
  });
}
