/**
 * The EBS client: settings only from the SDK's standard chain (AWS_REGION, credentials,
 * AWS_ENDPOINT_URL_EBS for another endpoint such as the emulator). Nothing here reads
 * settings of its own, so the same binary talks to AWS and to the local emulator.
 */
import { EBSClient } from '@aws-sdk/client-ebs';
import { awsClientOptions } from '../../common/ca.js';
import { TandemError } from '../../common/errors.js';
import { ebsError } from './errors.js';

/**
 * A client with the SDK's retries off: our retry loop (retry.ts) retries with jitter and feeds
 * throttles to the adaptive concurrency limit, which the SDK's retry strategy cannot do.
 * A missing region or credentials surfaces at the first call; {@link checkClient} finds it early.
 * Extra CAs (NODE_EXTRA_CA_CERTS) are trusted through common/ca.ts.
 */
export function ebsClient(): EBSClient {
  return new EBSClient({ maxAttempts: 1, ...awsClientOptions() });
}

/**
 * Resolve region and credentials now, so a misconfigured appliance fails before any work with
 * ERR_AWS_CREDENTIALS and advice, instead of in the middle of a transfer.
 */
export async function checkClient(client: EBSClient): Promise<void> {
  let region: string | undefined;
  try {
    region = await client.config.region();
  } catch (e) {
    throw noRegion(e);
  }
  if (!region) throw noRegion(undefined);
  try {
    const creds = await client.config.credentials();
    if (!creds?.accessKeyId) throw new Error('Could not load credentials from any providers');
  } catch (e) {
    const err = ebsError(e, 'loading AWS credentials');
    if (err.code === 'ERR_AWS_CREDENTIALS') throw err;
    throw new TandemError('ERR_AWS_CREDENTIALS', `no AWS credentials found (${(e as Error).message}); provide them through the standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role`, { cause: e });
  }
}

function noRegion(cause: unknown): TandemError {
  return new TandemError('ERR_AWS_CREDENTIALS', 'no AWS region is configured; set AWS_REGION (or a region in the AWS profile) to the region of the EBS snapshots', { cause });
}
