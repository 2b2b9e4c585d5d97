/**
 * Extra certificate authorities (common/ca.ts). The `appliance` launcher hands
 * NODE_EXTRA_CA_CERTS over as TANDEM_EXTRA_CA_CERTS, so that Node does not parse it at every
 * start; the clients that check servers against CAs (EBS, EC2, the breach webhook) must then
 * trust a server whose certificate only that file vouches for, and a client without it must not
 * (which shows the server really needs the extra CA).
 *
 * This file sets TANDEM_EXTRA_CA_CERTS before the first client is made: node:test runs each
 * test file in its own process, and common/ca.ts builds its TLS context once per process.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { EBSClient, ListSnapshotBlocksCommand } from '@aws-sdk/client-ebs';
import { DescribeInstancesCommand } from '@aws-sdk/client-ec2';
import { EXTRA_CA_VAR, childEnv } from '../../common/ca.js';
import { ebsClient } from '../../appliance/ebs/client.js';
import { ec2Client } from '../../appliance/recovery/ec2.js';
import { BreachNotifier, type VolumeStatus } from '../../appliance/status.js';
import { tempDir } from '../helpers/cli.js';
import { selfSignedCertificate } from '../../common/certificate.js';

const dir = tempDir({ after });
let server: Server;
let url: string;
const seen: string[] = [];

before(async () => {
  const pems = selfSignedCertificate('tandem-test-private-ca', ['127.0.0.1'], 1);
  const caFile = join(dir, 'private-ca.pem');
  writeFileSync(caFile, pems.cert);
  process.env[EXTRA_CA_VAR] = caFile;
  Object.assign(process.env, { AWS_REGION: 'us-east-1', AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test' });
  server = createServer({ key: pems.key, cert: pems.cert }, (req, res) => {
    seen.push(`${req.method} ${req.url}`);
    req.resume();
    req.on('end', () => {
      if (req.url?.startsWith('/snapshots/')) {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ Blocks: [], BlockSize: 524288, VolumeSize: 1 }));
      } else if (req.url === '/' && req.method === 'POST' && req.headers['content-type']?.includes('x-www-form-urlencoded')) {
        res.writeHead(200, { 'content-type': 'text/xml' });
        res.end('<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r-1</requestId><reservationSet/></DescribeInstancesResponse>');
      } else {
        res.writeHead(204).end();
      }
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
  process.env.AWS_ENDPOINT_URL_EBS = url;
  process.env.AWS_ENDPOINT_URL_EC2 = url;
});

after(() => {
  server.closeAllConnections();
  server.close();
});

test('a client without the extra CA refuses the server', async () => {
  const plain = new EBSClient({ maxAttempts: 1, endpoint: url });
  await assert.rejects(plain.send(new ListSnapshotBlocksCommand({ SnapshotId: 'snap-0123456789abcdef0' })), /self-signed|self signed|unable to verify/i);
  plain.destroy();
  assert.deepEqual(seen, [], 'the refused client sent no request');
});

test('the EBS and EC2 clients trust a server signed by the extra CA', async () => {
  const ebs = ebsClient();
  const blocks = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: 'snap-0123456789abcdef0' }));
  assert.equal(blocks.BlockSize, 524288);
  ebs.destroy();
  const ec2 = ec2Client();
  const instances = await ec2.send(new DescribeInstancesCommand({}));
  assert.deepEqual(instances.Reservations ?? [], []);
  ec2.destroy();
  assert.deepEqual(seen, ['GET /snapshots/snap-0123456789abcdef0/blocks', 'POST /']);
});

test('the breach webhook trusts the extra CA too', async () => {
  const notifier = new BreachNotifier('onprem', 5000);
  const status = { volume: 'db', policy: 'gold', rpoState: 'BREACHED', rtoState: 'OK' } as unknown as VolumeStatus;
  const r = await notifier.check([status], `${url}/alerts`, Date.now());
  assert.deepEqual(r.errors, []);
  assert.deepEqual(r.sent.map((a) => a.event), ['rpo_breached']);
  assert.equal(seen.at(-1), 'POST /alerts');
});

test('child processes (hooks) get the extra CAs back as NODE_EXTRA_CA_CERTS', () => {
  const env = childEnv({ PATH: '/bin', [EXTRA_CA_VAR]: '/etc/ca.pem' });
  assert.deepEqual(env, { PATH: '/bin', NODE_EXTRA_CA_CERTS: '/etc/ca.pem' });
  const untouched = { PATH: '/bin' };
  assert.equal(childEnv(untouched), untouched);
});
