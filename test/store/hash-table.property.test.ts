/**
 * Properties of HashTable (store/hash-table.ts), the bounded table verify remembers good blocks
 * and clean nodes in: it answers like a Map of the same hashes while it holds at most its
 * capacity, and forgets everything, never answering wrongly, when it would hold more.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { HashTable } from '../../store/hash-table.js';

/** Hashes from small ids; some share their first word, so they land in the same slot. */
function hashOf(id: number): Buffer {
  const h = Buffer.alloc(32);
  h.writeUInt32LE(id % 7, 0);
  h.writeUInt32LE(id, 12);
  h.writeUInt32LE(0xabcd, 20);
  return h;
}

describe('HashTable', () => {
  it('answers like a Map while within capacity, across growth', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: 3000 }), fc.integer({ min: 0, max: 2 ** 32 - 1 })), { maxLength: 2500 }), (ops) => {
        const t = new HashTable(3001, true);
        const m = new Map<number, number>();
        for (const [id, v] of ops) {
          t.set(hashOf(id), v);
          m.set(id, v);
        }
        assert.equal(t.size, m.size);
        for (let id = 0; id <= 3000; id += 13) assert.equal(t.get(hashOf(id)), m.get(id));
        for (const [id, v] of m) assert.equal(t.get(hashOf(id)), v);
      }),
      { numRuns: 30 },
    );
  });

  it('forgets everything when full, then fills again; a hash of zeros is a key like any other', () => {
    const t = new HashTable(1000);
    const capacity = 1536; // 2048 slots at most 3/4 full
    for (let id = 0; id < capacity; id++) t.set(hashOf(id));
    assert.equal(t.size, capacity);
    assert.ok(t.has(hashOf(0)) && t.has(hashOf(capacity - 1)));
    t.set(hashOf(capacity));
    assert.equal(t.size, 1);
    assert.ok(t.has(hashOf(capacity)) && !t.has(hashOf(0)));
    const zeros = Buffer.alloc(32);
    assert.ok(!t.has(zeros));
    t.set(zeros);
    assert.ok(t.has(zeros));
    assert.equal(t.get(zeros), 0);
    assert.equal(t.size, 2);
  });
});
