// Golden checks for tests/unit/test_codec_bolt.py against the real Node.js SOFA stack
// (sofa-bolt-node 2.0.1, sofa-rpc-node 2.10.0), so the Python tests need no Node at run time.
//
//   node tests/unit/golden/bolt_golden.js encode           > node_frames.json
//   node tests/unit/golden/bolt_golden.js decode < py_frames.json > node_view.json
//
// encode: {name: hex} of frames written by sofa-bolt-node's own encoder (v1, v2 with and
//   without CRC, requests as sofa-rpc-node builds them and with a SOFA-RPC Java header map).
// decode: for each {name: hex} on stdin, what sofa-bolt-node's stream decoder emits; for
//   names starting "reply_", also the error sofa-rpc-node's RpcClient throws when a server
//   answers its call with that frame (the id patched to the call's, CRC recomputed).
// bolt_golden.py drives both and prints the constants the tests paste.
'use strict';

const net = require('net');
const path = require('path');
const { createRequire } = require('module');

const peers = createRequire(path.resolve(__dirname, '../../rpc_peers/package.json'));
const bolt = peers('sofa-bolt-node');
const protocol = peers('sofa-bolt-node/lib/protocol');
const boltUtils = peers('sofa-bolt-node/lib/utils');
const SimpleMapSerializer = peers('sofa-bolt-node/lib/simple_map_serializer');
const RpcRequest = peers('sofa-rpc-node/lib/client/request');
const { RpcClient } = peers('sofa-rpc-node').client;

const SERVICE = 'com.alipay.test.HelloService';

const wires = {
  v1: { protocolType: 'bolt', codecType: 'hessian2', boltVersion: 1, crcEnable: false },
  v2: { protocolType: 'bolt2', codecType: 'hessian2', boltVersion: 1, crcEnable: false },
  v2crc: { protocolType: 'bolt2', codecType: 'hessian2', boltVersion: 2, crcEnable: true },
};

// A request exactly as sofa-rpc-node's RpcConsumer.createRequest builds it.
function nodeRequest(extra = {}) {
  return Object.assign(new RpcRequest({
    targetAppName: 'shoal-test',
    serverSignature: SERVICE + ':1.0',
    methodName: 'sayHello',
    args: [ 'world' ],
    timeout: 3000,
  }), extra);
}

// A request whose header map is what SOFA-RPC Java's SofaRpcSerialization writes:
// service, method, target service (with a uniqueId), target app, flattened request props.
class JavaStyleRequest extends bolt.BaseRpcCmd {
  get className() {
    return 'com.alipay.sofa.rpc.core.request.SofaRequest';
  }

  get timeout() {
    return 5000;
  }

  serializeHeader(byteBuffer) {
    byteBuffer.put(SimpleMapSerializer.encode({
      service: SERVICE + ':1.0:blue',
      sofa_head_method_name: 'sayHello',
      sofa_head_target_service: SERVICE + ':1.0:blue',
      sofa_head_target_app: 'shoal-test',
      'rpc_trace_context.sofaTraceId': '0a0fe8e5170000000000110001',
      'rpc_trace_context.sofaRpcId': '0',
      empty: '',
      nothing: null,
      unicode: 'héllo 中文',
    }));
  }

  serializeContent(byteBuffer) {
    bolt.codec.hessian2.encode(byteBuffer, this);
  }
}

// An Error whose stack has no frames, so the RpcServerException content is deterministic.
function bareError(message) {
  const err = new Error(message);
  err.stack = 'Error: ' + message;
  return err;
}

