#!/usr/bin/env node
/*
 * client.js — a real Dubbo or SOFA Bolt RPC client for Shoal's integration tests.
 *
 *   node client.js --protocol dubbo|bolt --address 127.0.0.1:PORT
 *                  --interface com.example.Greeter [--version 1.0.0] [--group G]
 *                  --method sayHello --args '["world"]'
 *                  [--count N] [--concurrency C] [--timeout-ms T]
 *                  [--attachment k=v ...] [--heartbeat] [--plain-bolt-header]
 *
 * It is sofa-rpc-node's RpcClient in direct mode (a fixed serverHost, no registry), over
 * Bolt (sofa-bolt-node: Bolt v1, Hessian2) or Dubbo (dubbo-remoting: Dubbo 2.x, Hessian2).
 * All calls share one TCP connection, multiplexed by request id. It makes --count calls
 * with at most --concurrency in flight, each with a --timeout-ms deadline (default 3000),
 * then prints ONE JSON line to stdout and exits 0:
 *
 *   {"ok": <successful calls>,
 *    "errors": [{"index": i, "message": "...", "name": "...", "code": "01".."04",
 *                "status": <wire response status or null>}, ...],
 *    "results": [<results of the successful calls, in call order>],
 *    "latency_ms": [<every call's latency, in call order>],
 *    "heartbeat": {"ok": true, "rtt_ms": x} | {"ok": false, "error": "..."}  (--heartbeat)}
 *
 * `code` is sofa-rpc-node's result code: 01 application exception, 02 RPC error (remote
 * framework error, closed connection), 03 timeout, 04 no provider (cannot connect).
 * `status` is the response frame's status, when one arrived: the Dubbo status byte (20 OK,
 * 60 service not found, 70 service error, 80 server error, ...) or the Bolt respstatus
 * (0 success, 2 server exception, ...).
 *
 * Attachments go the protocol's native way: for Dubbo they are invocation attachments
 * (next to dubbo/path/version/group); for Bolt they are SofaRequest request props, which
 * are also flattened into the Bolt header map beside service / sofa_head_method_name /
 * sofa_head_target_service, as Java SOFARPC does (sofa-bolt-node alone writes only
 * `service` there for Hessian2). --plain-bolt-header leaves the header map as
 * sofa-bolt-node writes it, so the requests are byte for byte what an unmodified
 * sofa-rpc-node client sends (but for the uniqueId --group adds to the service name): the
 * method and the props only in the SofaRequest content.
 * --heartbeat first sends one protocol heartbeat on the connection and waits up to
 * --timeout-ms for its ack. Usage errors exit 2.
 */
'use strict';

const { RpcClient, RpcConsumer, DynamicConfig } = require('sofa-rpc-node').client;
const rpcUtils = require('sofa-rpc-node/lib/client/utils');
const RpcRequestCommand = require('sofa-bolt-node/lib/protocol/rpc_req_cmd');
const SimpleMapSerializer = require('sofa-bolt-node/lib/simple_map_serializer');
const { flatCopyTo } = require('sofa-bolt-node/lib/utils');
const {
  PROTOCOLS, UsageError, parseCli, die, protocolOf, parseInteger, serviceSignature,
  stderrLogger, responseStatus, observeDecodedFrames,
} = require('./common');

const USAGE = `usage: node client.js --protocol dubbo|bolt --address 127.0.0.1:PORT
                      --interface com.example.Greeter [--version 1.0.0] [--group G]
                      --method NAME --args JSON_ARRAY [--count N] [--concurrency C]
                      [--timeout-ms T] [--attachment k=v ...] [--heartbeat]
                      [--plain-bolt-header]`;

// The Dubbo protocol version Java Dubbo 2.7/3.x clients send (dubbo-remoting's own
// placeholder is 5.3.0); an --attachment dubbo=... overrides it.
const DUBBO_PROTOCOL_VERSION = '2.0.2';

