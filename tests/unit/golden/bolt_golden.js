// Golden checks for tests/unit/test_codec_bolt.py against the real Node.js SOFA stack
// (sofa-bolt-node 2.0.1, sofa-rpc-node 2.10.0), so the Python tests need no Node at run time.
//
//   node tests/unit/golden/bolt_golden.js encode           > node_frames.json
//   node tests/unit/golden/bolt_golden.js decode < py_frames.json > node_view.json
//
// encode: {name: hex} of frames written by sofa-bolt-node's own encoder (v1, v2 with and
//   without CRC, requests as sofa-rpc-node builds them and with a SOFA-RPC Java header map,
//   with Hessian 2.0 content as sofa-bolt-node's hessianVersion 4.0 and SOFA-RPC Java write
//   it, with a SofaRequest whose fields before the method hold every kind of value the
//   default (Hessian 3.x draft) encoder writes), and the first request that a real
//   sofa-rpc-node RpcClient and client.js --plain-bolt-header send to a server (their
//   packet id set to 1).
// decode: for each {name: hex} on stdin, what sofa-bolt-node's stream decoder emits; for
//   names starting "reply_", also the error sofa-rpc-node's RpcClient throws when a server
//   answers its call with that frame (the id patched to the call's, CRC recomputed).
// bolt_golden.py drives both and prints the constants the tests paste.
'use strict';

const { execFile } = require('child_process');
const net = require('net');
const path = require('path');
const { createRequire } = require('module');

const PEERS = path.resolve(__dirname, '../../rpc_peers');
const peers = createRequire(path.join(PEERS, 'package.json'));
const hessian = peers('hessian.js');
const hessianDraft = peers('sofa-hessian-node').v3; // hessian.js 1.x, sofa-bolt-node's default
const java = peers('js-to-java');
const bolt = peers('sofa-bolt-node');
const protocol = peers('sofa-bolt-node/lib/protocol');
const boltUtils = peers('sofa-bolt-node/lib/utils');
const SimpleMapSerializer = peers('sofa-bolt-node/lib/simple_map_serializer');
const RpcRequest = peers('sofa-rpc-node/lib/client/request');
const { RpcClient } = peers('sofa-rpc-node').client;

const SERVICE = 'com.alipay.test.HelloService';
const SOFA_REQUEST = 'com.alipay.sofa.rpc.core.request.SofaRequest';
const quiet = { info() {}, warn() {}, error() {}, debug() {} };

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

// sayHello("world") in Hessian 2.0 as SOFA-RPC Java writes it (SofaRequestHessianSerializer:
// writeObject(request), then the arguments). Hessian's JavaSerializer puts java.lang fields
// first, then the others, each group a class's own before its superclass's: targetAppName
// (SofaRequest), methodName, targetServiceUniqueName (RequestBase), requestProps,
// methodArgSigs; a HashMap is an untyped map, String[] the list type "[string". The content
// is byte for byte what Caucho Hessian 4.0.38's Hessian2Output writes for classes declared
// as sofa-rpc's RequestBase and SofaRequest (checked once with Java, outside this script).
// The header map has only `service`, as sofa-rpc-node sends, so the method must come from
// the content.
class JavaHessian20Request extends bolt.BaseRpcCmd {
  get className() {
    return SOFA_REQUEST;
  }

  serializeHeader(byteBuffer) {
    byteBuffer.put(SimpleMapSerializer.encode({ service: SERVICE + ':1.0' }));
  }

  serializeContent(byteBuffer) {
    const encoder = new hessian.EncoderV2();
    encoder.write({
      $class: SOFA_REQUEST,
      $: {
        targetAppName: 'shoal-test',
        methodName: 'sayHello',
        targetServiceUniqueName: SERVICE + ':1.0',
        requestProps: { service: SERVICE + ':1.0' },
        methodArgSigs: { $class: '[string', $: [ 'java.lang.String' ] },
      },
    });
    encoder.write('world');
    byteBuffer.put(encoder.get());
  }
}

// A SofaRequest in the Hessian 2 draft (what sofa-bolt-node writes by default) with fields
// of every kind before methodName and targetServiceUniqueName, so that a decoder has to
// step over all of them: null, booleans, ints and longs and doubles in each compact form,
// a date, binary, a string with a surrogate pair, untyped and typed lists (and one by type
// reference), objects (a definition, instances, a back reference) and maps.
class DraftAllTypesRequest extends bolt.BaseRpcCmd {
  get className() {
    return SOFA_REQUEST;
  }

