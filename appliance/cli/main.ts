/**
 * `appliance`: the command line of Tandem. The binary is bin.cts, which hands a command to a
 * running server of its home before loading this, and otherwise calls {@link runCli}.
 *
 * Start-up must stay well under 200 ms for `--help`: this file and the command *definition*
 * files import only commander and small local modules. Each command's body lazily imports
 * what it needs (store, fastify, AWS SDK, ...) inside its action. Commander itself (~12 ms) is
 * loaded only once the command is known to run here: a command forwarded to a running server
 * of the home (forward-client.cts) needs none of it.
 *
 * The package compiles to CommonJS (package.json "type", tsconfig.json "module"), and each lazy
 * `await import(...)` becomes a require when first reached. Node 20 loads a CommonJS module for
 * less than an ES module: no asynchronous module graph, no URL resolution, no lexing of every
 * CommonJS package an ES module imports to find its named exports. A no-op sync from a cold CLI
 * took 142-149 ms against 169-170 ms as ES modules, `--help` 53 against 74 ms (alternated,
 * 20 runs each).
 *
 * To add a subcommand: create appliance/cli/commands/NAME.ts exporting `define(program)` and,
 * optionally, `order` (a number: lower comes first in `--help`; default 100). Every module in
 * that folder is a command: there is no list to keep in sync.
 */
import type { Command } from 'commander';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { currentIO, reportError } from './output.js';

interface CommandModule {
  define(program: Command): void;
  order?: number;
}

const COMMANDS_DIR = join(__dirname, 'commands');

/** The package's version: package.json is two levels up from the sources, three from dist/. */
export function version(): string {
  for (const up of ['../../package.json', '../../../package.json']) {
    try {
      const p = JSON.parse(readFileSync(join(__dirname, up), 'utf8')) as { name?: string; version?: string };
      if (p.name === 'tandem' && typeof p.version === 'string') return p.version;
    } catch {
      // not at this depth
    }
  }
  return 'unknown';
}

/** Command module files: .js when compiled (dist/); .ts when run from source through tsx. */
function commandFiles(): string[] {
  return readdirSync(COMMANDS_DIR).filter((f) => /\.(js|ts)$/.test(f) && !f.endsWith('.d.ts')).sort();
}

function importCommand(file: string): Promise<CommandModule> {
  return import(join(COMMANDS_DIR, file)) as Promise<CommandModule>;
}

/** The command word of a command line: its first argument that is not a global option. */
function commandWord(argv: readonly string[]): string | undefined {
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--home') i++;
    else if (!a.startsWith('-')) return a;
  }
  return undefined;
}

/**
 * Define the commands on `program`. A command line whose command has a module of its own name
 * loads that module only: loading all of them costs ~40 ms of every start, and a sync or
 * snapshot needs one. Otherwise (`--help`, `help`, a command defined in another module such as
 * `drill`, a typo commander suggests a fix for) every module is loaded, in `--help` order (by
 * `order`, then by file name).
 */
async function defineCommands(program: Command, argv: readonly string[]): Promise<void> {
  const { Command } = await import('commander');
  const files = commandFiles();
  const word = commandWord(argv);
  const own = word === undefined ? undefined : files.find((f) => f.replace(/\.(js|ts)$/, '') === word);
  if (own !== undefined) {
    const mod = await importCommand(own);
    const probe = new Command();
    mod.define(probe);
    if (probe.commands.some((c) => c.name() === word)) return mod.define(program);
  }
  const mods = await Promise.all(files.map(importCommand));
  for (const mod of mods.sort((a, b) => (a.order ?? 100) - (b.order ?? 100))) mod.define(program);
}

/**
 * `--opt VALUE` as `--opt=VALUE` when VALUE starts with a dash and --opt takes a value. The root
 * program parses its own flags wherever they are, not knowing a subcommand's options: a token
 * such as "-Vx3..." (API tokens are base64url, 1 in 64 starts with "-") would be read as -V and
 * print the version, and `peer add` would exit 0 having done nothing.
 */
function glueDashValues(program: Command, argv: string[]): string[] {
  const takesValue = new Set<string>();
  const walk = (c: Command) => {
    for (const o of c.options) if (o.required && o.long) takesValue.add(o.long); // an optional value is not taken from a dash word
    c.commands.forEach(walk);
  };
  walk(program);
  const out = argv.slice(0, 2);
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    if (a === '--') {
      out.push(...argv.slice(i));
      break;
    }
    if (takesValue.has(a) && v !== undefined && v.startsWith('-') && v.length > 1) {
      out.push(`${a}=${v}`);
      i++;
    } else out.push(a);
  }
  return out;
}

/**
 * Run one command line (argv as process.argv: [node, script, ...args]) with the current
 * command IO (output.ts). Used by the binary below and by a running server that executes a
 * command forwarded from a CLI on the same home (appliance/cli/forward.ts).
 */
export async function runCli(argv: string[]): Promise<void> {
  const io = currentIO();
  const { Command, CommanderError } = await import('commander');
  const program = new Command('appliance')
    .description('Tandem disaster-recovery appliance')
    .option('--home <dir>', 'appliance home directory (default: $TANDEM_HOME, else /var/lib/tandem)')
    .option('--json', 'print one JSON document on stdout (progress and logs go to stderr)')
    .version(version(), '-V, --version', 'print the version of Tandem')
    .configureOutput({ writeOut: (s) => io.out(s), writeErr: (s) => io.err(s) })
    .showHelpAfterError()
    .exitOverride();
  await defineCommands(program, argv);
  try {
    await program.parseAsync(glueDashValues(program, argv));
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version exit 0; usage errors exit 2 (DESIGN.md). commander printed the
      // error and the help on stderr; with --json, stdout gets the error document every command's
      // failure prints there.
      if (e.exitCode !== 0 && argv.includes('--json')) {
        const message = e.message.replace(/^error: /, '');
        io.out(JSON.stringify({ error: { code: 'ERR_USAGE', message: `${message}; see \`appliance --help\``, details: { commander: e.code } } }, null, 2) + '\n');
      }
      io.setExit(e.exitCode === 0 ? 0 : 2);
      return;
    }
    reportError(e, argv.includes('--json'));
  }
}
