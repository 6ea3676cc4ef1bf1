// Golden bytes for tests/unit/test_hessian2.py and tests/unit/test_codec_dubbo.py, made by
// the real Node.js implementations (hessian.js 2.11.0, dubbo-remoting 2.1.4, js-to-java) so
// the Python tests check Shoal against them without needing Node at run time.
//
//   node tests/unit/golden/dubbo_golden.js > /tmp/dubbo_golden.json
//
// Prints {"values": {name: hex}, "frames": {name: hex}}. Every value is encoded by a fresh
// hessian2 encoder (one stream each, as in a Dubbo body). The tests paste the output as
// constants (zlib+base64 for the large ones); rerun only when adding cases.
'use strict';

const path = require('path');
const { createRequire } = require('module');

const peers = createRequire(path.resolve(__dirname, '../../rpc_peers/package.json'));
const hessian = peers('hessian.js');
const java = peers('js-to-java');
const protocol = peers('dubbo-remoting/lib/protocol');
const Request = peers('dubbo-remoting/lib/protocol/request');
const Response = peers('dubbo-remoting/lib/protocol/response');
const Invocation = peers('dubbo-remoting/lib/protocol/invocation');

function hex(v) {
  const enc = new hessian.EncoderV2({ size: 1024 * 1024 });
  enc.write(v);
  return enc.get().toString('hex');
}

const user = (name, age) => java('com.example.User', { name, age });
const shared = user('shared', 7);

// Strings: lengths around every form boundary (0x00-0x1f, 0x30-0x33, 'S', 'R' chunks),
// multi-byte UTF-8 and surrogate pairs (CESU-8, chunks never end on a high surrogate).
const strings = {
  s_empty: '',
  s_one: 'a',
  s_31: 'x'.repeat(31),
  s_32: 'x'.repeat(32),
  s_1023: 'y'.repeat(1023),
  s_1024: 'y'.repeat(1024),
  s_32768: 'z'.repeat(0x8000),
  s_32769: 'z'.repeat(0x8001),
  s_70000: 'abcdefghij'.repeat(7000),
  s_cjk: '中文字符串',
  s_cjk_1023: '中'.repeat(1023),
  s_latin: 'héllo wörld',
  s_emoji: 'hi 😀!',
  s_pair_at_chunk_end: 'a'.repeat(0x7fff) + '😀' + 'tail',
  s_cjk_40000: '汉字'.repeat(20000),
};

const ints = {
  i_0: 0, i_m16: -16, i_47: 47, i_m17: -17, i_48: 48, i_m2048: -2048, i_2047: 2047,
  i_m2049: -2049, i_2048: 2048, i_m262144: -262144, i_262143: 262143, i_m262145: -262145,
  i_262144: 262144, i_max: 2147483647, i_min: -2147483648,
};

const longs = {
  l_0: 0, l_m8: -8, l_15: 15, l_m9: -9, l_16: 16, l_m2048: -2048, l_2047: 2047, l_m2049: -2049,
  l_2048: 2048, l_m262144: -262144, l_262143: 262143, l_m262145: -262145, l_262144: 262144,
  l_i32max: 2147483647, l_i32min: -2147483648, l_2p31: 2147483648, l_m2p31m1: -2147483649,
  l_2p53p1: '9007199254740993', l_min: '-9223372036854775808', l_max: '9223372036854775807',
};