  serializeHeader(byteBuffer) {
    byteBuffer.put(SimpleMapSerializer.encode({ service: SERVICE + ':1.0' }));
  }

  serializeContent(byteBuffer) {
    const item = { $class: 'com.example.Item', $: { name: 'a', tags: java.array.String([ 'x' ]) } };
    const encoder = new hessianDraft.Encoder();
    encoder.write({
      $class: SOFA_REQUEST,
      $: {
        nothing: null,
        yes: true,
        no: false,
        ints: [ 0, -16, 47, 48, -2048, 262143, 2147483647 ],
        longs: [ 0, -9, 2047, 262143, 2147483647, '9007199254740993' ].map(java.long),
        doubles: [ 0, 1, 100, 1000, 100000, 1.5 ].map(java.double),
        date: new Date(0),
        bytes: [ Buffer.from('short'), Buffer.alloc(100, 7) ],
        text: 'héllo wörld 😀 '.repeat(4),
        strings: java.array.String([ 'a', 'b' ]),
        moreStrings: java.array.String([ 'c' ]),
        items: [ item, item, { $class: 'com.example.Item', $: { name: 'b', tags: java.array.String([]) } } ],
        props: { a: 1, b: 'x' },
        map: { k: 'v', n: null },
        methodName: 'sayHello',
        targetServiceUniqueName: 'com.example.Greeter:1.0.0',
      },
    });
    encoder.write('world');
    byteBuffer.put(encoder.get());
  }
}

// The first request frame `send(address)` makes a client send to a server that answers it
// with an OK response, its packet id set to 1 (the frame is v1, without CRC).
async function captureRequest(send) {
  let request = null;
  const server = net.createServer(socket => {
    let received = Buffer.alloc(0);
    const decoder = bolt.decoder({});
    socket.on('data', chunk => { received = Buffer.concat([ received, chunk ]); });
    decoder.on('request', req => {
      const length = 22 + received.readUInt16BE(14) + received.readUInt16BE(16) + received.readUInt32BE(18);
      request = request || Buffer.from(received.subarray(0, length));
      socket.write(protocol.responseEncode(req.packetId, { isError: false, appResponse: 'hello world' }, wires.v1));
    });
    socket.pipe(decoder);
  });
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve));
  try {
    await send('127.0.0.1:' + server.address().port);
  } finally {
    server.close();
  }
  request.writeInt32BE(1, 5);
  return request.toString('hex');
}

// sayHello("world") through an unmodified sofa-rpc-node RpcClient, as client.js's defaults.
async function rpcClientCall(address) {
  const client = new RpcClient({ logger: quiet });
  const consumer = client.createConsumer({
    interfaceName: 'com.example.Greeter',
    version: '1.0.0',
    serverHost: address,
  });
  await consumer.ready();
  await consumer.invoke('sayHello', [ 'world' ], { responseTimeout: 3000 });
  await client.close();
}

function clientJsCall(address) {
  const args = [ '--protocol=bolt', '--plain-bolt-header', '--address=' + address, '--method=sayHello', '--args=["world"]' ];
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [ path.join(PEERS, 'client.js'), ...args ], { cwd: PEERS }, (err, stdout) => {
      if (err) reject(err);
      else if (JSON.parse(stdout).ok !== 1) reject(new Error('client.js failed: ' + stdout));
      else resolve();
    });
  });
}

// An Error whose stack has no frames, so the RpcServerException content is deterministic.
function bareError(message) {
  const err = new Error(message);
  err.stack = 'Error: ' + message;
  return err;
}

async function encodeAll() {
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
  bolt.setHessianVersion('4.0');
  out.v1_request_hessian4 = hex(protocol.requestEncode(7, nodeRequest(), wires.v1));
  bolt.setHessianVersion('3.0');
  out.v1_request_java_hessian20 = hex(protocol.requestEncode(8, new JavaHessian20Request(nodeRequest()), wires.v1));
  out.v1_request_draft_all_types = hex(protocol.requestEncode(9, new DraftAllTypesRequest(nodeRequest()), wires.v1));
  out.v1_request_rpc_client = await captureRequest(rpcClientCall);
  out.v1_request_client_js_plain = await captureRequest(clientJsCall);
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
    process.stdout.write(JSON.stringify(await encodeAll(), null, 1) + '\n');
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
