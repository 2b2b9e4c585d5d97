/**
 * Run the AWS emulator alone:
 *   node dist/emulators/aws/main.js --port N [--host 127.0.0.1] [--data-dir D] [--region R] [--instance-delay-ms MS] [--log]
 * Prints `listening on http://HOST:PORT` and serves until SIGTERM/SIGINT (state saved on exit).
 */
import { parseArgs } from 'node:util';
import { startAwsEmulator } from './index.js';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      host: { type: 'string', default: '127.0.0.1' },
      'data-dir': { type: 'string' },
      region: { type: 'string', default: 'us-east-1' },
      'instance-delay-ms': { type: 'string' },
      log: { type: 'boolean', default: false },
    },
  });
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`--port must be 0-65535 (got ${values.port})`);
  const delay = values['instance-delay-ms'] === undefined ? undefined : Number(values['instance-delay-ms']);
  if (delay !== undefined && !(delay >= 0)) throw new Error('--instance-delay-ms must be a number >= 0');
  const emu = await startAwsEmulator({
    port,
    host: values.host,
    dataDir: values['data-dir'],
    region: values.region,
    instanceDelayMs: delay,
    logger: values.log,
  });
  process.stdout.write(`listening on ${emu.url}\n`);
  let closing = false;
  const stop = (): void => {
    if (closing) return;
    closing = true;
    emu.close().then(
      () => process.exit(0),
      (e: unknown) => {
        process.stderr.write(`error while stopping: ${(e as Error).message}\n`);
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e: unknown) => {
  process.stderr.write(`aws emulator: ${(e as Error).message}\n`);
  process.exit(2);
});
