/** Unit and property tests of the EBS transfer's building blocks: limiter, backoff, checksums, error mapping. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { AdaptiveLimiter } from '../../appliance/ebs/limiter.js';
import { backoffMs, BASE_DELAY_MS, MAX_DELAY_MS } from '../../appliance/ebs/retry.js';
import { LinearChecksum, sha256 } from '../../appliance/ebs/checksum.js';
import { classify, ebsError, isExpiredToken } from '../../appliance/ebs/errors.js';

test('limiter starts at 64, halves on a throttle, grows by one per 8 successes, stays within [1, 256]', async () => {
  const l = new AdaptiveLimiter();
  assert.equal(l.limit, 64);
  await l.acquire();
  l.release('throttled');
  assert.equal(l.limit, 32);
  for (let i = 0; i < 8; i++) {
    await l.acquire();
    l.release('ok');
  }
  assert.equal(l.limit, 33);
  for (let i = 0; i < 20; i++) {
    await l.acquire();
    l.release('throttled');
  }
  assert.equal(l.limit, 1);
  for (let i = 0; i < 8 * 400; i++) {
    await l.acquire();
    l.release('ok');
  }
  assert.equal(l.limit, 256);
});

test('limiter never lets more than its limit run, under any sequence of outcomes (property)', async () => {
  await fc.assert(fc.asyncProperty(
    fc.array(fc.record({ outcome: fc.constantFrom<'ok' | 'throttled' | 'error'>('ok', 'throttled', 'error'), ticks: fc.nat(3) }), { minLength: 1, maxLength: 200 }),
    fc.integer({ min: 1, max: 16 }),
    async (tasks, initial) => {
      const l = new AdaptiveLimiter({ initial, max: 16, increaseEvery: 2 });
      let running = 0;
      let violations = 0;
      await Promise.all(tasks.map(async (t) => {
        await l.acquire();
        running++;
        // The limit may drop below the running count after a throttle; it must never be exceeded by a new start.
        if (running > Math.max(l.limit, 1) && l.stats().throttles === 0) violations++;
        for (let i = 0; i < t.ticks; i++) await Promise.resolve();
        running--;
        l.release(t.outcome);
      }));
      assert.equal(violations, 0);
      assert.equal(l.inFlight, 0);
      assert.ok(l.limit >= 1 && l.limit <= 16);
      assert.ok(l.stats().peakInFlight <= Math.max(initial, 16));
    },
  ), { numRuns: 100 });
});

test('limiter after a throttle admits no new request until in-flight drops below the halved limit', async () => {
  const l = new AdaptiveLimiter({ initial: 4 });
  for (let i = 0; i < 4; i++) await l.acquire();
  let admitted = 0;
  const waiters = [0, 1, 2].map(() => l.acquire().then(() => void admitted++));
  l.release('throttled'); // limit 2, in flight 3
  await Promise.resolve();
  assert.equal(admitted, 0);
  l.release('ok'); // in flight 2
  await Promise.resolve();
  assert.equal(admitted, 0);
  l.release('ok'); // in flight 1 → one admitted
  await new Promise((r) => setImmediate(r));
  assert.equal(admitted, 1);
  l.release('ok');
  l.release('ok');
  await Promise.all(waiters);
  assert.equal(admitted, 3);
});

test('throttles of requests admitted before a decrease halve the limit only once', async () => {
  const l = new AdaptiveLimiter({ initial: 8 });
  const tickets = await Promise.all([0, 1, 2, 3].map(() => l.acquire()));
  for (const t of tickets) l.release('throttled', t);
  assert.equal(l.limit, 4, 'one congestion event, one halving');
  const t2 = await l.acquire();
  l.release('throttled', t2);
  assert.equal(l.limit, 2, 'a request admitted after the decrease halves again');
});

test('release without acquire is a programming error', () => {
  assert.throws(() => new AdaptiveLimiter().release('ok'), /without acquire/);
});

test('backoff is full jitter: within [0, min(cap, base * 2^n)) (property)', () => {
  fc.assert(fc.property(fc.nat(40), fc.double({ min: 0, max: 0.999999, noNaN: true }), (n, r) => {
    const ms = backoffMs(n, () => r);
    const ceiling = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** n);
    assert.ok(ms >= 0 && ms < ceiling, `${ms} for attempt ${n}`);
  }));
});

test('LINEAR checksum is SHA-256 over the concatenated block digests in index order', () => {
  const blocks = [Buffer.from('a'), Buffer.from('bb'), Buffer.alloc(524288, 7)];
  const agg = new LinearChecksum();
  blocks.forEach((b, i) => agg.add(i * 3, sha256(b)));
  const expected = createHash('sha256').update(Buffer.concat(blocks.map((b) => sha256(b)))).digest('base64');
  assert.equal(agg.count, 3);
  assert.equal(agg.digest(), expected);
  const bad = new LinearChecksum();
  bad.add(5, sha256(blocks[0]!));
  assert.throws(() => bad.add(5, sha256(blocks[1]!)), /ascending/);
});

test('errors: throttles and 5xx retry, validation and access never do, and map to catalog codes with advice', () => {
  const err = (name: string, status: number, extra: Record<string, unknown> = {}) => Object.assign(new Error(`${name} happened`), { name, $metadata: { httpStatusCode: status }, ...extra });
  for (const n of ['RequestThrottledException', 'ThrottlingException', 'ConcurrentLimitExceededException', 'ServiceQuotaExceededException']) {
    assert.equal(classify(err(n, 400)), 'throttle', n);
    assert.equal(ebsError(err(n, 400), 'x').code, 'ERR_AWS_THROTTLED');
  }
  assert.equal(classify(err('InternalServerException', 500)), 'transient');
  assert.equal(classify(err('ValidationException', 400)), 'fatal');
  assert.equal(ebsError(err('ValidationException', 400), 'x').code, 'ERR_AWS_VALIDATION');
  assert.equal(classify(err('AccessDeniedException', 403)), 'fatal');
  assert.equal(ebsError(err('AccessDeniedException', 403), 'x').code, 'ERR_AWS_ACCESS_DENIED');
  assert.equal(classify(err('ResourceNotFoundException', 404)), 'not-found');
  assert.equal(ebsError(err('ResourceNotFoundException', 404), 'x').code, 'ERR_AWS_NOT_FOUND');
  const region = err('InvalidSignatureException', 403, { message: "Credential should be scoped to a valid region, not 'eu-west-1'" });
  assert.equal(classify(region), 'fatal');
  assert.equal(ebsError(region, 'x').code, 'ERR_AWS_CREDENTIALS');
  assert.match(ebsError(region, 'x').message, /AWS_REGION/);
  assert.equal(isExpiredToken(err('ValidationException', 400, { Reason: 'INVALID_BLOCK_TOKEN' })), true);
  assert.equal(isExpiredToken(err('ValidationException', 400, { Reason: 'INVALID_PARAMETER_VALUE' })), false);
});
