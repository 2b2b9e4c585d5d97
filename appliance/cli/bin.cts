#!/usr/bin/env node
/**
 * The `appliance` binary (package.json "bin"). A command a running server of its home takes over
 * (forward-client.cts) is sent and answered before any other module of ours is loaded. Any other
 * command line runs here, through main.js.
 */
import { writeSync } from 'node:fs';
import { forwardIfServed } from './forward-client.cjs';

/**
 * A reader that leaves early (`appliance snapshots VOL --json | head`) closes its pipe. The rest
 * of the output is then not wanted, but the command still finishes what it does (a sync or a
 * snapshot is not cut short by a progress line that found nobody reading) and exits with its
 * own code. Node would otherwise end the process with an unhandled EPIPE and a stack trace.
 */
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code !== 'EPIPE' && e.code !== 'ERR_STREAM_DESTROYED') throw e;
  });
}

async function run(argv: string[]): Promise<void> {
  if (await forwardIfServed(argv)) return;
  const { runCli } = await import('./main.js');
  await runCli(argv);
}

/**
 * Node ends a process whose event loop has nothing left to wait for, even while a promise of
 * the command is still pending: an operation that lost its callback would end the command with
 * exit code 0 and no output, as if it had succeeded. Such an end is reported as the failure it is.
 */
let finished = false;
process.on('exit', () => {
  if (finished || (process.exitCode !== undefined && process.exitCode !== 0)) return;
  const message = 'the command stopped before it finished (an operation it waited for was dropped); nothing after that point was done. Run it again; if this repeats, report it with the command line';
  process.exitCode = 1;
  try {
    if (process.argv.includes('--json')) writeSync(1, JSON.stringify({ error: { code: 'ERR_INTERNAL', message, details: {} } }, null, 2) + '\n');
    writeSync(2, `error ERR_INTERNAL: ${message}\n`);
  } catch {
    // stdout or stderr is gone (a closed pipe): the exit code still says it.
  }
});

run(process.argv).then(
  () => void (finished = true),
  (e: unknown) => {
    finished = true;
    // runCli reports every error itself; this is only reached if loading it failed.
    process.stderr.write(`error ERR_INTERNAL: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exitCode = 1;
  },
);
