/**
 * `appliance doctor`: check everything the appliance needs, in one pass, each with what to do
 * next (appliance/doctor.ts). Read-only. Exit 1 when a check fails.
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 79;

export function define(program: Command): void {
  program
    .command('doctor')
    .description('check the config, disk, certificate, server, volumes, peers, replication and last verify; say what to fix')
    .action(run(async (g) => {
      const { Home } = await import('../../home.js');
      const { loadConfig } = await import('../../config/index.js');
      const { homeChecks, storeChecks, hookChecks, discoveryChecks, failure } = await import('../../doctor.js');
      const { applianceHealth } = await import('../../health.js');
      const { withHomeStore } = await import('../../ops.js');
      const { formatTable } = await import('../table.js');
      const home = Home.load(g.home);
      let config: Awaited<ReturnType<typeof loadConfig>> | null = null;
      let configError: unknown = null;
      try {
        config = await loadConfig(home);
      } catch (e) {
        configError = e;
      }
      const server = home.runningServer();
      const checks = homeChecks(home, config, configError, server, await applianceHealth(home));
      checks.push(...(await hookChecks(home)));
      if (config) checks.push(...(await discoveryChecks(config)));
      try {
        checks.push(...(await withHomeStore(g.home, (_h, store) => storeChecks(store, config))));
      } catch (e) {
        checks.push({ check: 'store', status: 'fail', detail: failure(e), fix: 'the message says what to do; the volume, peer and verify checks need the store' });
      }
      const failed = checks.filter((c) => c.status === 'fail').length;
      const warned = checks.filter((c) => c.status === 'warn').length;
      const fixes = checks.filter((c) => c.fix !== undefined).map((c) => `${c.status === 'fail' ? 'FAIL' : 'warn'} ${c.check}: ${c.fix}`);
      const text = [
        formatTable(['STATUS', 'CHECK', 'DETAIL'], checks.map((c) => [c.status === 'ok' ? 'ok' : c.status === 'warn' ? 'warn' : 'FAIL', c.check, c.detail])),
        ...(fixes.length > 0 ? ['', ...fixes] : []),
        '',
        failed > 0 ? `${failed} check(s) failed, ${warned} to look at` : warned > 0 ? `nothing failed; ${warned} to look at` : 'all good',
      ].join('\n');
      return { json: { ok: failed === 0, failed, warnings: warned, checks }, text, exitCode: failed > 0 ? 1 : 0 };
    }));
}
