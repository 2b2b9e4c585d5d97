import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { nextStart, expectedDurationMs, updateRates, DEFAULT_RATES, JOB_OVERHEAD_MS, SAFETY_FACTOR } from '../../appliance/scheduler/index.js';

test('property: never schedules a job to end after its deadline; starts at once when overdue', () => {
  fc.assert(fc.property(
    fc.integer({ min: 0, max: 2 ** 40 }), // now
    fc.option(fc.integer({ min: -(2 ** 32), max: 2 ** 32 }), { nil: null }), // lastGood relative to now
    fc.integer({ min: 1, max: 7 * 86_400_000 }), // rpo
    fc.integer({ min: 0, max: 7 * 86_400_000 }), // expected
    (now, rel, rpo, expected) => {
      const lastGood = rel === null ? null : now + rel;
      const s = nextStart(lastGood, rpo, expected, now);
      assert.ok(s >= now, 'never in the past');
      if (lastGood === null) return assert.equal(s, now);
      const deadline = lastGood + rpo;
      if (expected <= rpo && s > now) assert.ok(s + expected <= deadline, 'ends by the deadline');
      if (deadline - expected <= now) assert.equal(s, now, 'overdue starts now');
      else assert.equal(s, deadline - expected, 'as late as possible otherwise');
    },
  ), { numRuns: 2000 });
});

test('expected duration follows measured rates, with overhead and safety factor', () => {
  const rates = { ...DEFAULT_RATES, scanBytesPerSec: 100e6, syncBytesPerSec: 10e6, lastChangedBytes: 50e6, samples: 3 };
  // 1 GB scan at 100 MB/s = 10 s, 50 MB at 10 MB/s = 5 s, + overhead, x safety.
  assert.equal(expectedDurationMs(rates, 1e9, true), Math.ceil((10_000 + 5_000 + JOB_OVERHEAD_MS) * SAFETY_FACTOR));
  assert.equal(expectedDurationMs(rates, 1e9, false), Math.ceil((10_000 + JOB_OVERHEAD_MS) * SAFETY_FACTOR));
  // Never measured: assume the whole volume must be sent (first full copy).
  const first = expectedDurationMs(DEFAULT_RATES, 1e9, true);
  assert.ok(first > expectedDurationMs(DEFAULT_RATES, 1e9, false) + 40_000);
});

test('rates: the first measurement replaces the defaults, later ones are smoothed', () => {
  const at = new Date('2026-11-01T00:00:00Z');
  const r1 = updateRates(DEFAULT_RATES, { scanBytesPerSec: 200e6, syncBytesPerSec: 5e6, changedBytes: 1e6 }, at);
  assert.equal(r1.scanBytesPerSec, 200e6);
  assert.equal(r1.syncBytesPerSec, 5e6);
  assert.equal(r1.samples, 1);
  const r2 = updateRates(r1, { scanBytesPerSec: 100e6 }, at);
  assert.ok(r2.scanBytesPerSec < 200e6 && r2.scanBytesPerSec > 100e6);
  assert.equal(r2.syncBytesPerSec, 5e6, 'unmeasured rate kept');
  assert.equal(r2.lastChangedBytes, 1e6);
  assert.equal(updateRates(r1, { scanBytesPerSec: Infinity }, at).scanBytesPerSec, 200e6, 'nonsense ignored');
});