function parseOptions() {
  const values = parseCli({
    protocol: { type: 'string' },
    address: { type: 'string' },
    interface: { type: 'string', default: 'com.example.Greeter' },
    version: { type: 'string', default: '1.0.0' },
    group: { type: 'string', default: '' },
    method: { type: 'string' },
    args: { type: 'string', default: '[]' },
    count: { type: 'string', default: '1' },
    concurrency: { type: 'string', default: '1' },
    'timeout-ms': { type: 'string', default: '3000' },
    attachment: { type: 'string', multiple: true, default: [] },
    heartbeat: { type: 'boolean', default: false },
    'plain-bolt-header': { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h' },
  }, USAGE);
  for (const required of [ 'protocol', 'address', 'method' ]) {
    if (values[required] === undefined) throw new UsageError(`--${required} is required\n${USAGE}`);
  }
  protocolOf(values.protocol);
  if (!/^[^:\s]+:\d+$/.test(values.address)) {
    throw new UsageError(`--address must be HOST:PORT, not ${JSON.stringify(values.address)}`);
  }
  let args;
  try {
    args = JSON.parse(values.args);
  } catch (err) {
    throw new UsageError(`--args must be a JSON array: ${err.message}`);
  }
  if (!Array.isArray(args)) throw new UsageError('--args must be a JSON array');
  const attachments = {};
  for (const item of values.attachment) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new UsageError(`--attachment must be k=v, not ${JSON.stringify(item)}`);
    attachments[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return {
    protocol: values.protocol,
    address: values.address,
    interface: values.interface,
    version: values.version,
    group: values.group,
    method: values.method,
    argsJson: values.args,
    count: parseInteger('count', values.count, 0),
    concurrency: parseInteger('concurrency', values.concurrency, 1),
    timeoutMs: parseInteger('timeout-ms', values['timeout-ms'], 1),
    attachments,
    heartbeat: values.heartbeat,
    plainBoltHeader: values['plain-bolt-header'],
  };
}

/**
 * A SofaRequest command whose Bolt header map carries what Java SOFARPC puts there
 * (SofaRpcSerialization#serializeHeader): service, sofa_head_method_name,
 * sofa_head_target_service, sofa_head_target_app and the flattened request props.
 */
class SofaRequestCommand extends RpcRequestCommand {
  serializeHeader(byteBuffer) {
    if (this.codecType === 'protobuf') {
      super.serializeHeader(byteBuffer);
      return;
    }
    const req = this.obj;
    const headers = {
      service: req.serverSignature,
      sofa_head_method_name: req.methodName,
      sofa_head_target_service: req.serverSignature,
    };
    if (req.targetAppName) headers.sofa_head_target_app = req.targetAppName;
    flatCopyTo('', req.requestProps || {}, headers);
    byteBuffer.put(SimpleMapSerializer.encode(headers));
  }
}

function useJavaStyleBoltHeaders() {
  const wire = PROTOCOLS.bolt.wire;
  const requestEncode = wire.requestEncode;
  // requestEncode uses a request that already is a command (has className) as it is.
  wire.requestEncode = (id, req, options) => {
    const cmd = req.className ? req : new SofaRequestCommand(req, options);
    return requestEncode(id, cmd, options);
  };
}

/** A direct-mode consumer naming the service by serviceSignature (Bolt adds the uniqueId). */
function consumerClassFor(options) {
  return class DirectConsumer extends RpcConsumer {
    get id() {
      return serviceSignature(options.protocol, this.interfaceName, this.version, options.group);
    }
  };
}

const elapsedMs = start => Number(process.hrtime.bigint() - start) / 1e6;
const round = ms => Math.round(ms * 100) / 100;

async function sendHeartbeat(client, consumer, options) {
  const conn = client.connectionManager.get(consumer.parseUrl(options.address));
  if (!conn) return { ok: false, error: `not connected to ${options.address}` };
  const id = rpcUtils.nextId();
  const start = process.hrtime.bigint();
  let onAck;
  let timer;
  try {
    const acked = await new Promise(resolve => {
      onAck = hb => { if (hb.packetId === id) resolve(true); };
      // sofa-rpc-node sends heartbeats without waiting for the ack; here we wait for it.
      conn._decoder.on('heartbeat_ack', onAck);
      timer = setTimeout(() => resolve(false), options.timeoutMs);
      conn._encoder.writeHeartbeat(id, { timeout: options.timeoutMs, clientUrl: conn._clientUrl });
    });
    if (!acked) return { ok: false, error: `no heartbeat ack in ${options.timeoutMs}ms` };
    return { ok: true, rtt_ms: round(elapsedMs(start)) };
  } finally {
    clearTimeout(timer);
    conn._decoder.removeListener('heartbeat_ack', onAck);
  }
}

async function main() {
  const options = parseOptions();
  const { protocol } = protocolOf(options.protocol);
  const logger = stderrLogger('client');

  // One short-lived client: no circuit breaker or fault isolation hiding calls' outcomes.
  DynamicConfig.instance.circuitBreaker.forceClosed = true;
  DynamicConfig.instance.faultTolerance.regulationEffective = false;

  if (options.protocol === 'bolt' && !options.plainBoltHeader) useJavaStyleBoltHeaders();
  // Response status by packet id, for the errors' `status`.
  const statusById = new Map();
  observeDecodedFrames(options.protocol, (packet, decoded) => {
    if (decoded.packetType === 'response') {
      statusById.set(decoded.packetId, responseStatus(options.protocol, packet));
    }
  });

  const client = new RpcClient({ logger, protocol, responseTimeout: options.timeoutMs });
  client.on('error', err => logger.warn('%s', err && err.message));
  // Say why a connection failed (calls then fail with code 04, RpcNoProviderError).
  client.connectionManager.logConnectErrorMessage = message => logger.warn('%s', message);
  // Note each call's packet id (known once it is sent) in the context the call passed.
  client.use(async (ctx, next) => {
    try {
      await next();
    } finally {
      if (ctx.req.ctx) ctx.req.ctx.packetId = ctx.req.meta.id;
    }
  });
  const consumer = client.createConsumer({
    interfaceName: options.interface,
    version: options.version,
    group: options.group,
    serverHost: `${options.protocol}://${options.address}`,
    responseTimeout: options.timeoutMs,
  }, consumerClassFor(options));
  await consumer.ready();

  const report = { ok: 0, errors: [], results: [], latency_ms: [] };
  if (options.heartbeat) report.heartbeat = await sendHeartbeat(client, consumer, options);

  const requestProps = options.protocol === 'dubbo' ?
    Object.assign({ dubbo: DUBBO_PROTOCOL_VERSION }, options.attachments) :
    Object.assign({ service: consumer.id }, options.attachments);
  const outcomes = new Array(options.count);
  let next = 0;
  const worker = async () => {
    while (next < options.count) {
      const index = next++;
      const call = { packetId: null };
      const start = process.hrtime.bigint();
      try {
        const result = await consumer.invoke(options.method, JSON.parse(options.argsJson), {
          responseTimeout: options.timeoutMs,
          requestProps: Object.assign({}, requestProps),
          ctx: call,
        });
        outcomes[index] = { ok: true, result, latency: elapsedMs(start) };
      } catch (err) {
        const status = statusById.get(call.packetId);
        outcomes[index] = {
          ok: false,
          latency: elapsedMs(start),
          error: {
            index,
            message: String(err && err.message || err),
            name: err && err.name || null,
            code: err && err.resultCode || null,
            status: status === undefined ? null : status,
          },
        };
      }
      statusById.delete(call.packetId);
    }
  };
  await Promise.all(Array.from({ length: Math.min(options.concurrency, options.count) }, worker));

  for (const outcome of outcomes) {
    report.latency_ms.push(round(outcome.latency));
    if (outcome.ok) {
      report.ok += 1;
      report.results.push(outcome.result === undefined ? null : outcome.result);
    } else {
      report.errors.push(outcome.error);
    }
  }

  await Promise.race([ client.close(), new Promise(resolve => setTimeout(resolve, 1000)) ]);
  process.stdout.write(JSON.stringify(report) + '\n', () => process.exit(0));
}

main().catch(die);
