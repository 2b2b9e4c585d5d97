/**
 * `appliance config check [--file F]`: validate HOME/config.yaml (or another file) and print a
 * summary of what it configures. Exit 1 with `config.yaml:LINE: key: problem` lines otherwise.
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 15;

export function define(program: Command): void {
  const config = program.command('config').description('inspect the configuration file (HOME/config.yaml)');
  config
    .command('check')
    .description('validate the configuration: errors name the file, line and key')
    .option('--file <path>', 'check this file instead of HOME/config.yaml')
    .action(run(async (g, cmd) => {
      const { loadConfig, loadConfigFile, formatDuration } = await import('../../config/index.js');
      const { homePaths } = await import('../../home.js');
      const { resolve } = await import('node:path');
      const file = (cmd.opts() as { file?: string }).file;
      const cfg = file !== undefined ? await loadConfigFile(resolve(file)) : await loadConfig(resolve(g.home));
      const policies = Object.values(cfg.policies);
      const { replicationRate, hasSchedule } = await import('../../config/bwlimit.js');
      const { formatBytes } = await import('../output.js');
      const now = new Date();
      const capNow = cfg.replication && (cfg.replication.bwlimit !== undefined || hasSchedule(cfg.replication)) ? replicationRate(cfg.replication, now) : null;
      const lines = [
        `${file ?? homePaths(resolve(g.home)).config}: valid`,
        `  appliance ${cfg.appliance.name}`,
        ...policies.map((p) => `  policy ${p.name}: rpo ${formatDuration(p.rpoMs)}${p.rtoMs !== null ? `, rto ${formatDuration(p.rtoMs)}` : ''}${p.retention ? `, retention ${Object.entries(p.retention).map(([k, v]) => `${k} ${v}`).join(' ')}` : ', keep all'}${p.export ? `, export ${p.export}` : ''}`),
        `  ${cfg.assign.length} assign rule(s), ${Object.keys(cfg.groups).length} group(s), ${Object.keys(cfg.recovery).length} recovery plan(s)`,
        `  replication: ${cfg.replication ? `to peer ${cfg.replication.peer}${capNow === null ? '' : `, ${capNow === 0 ? 'no cap now' : `capped now at ${formatBytes(capNow)}/s`}${hasSchedule(cfg.replication) ? ` (schedule of ${cfg.replication.schedule!.length} window(s), local time ${now.toTimeString().slice(0, 5)} ${['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'][now.getDay()]})` : ''}`}` : 'none (snapshots stay local)'}`,
      ];
      return {
        json: { file: cfg.file, valid: true, policies: cfg.policies, assign: cfg.assign, groups: cfg.groups, replication: cfg.replication ? { ...cfg.replication, bytesPerSecondNow: capNow ?? 0 } : null, recoveryPlans: Object.keys(cfg.recovery) },
        text: lines.join('\n'),
      };
    }));
}
