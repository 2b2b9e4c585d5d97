#!/usr/bin/env node
/**
 * The `appliance` binary (package.json "bin"). CommonJS, so that a command a running server of
 * its home takes over (forward-client.cts) is sent and answered before Node's ES module loader
 * or any other module of ours is loaded. Any other command line runs here, through main.js.
 */
import { forwardIfServed } from './forward-client.cjs';

async function run(argv: string[]): Promise<void> {
  if (await forwardIfServed(argv)) return;
  const { runCli } = await import('./main.js');
  await runCli(argv);
}

run(process.argv).catch((e: unknown) => {
  // runCli reports every error itself; this is only reached if loading it failed.
  process.stderr.write(`error ERR_INTERNAL: ${(e as Error)?.stack ?? String(e)}\n`);
  process.exitCode = 1;
});
