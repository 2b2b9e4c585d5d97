/**
 * `appliance support-bundle [--to FILE]`: a .tar.gz of the appliance's state for a support
 * request (doctor, status, volumes and snapshots, peers, config with URLs cut, certificate,
 * audit log), with no token, key or data (appliance/support.ts). Read-only but for FILE.
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 82;

export function define(program: Command): void {
  program
    .command('support-bundle')
    .description('write a .tar.gz of the appliance\'s state for a support request: doctor, status, volumes, snapshots, peers, config, audit log; no token, key or data')
    .option('--to <file>', 'where to write it (default: ./tandem-support-NAME-TIME.tar.gz)')
    .action(run(async (g, cmd) => {
      const { Home } = await import('../../home.js');
      const { writeSupportBundle } = await import('../../support.js');
      const { formatBytes } = await import('../output.js');
      const { version } = await import('../main.js');
      const { dirname, resolve } = await import('node:path');
      const { existsSync } = await import('node:fs');
      const { TandemError } = await import('../../../common/errors.js');
      const home = Home.load(g.home);
      const { defaultBundleName } = await import('../forward-client.cjs');
      const to = resolve((cmd.opts() as { to?: string }).to ?? defaultBundleName(home.dir));
      if ((cmd.opts() as { to?: string }).to?.trim() === '') throw new TandemError('ERR_USAGE', '--to is empty: name the file to write (or leave --to out)');
      if (existsSync(to)) throw new TandemError('ERR_USAGE', `${to} exists; name another file with --to (nothing was written)`);
      if (!existsSync(dirname(to))) throw new TandemError('ERR_USAGE', `the directory ${dirname(to)} does not exist; name a file in an existing directory with --to (nothing was written)`);
      // Each command runs in this process (in the server when this one was forwarded to it), its output captured.
      const { runCaptured } = await import('../forward.js');
      const runOne = (args: string[]) => runCaptured(['node', 'appliance', '--home', home.dir, '--json', ...args]);
      const r = await writeSupportBundle(home, to, runOne, version());
      return {
        json: { file: to, bytes: r.bytes, files: r.files },
        text: `wrote ${to} (${formatBytes(r.bytes)}: ${r.files.join(', ')}); it holds no token, key or block data`,
      };
    }));
}
