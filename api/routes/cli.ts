/**
 * POST /v1/cli: run a CLI command forwarded by `appliance` on the same home while this server
 * holds the store (appliance/cli/forward.ts). Authenticated like every route.
 */
import type { FastifyInstance } from 'fastify';
import { CliBody } from '../schemas.js';

export function cliRoutes(app: FastifyInstance): void {
  app.post('/v1/cli', { schema: { body: CliBody, summary: 'execute a forwarded CLI command line; answers {exitCode, stdout, stderr}; a CLI that goes away before the answer (Ctrl-C) stops the command at its next safe point' } }, async (req, reply) => {
    const { executeForwarded } = await import('../../appliance/cli/forward.js');
    const { interrupted } = await import('../../appliance/cli/output.js');
    // The connection closed before the answer: the CLI was stopped (Ctrl-C), and so is the command.
    const stop = new AbortController();
    const gone = () => void (reply.raw.writableFinished || stop.abort(interrupted('Ctrl-C in the CLI that sent it (its connection closed)')));
    reply.raw.once('close', gone);
    try {
      return await executeForwarded(req.body as { argv: string[]; user?: string }, stop.signal);
    } finally {
      reply.raw.off('close', gone);
    }
  });
}