function encodeAll() {
  const hex = buf => Buffer.from(buf).toString('hex');
  const out = {};
  for (const [ w, opts ] of Object.entries(wires)) {
    out[w + '_request'] = hex(protocol.requestEncode(1, nodeRequest(), opts));
    out[w + '_response_ok'] = hex(protocol.responseEncode(1, { isError: false, appResponse: 'hello world' }, opts));
    out[w + '_response_error'] = hex(protocol.responseEncode(2, { isError: true, appResponse: bareError('boom') }, opts));
    out[w + '_heartbeat'] = hex(protocol.heartbeatEncode(3, { timeout: 3000 }, opts));
    out[w + '_heartbeat_ack'] = hex(protocol.heartbeatAckEncode(3, opts));
  }
  out.v1_request_oneway = hex(protocol.requestEncode(4, nodeRequest({ oneway: true }), wires.v1));
  out.v1_request_java_headers = hex(protocol.requestEncode(5, new JavaStyleRequest(nodeRequest()), wires.v1));
  out.v1_response_busy = hex(protocol.responseEncode(6, { status: 4, appResponse: bareError('busy') }, wires.v1));
  out.v1_request_big_id = hex(protocol.requestEncode(0x7ffffffe, nodeRequest(), wires.v1));
  return out;
}

// What sofa-bolt-node's decoder makes of one frame: its events, in order.
function view(buf) {
  return new Promise(resolve => {
    const events = [];
    const decoder = bolt.decoder({});
    for (const type of [ 'request', 'response', 'heartbeat', 'heartbeat_ack' ]) {
      decoder.on(type, packet => {
        const item = Object.assign({ event: type, packetId: packet.packetId }, packet.options);
        if (packet.className) item.className = packet.className;
        const data = packet.data;
        if (type === 'request') {
          Object.assign(item, {
            serverSignature: data.serverSignature,
            methodName: data.methodName,
            args: data.args,
            targetAppName: data.targetAppName,
          });
        } else if (type === 'response') {
          Object.assign(item, { error: data.error ? data.error.message : null, appResponse: data.appResponse });
        }
        events.push(item);
      });
    }
    decoder.on('error', err => resolve({ events, error: err.message }));
    decoder.end(buf, () => resolve({ events }));
  });
}

// Serve one sofa-rpc-node call with `reply` (its id patched to the call's) and report what
// RpcConsumer.invoke throws or returns.
async function clientSees(reply) {
  const server = net.createServer(socket => {
    const decoder = bolt.decoder({});
    decoder.on('request', req => {
      const frame = Buffer.from(reply);
      const v2 = frame[0] === 2;
      frame.writeInt32BE(req.packetId, v2 ? 6 : 5);
      if (v2 && frame[1] === 2 && (frame[11] & 1)) {
        frame.writeInt32BE(boltUtils.crc32(frame.slice(0, frame.length - 4)), frame.length - 4);
      }
      socket.write(frame);
    });
    socket.pipe(decoder);
  });
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve));
  const quiet = { info() {}, warn() {}, error() {}, debug() {} };
  const client = new RpcClient({ logger: quiet });
  const consumer = client.createConsumer({
    interfaceName: SERVICE,
    serverHost: '127.0.0.1:' + server.address().port,
  });
  let result;
  try {
    await consumer.ready();
    result = { returned: await consumer.invoke('sayHello', [ 'world' ], { responseTimeout: 3000 }) };
  } catch (err) {
    result = { error: err.message };
  }
  await client.close();
  server.close();
  return result;
}

async function decodeAll() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const frames = JSON.parse(Buffer.concat(chunks).toString());
  const out = {};
  for (const [ name, hex ] of Object.entries(frames)) {
    const buf = Buffer.from(hex, 'hex');
    out[name] = await view(buf);
    if (name.startsWith('reply_')) out[name].client = await clientSees(buf);
  }
  return out;
}

async function main() {
  const mode = process.argv[2];
  if (mode === 'encode') {
    process.stdout.write(JSON.stringify(encodeAll(), null, 1) + '\n');
  } else if (mode === 'decode') {
    process.stdout.write(JSON.stringify(await decodeAll(), null, 1) + '\n');
  } else {
    process.stderr.write('usage: bolt_golden.js encode | decode < frames.json\n');
    process.exit(2);
  }
}

main().catch(err => {
  process.stderr.write(err.stack + '\n');
  process.exit(1);
});
