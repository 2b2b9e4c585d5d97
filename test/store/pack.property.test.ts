/** Properties of pack record encoding (store/pack.ts): roundtrip; any truncation or bit flip is detected. */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { crc32 } from 'node:zlib';
import { decodeRecord, encodeRecord, packFileName, parsePackFileName, RECORD_OVERHEAD } from '../../store/pack.js';
import { blake3 } from '../../store/hash.js';

const recordArb = fc.record({ payload: fc.uint8Array({ minLength: 1, maxLength: 5000 }).map((a) => Buffer.from(a)), codec: fc.integer({ min: 0, max: 255 }) });

describe('pack record properties', () => {
  it('decode(encode(x)) = x, also with trailing bytes after the record', () => {
    fc.assert(
      fc.property(recordArb, fc.uint8Array({ maxLength: 64 }), ({ payload, codec }, tail) => {
        const hash = blake3(payload);
        const rec = encodeRecord(hash, codec, payload);
        assert.equal(rec.length, RECORD_OVERHEAD + payload.length);
        const d = decodeRecord(Buffer.concat([rec, Buffer.from(tail)]));
        assert.ok(d);
        assert.ok(d.hash.equals(hash) && d.payload.equals(payload));
        assert.equal(d.codec, codec);
        assert.equal(d.size, rec.length);
      }),
      { numRuns: 300 },
    );
  });

  it('the trailer is the CRC-32 of zlib (store/README.md) of the bytes before it', () => {
    fc.assert(
      fc.property(recordArb, ({ payload, codec }) => {
        const rec = encodeRecord(blake3(payload), codec, payload);
        const body = rec.subarray(0, rec.length - 4);
        assert.equal(rec.readUInt32BE(rec.length - 4), crc32(body) >>> 0);
      }),
      { numRuns: 300 },
    );
  });

  it('a pack file name gives back its id, for every u32 id (past 99,999,999 the name has more than 8 digits); other names give none', () => {
    fc.assert(fc.property(fc.integer({ min: 1, max: 0xffffffff }), (id) => assert.equal(parsePackFileName(packFileName(id)), id)));
    for (const name of ['1.pack', '00000001.pack.tmp', '00000001.pac', '4294967296.pack', '012345678.pack', 'x0000001.pack', '00000001.pack/']) assert.equal(parsePackFileName(name), undefined, name);
  });

  it('any truncation is detected', () => {
    fc.assert(
      fc.property(recordArb, fc.nat(), ({ payload, codec }, cut) => {
        const rec = encodeRecord(blake3(payload), codec, payload);
        assert.equal(decodeRecord(rec.subarray(0, cut % rec.length)), undefined);
      }),
      { numRuns: 300 },
    );
  });

  it('any single bit flip is detected', () => {
    fc.assert(
      fc.property(recordArb, fc.nat(), fc.integer({ min: 0, max: 7 }), ({ payload, codec }, pos, bit) => {
        const rec = encodeRecord(blake3(payload), codec, payload);
        const bad = Buffer.from(rec);
        bad[pos % bad.length]! ^= 1 << bit;
        assert.equal(decodeRecord(bad), undefined);
      }),
      { numRuns: 500 },
    );
  });
});
