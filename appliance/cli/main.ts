#!/usr/bin/env node
/**
 * `appliance`: the one binary of Tandem.
 *
 * Start-up must stay well under 200 ms for `--help`: this file and the command *definition*
 * files import only commander and small local modules. Each command's body lazily imports
 * what it needs (store, fastify, AWS SDK, ...) inside its action.
 *
 * To add a subcommand: create appliance/cli/commands/NAME.ts exporting `define(program)`,
 * and add it to COMMANDS below.
 */
import { Command, CommanderError } from 'commander';
import { reportError } from './output.js';

type Define = (program: Command) => void;

// One entry per command file; order is the order of `--help`.
const COMMANDS: Array<() => Promise<{ define: Define }>> = [
];

async function main(argv: string[]): Promise<void> {
  const program = new Command('appliance')
    .description('Tandem disaster-recovery appliance')
    .option('--home <dir>', 'appliance home directory (default: $TANDEM_HOME, else /var/lib/tandem)')
    .option('--json', 'print one JSON document on stdout (progress and logs go to stderr)')
    .showHelpAfterError()
    .exitOverride();
  for (const load of COMMANDS) (await load()).define(program);
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version exit 0; usage errors exit 2 (DESIGN.md).
      process.exitCode = e.exitCode === 0 ? 0 : 2;
      return;
    }
    reportError(e, argv.includes('--json'));
  }
}

await main(process.argv);