const other = {
  null: null,
  true: true,
  false: false,
  dbl_0: java.double(0),
  dbl_1: java.double(1),
  dbl_127: java.double(127),
  dbl_m128: java.double(-128),
  dbl_128: java.double(128),
  dbl_m32768: java.double(-32768),
  dbl_32768: java.double(32768),
  dbl_1_5: java.double(1.5),
  dbl_pi: java.double(3.141592653589793),
  dbl_big: java.double(1e300),
  date_minutes: new Date(60000 * 28000000),
  date_millis: new Date(1234567890123),
  bin_0: Buffer.alloc(0),
  bin_15: Buffer.alloc(15, 1),
  bin_16: Buffer.alloc(16, 2),
  bin_1023: Buffer.alloc(1023, 3),
  bin_1024: Buffer.alloc(1024, 4),
  bin_10000: Buffer.alloc(10000, 5),
  list_empty: [],
  list_3: [1, 'two', 3.5],
  list_4: ['a', 'b', 'c', 'd'],
  list_7: [1, 2, 3, 4, 5, 6, 7],
  list_9: [1, 2, 3, 4, 5, 6, 7, 8, 9],
  list_nested: [[1], [2, [3, [4, [5]]]], []],
  list_typed_int: java.array.int([1, 2, 3]),
  list_typed_int_7: java.array.int([1, 2, 3, 4, 5, 6, 7]),
  list_typed_long_10: java.array.long([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
  list_typed_reuse: [java.array.int([1]), java.array.int([2, 3])],
  list_of_lists_typed: java.List([java.List(['a']), java.List(['b'])]),
  map_untyped: { a: 1, b: 'x', c: null, d: [1, 2], e: { f: 'g' } },
  map_typed: { $class: 'com.alibaba.fastjson.JSONObject', $: { k: 'v', n: 2 } },
  map_int_keys: new Map([[1, 'one'], [2, 'two'], ['three', 3]]),
  obj: user('alice', 30),
  obj_nested: java('com.example.Order', {
    id: java.long(42), owner: user('bob', 41), items: [user('c', 1), user('d', 2)],
  }),
  obj_ref: [shared, shared],
  obj_17_classes: Array.from({ length: 17 }, (_, i) => java(`com.example.C${i}`, { v: i })),
  obj_17_reused: [
    ...Array.from({ length: 17 }, (_, i) => java(`com.example.C${i}`, { v: i })),
    java('com.example.C16', { v: 99 }),
  ],
  exception: { $class: 'java.lang.RuntimeException', $: { detailMessage: 'boom' } },
  mixed: [null, true, false, java.long(1), 1.25, new Date(0), Buffer.from('hi'), 'ok'],
};

const values = {};
for (const [name, v] of Object.entries(strings)) values[name] = hex(v);
for (const [name, v] of Object.entries(ints)) values[name] = hex(java.int(v));
for (const [name, v] of Object.entries(longs)) values[name] = hex(java.long(v));
for (const [name, v] of Object.entries(other)) values[name] = hex(v);

// Dubbo frames, encoded the way dubbo-remoting's ProtocolEncoder does.
const frames = {};
const opts = { codecType: 'hessian2' };
const frame = (name, buf) => { frames[name] = buf.toString('hex'); };

frame('req_simple', protocol.requestEncode(1, {
  serverSignature: 'com.example.DemoService:1.0.0',
  methodName: 'sayHello',
  args: ['world'],
  group: 'blue',
  requestProps: { timeout: 3000, 'x-trace': 'abc', retries: 2 },
}, opts));

frame('req_args', protocol.requestEncode(0x1234567890, {
  serverSignature: 'com.example.KitchenSink:2.1',
  methodName: 'everything',
  args: [
    java.int(-5), java.long('9007199254740993'), 'ünïcode 😀', 'q'.repeat(40000),
    java.double(2.5), true, null, new Date(1234567890123), Buffer.alloc(5000, 9),
    [1, [2, [3]]], { a: 'b', n: 1 }, user('alice', 30),
    java('com.example.Order', { id: java.long(1), owner: user('bob', 2), items: [user('c', 3)] }),
    java.array.int([1, 2, 3]), java.List(['x', 'y']),
    { $class: 'com.alibaba.fastjson.JSONObject', $: { k: 'v' } },
  ],
  group: 'green',
  requestProps: {
    timeout: '2500', 'x-cn': '中文', obj: user('meta', 1), list: ['a'], flag: true,
    interface: 'com.example.KitchenSinkApi',
  },
}, opts));

frame('req_no_version_no_args', protocol.requestEncode(7, {
  serverSignature: 'com.example.Ping',
  methodName: 'ping',
  args: [],
  requestProps: {},
}, opts));

const oneway = new Request(8);
oneway.isTwoWay = false;
oneway.data = new Invocation({
  methodName: 'notify',
  args: ['event'],
  attachments: { dubbo: '2.0.2', path: 'com.example.Events', version: '', group: '' },
});
frame('req_oneway', oneway.encode(opts));

frame('heartbeat', protocol.heartbeatEncode(9, {}, opts));
frame('heartbeat_ack', protocol.heartbeatAckEncode(9, opts));

frame('resp_value', protocol.responseEncode(1, { appResponse: 'hello world' }, opts));
frame('resp_object', protocol.responseEncode(0x1234567890, {
  appResponse: java('com.example.Order', { id: java.long(1), owner: user('bob', 2), items: [] }),
}, opts));
frame('resp_exception', protocol.responseEncode(3, {
  appResponse: { $class: 'java.lang.IllegalStateException', $: { detailMessage: 'bad state' } },
}, opts));
frame('resp_server_error', protocol.responseEncode(4, {
  isError: true, errorMsg: 'provider exploded',
}, opts));
const timeout = new Response(5);
timeout.status = Response.SERVER_TIMEOUT;
timeout.errorMsg = 'Waiting server-side response timeout';
frame('resp_server_timeout', timeout.encode(opts));

process.stdout.write(JSON.stringify({ values, frames }, null, 1) + '\n');
