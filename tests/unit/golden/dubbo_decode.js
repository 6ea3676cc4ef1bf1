// Decodes frames made by Shoal's DubboCodec with dubbo-remoting 2.1.4's own stream decoder
// (header, hessian.js v2 body), to record in tests/unit/test_codec_dubbo.py that the real
// implementation reads them as intended.
//
//   node tests/unit/golden/dubbo_decode.js < frames.json   # {name: hex} in, {name: packet} out
'use strict';

const path = require('path');
const { createRequire } = require('module');

const peers = createRequire(path.resolve(__dirname, '../../rpc_peers/package.json'));
const { decoder } = peers('dubbo-remoting');
const { createHash } = require('crypto');

// Long strings are summarized: their length in UTF-16 units and the SHA-256 of their UTF-8
// (its first 128 bits, as hex).
function summary(s) {
  return { length: s.length, sha256: createHash('sha256').update(s, 'utf8').digest('hex').slice(0, 32) };
}

function plain(value) {
  if (value instanceof Error) return { error: value.message };
  if (Buffer.isBuffer(value)) return { bytes: value.toString('hex') };
  if (typeof value === 'string' && value.length > 64) return summary(value);
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

async function decodeOne(hex) {
  return new Promise((resolve, reject) => {
    const stream = decoder({});
    const packets = [];
    for (const type of [ 'request', 'response', 'heartbeat', 'heartbeat_ack' ]) {
      stream.on(type, p => packets.push({ packetType: p.packetType, packetId: p.packetId, data: plain(p.data) }));
    }
    stream.on('error', err => resolve({ decodeError: err.message }));
    const buf = Buffer.from(hex, 'hex');
    // one byte at a time: the real decoder's framing sees every split
    for (let i = 0; i < buf.length; i++) stream.write(buf.subarray(i, i + 1));
    stream.end(() => resolve(packets));
    stream.on('finish', () => resolve(packets));
    void reject;
  });
}

(async () => {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const frames = JSON.parse(Buffer.concat(chunks).toString());
  const out = {};
  for (const [name, hex] of Object.entries(frames)) out[name] = await decodeOne(hex);
  process.stdout.write(JSON.stringify(out, null, 1) + '\n');
})();
