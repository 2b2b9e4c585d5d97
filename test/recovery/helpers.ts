/** What the recovery tests share. */
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cliJson } from '../helpers/cli.js';
import { startAwsEmulator } from '../../emulators/aws/index.js';

/**
 * config.yaml of a cloud appliance named "cloud" with one recovery plan, "app", whose root disk
 * is `volume`: a production subnet with a fixed IP, and an isolated drill subnet. The subnets and
 * security groups are those the AWS emulator starts with.
 */
export function cloudConfig(volume: string): string {
  return `appliance:
  name: cloud
recovery:
  app:
    instanceType: t3.small
    subnet: subnet-0a1b2c3d4e5f60001
    securityGroups: [sg-0a1b2c3d]
    privateIp: 10.0.1.30
    rootVolume: { volume: ${volume}, device: /dev/xvda }
    tags: { Role: app }
    drill: { subnet: subnet-0a1b2c3d4e5f60002, securityGroups: [sg-0d1e2f3a] }
`;
}

/** A cloud appliance's home ("cloud", made by `appliance init`) next to an AWS emulator, with the SDK environment that reaches it. */
export interface CloudSetup {
  readonly work: string;
  readonly home: string;
  readonly aws: Awaited<ReturnType<typeof startAwsEmulator>>;
  readonly env: Record<string, string>;
}

/** Start the emulator (`instanceDelayMs`: how long instances stay pending) and init the home in a fresh temp dir. */
export async function startCloud(prefix: string, instanceDelayMs?: number): Promise<CloudSetup> {
  const work = mkdtempSync(join(tmpdir(), prefix));
  const aws = await startAwsEmulator({ host: '127.0.0.1', port: 0, ...(instanceDelayMs !== undefined ? { instanceDelayMs } : {}) });
  const env = { AWS_REGION: 'us-east-1', AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test', AWS_ENDPOINT_URL_EBS: aws.url, AWS_ENDPOINT_URL_EC2: aws.url };
  const home = join(work, 'cloud');
  const r = await cliJson(['--home', home, 'init', '--name', 'cloud'], { env });
  assert.equal(r.code, 0, r.stderr);
  return { work, home, aws, env };
}
