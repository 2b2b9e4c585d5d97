/**
 * The self-signed certificates `init` and `tls rotate` make (common/certificate.ts): read back by
 * Node and checked by a real TLS handshake that verifies the chain and the host name, not only a
 * pin.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { once } from 'node:events';
import { createServer } from 'node:https';
import { connect } from 'node:tls';
import type { AddressInfo } from 'node:net';
import { selfSignedCertificate } from '../../common/certificate.js';

test('a self-signed certificate: its own issuer, signed by its key, with the names and the validity asked for; serials differ', () => {
  const now = new Date('2026-12-07T12:00:00Z');
  const { key, cert } = selfSignedCertificate('tandem-onprem', ['localhost', '127.0.0.1'], 3650, now);
  const x = new X509Certificate(cert);
  assert.equal(x.subject, 'CN=tandem-onprem');
  assert.equal(x.issuer, 'CN=tandem-onprem');
  assert.equal(x.subjectAltName, 'DNS:localhost, IP Address:127.0.0.1');
  assert.equal(new Date(x.validFrom).getTime(), now.getTime());
  assert.equal(new Date(x.validTo).getTime(), now.getTime() + 3650 * 86_400_000);
  assert.ok(x.verify(x.publicKey), 'signed by its own key');
  assert.ok(x.checkPrivateKey(createPrivateKey(key)), 'the key given is the certified one');
  assert.equal(x.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
  assert.ok(x.checkIssued(x), 'self-issued');
  assert.notEqual(new X509Certificate(selfSignedCertificate('tandem-onprem', ['localhost'], 1).cert).serialNumber, x.serialNumber);
  // Past 2049 the end is a GeneralizedTime; a long name takes two-byte DER lengths.
  const late = new X509Certificate(selfSignedCertificate('n'.repeat(300), ['localhost'], 3650, new Date('2049-06-01T00:00:00Z')).cert);
  assert.equal(new Date(late.validTo).toISOString(), '2059-05-30T00:00:00.000Z');
  assert.equal(late.subject, `CN=${'n'.repeat(300)}`);
});

test('a TLS client that trusts the certificate as a CA connects to localhost and to 127.0.0.1 with full verification; another name is refused', async (t) => {
  const { key, cert } = selfSignedCertificate('tandem-cloud', ['localhost', '127.0.0.1'], 1);
  const server = createServer({ key, cert }, (_req, res) => res.end('ok'));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  const port = (server.address() as AddressInfo).port;
  // servername undefined: the name checked is the host, 127.0.0.1 (an IP address is not sent as SNI).
  const handshake = (servername?: string) =>
    new Promise<void>((resolve, reject) => {
      const s = connect({ host: '127.0.0.1', port, ca: cert, ...(servername ? { servername } : {}) }, () => {
        s.end();
        resolve();
      });
      s.on('error', reject);
    });
  await handshake('localhost');
  await handshake();
  await assert.rejects(handshake('example.com'), /altnames|Hostname/i);
});
