#!/usr/bin/env node
/**
 * `appliance`: the one binary of Tandem.
 *
 * Start-up must stay well under 200 ms for `--help`: this file and the command *definition*
 * files import only commander and small local modules. Each command's body lazily imports
 * what it needs (store, fastify, AWS SDK, ...) inside its action.
 *
 * To add a subcommand: create appliance/cli/commands/NAME.ts exporting `define(program)` and,
 * optionally, `order` (a number: lower comes first in `--help`; default 100). Every module in
 * that folder is a command: there is no list to keep in sync.
 */
import { Command, CommanderError } from 'commander';
import { readdirSync, realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { currentIO, reportError } from './output.js';

interface CommandModule {
  define(program: Command): void;
  order?: number;
}

const COMMANDS_DIR = new URL('./commands/', import.meta.url);

/** Every command module, in `--help` order (by `order`, then by file name). */
async function loadCommands(): Promise<CommandModule[]> {
  // .js when compiled (dist/); .ts when run from source through tsx.
  const files = readdirSync(COMMANDS_DIR).filter((f) => /\.(js|ts)$/.test(f) && !f.endsWith('.d.ts')).sort();
  const mods = await Promise.all(files.map((f) => import(new URL(f, COMMANDS_DIR).href) as Promise<CommandModule>));
  return mods.sort((a, b) => (a.order ?? 100) - (b.order ?? 100));
}

/**
 * Run one command line (argv as process.argv: [node, script, ...args]) with the current
 * command IO (output.ts). Used by the binary below and by a running server that executes a
 * command forwarded from a CLI on the same home (appliance/cli/forward.ts).
 */
export async function runCli(argv: string[]): Promise<void> {
  const io = currentIO();
  const program = new Command('appliance')
    .description('Tandem disaster-recovery appliance')
    .option('--home <dir>', 'appliance home directory (default: $TANDEM_HOME, else /var/lib/tandem)')
    .option('--json', 'print one JSON document on stdout (progress and logs go to stderr)')
    .configureOutput({ writeOut: (s) => io.out(s), writeErr: (s) => io.err(s) })
    .showHelpAfterError()
    .exitOverride();
  for (const mod of await loadCommands()) mod.define(program);
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version exit 0; usage errors exit 2 (DESIGN.md).
      io.setExit(e.exitCode === 0 ? 0 : 2);
      return;
    }
    reportError(e, argv.includes('--json'));
  }
}

async function main(argv: string[]): Promise<void> {
  // When a server or daemon of this home is running it holds the store: hand the command to it.
  const { forwardIfServed } = await import('./forward.js');
  if (await forwardIfServed(argv)) return;
  await runCli(argv);
}

const entry = process.argv[1];
if (entry !== undefined && realpathSync(entry) === fileURLToPath(import.meta.url)) await main(process.argv);
