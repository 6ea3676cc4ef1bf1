#!/usr/bin/env node
/*
 * server.js — a real Dubbo or SOFA Bolt RPC server for Shoal's integration tests.
 *
 *   node server.js --protocol dubbo|bolt --port N --label v1
 *                  [--interface com.example.Greeter] [--version 1.0.0] [--group g]
 *                  [--delay-ms 0] [--fail-method NAME ...]
 *
 * It is sofa-rpc-node's RpcServer, speaking Bolt (sofa-bolt-node, its default protocol:
 * Bolt v1 frames, Hessian2 bodies) or Dubbo (dubbo-remoting plugged in as the protocol:
 * Dubbo 2.x frames, Hessian2 bodies). It listens on 127.0.0.1 only (--port 0 picks a free
 * port), prints exactly one line `READY <port>` to stdout once listening, logs to stderr,
 * and exits 0 on SIGTERM / SIGINT.
 *
 * It exposes one service, --interface (default com.example.Greeter), with:
 *   sayHello(String name) -> "<label>: hello <name>"
 *   echo(Object value)    -> value, as received
 *   whoami()              -> a JSON string: label, protocol, interface, version, group,
 *                            port, pid, served (calls so far), service (the signature the
 *                            request named), attachments (Dubbo attachments / Bolt request
 *                            props), headers (the Bolt header map; null for Dubbo) and
 *                            timeout (the Bolt request's timeout field; null for Dubbo)
 *   slow(int ms)          -> answers "<label>: slept <ms>ms" after ms milliseconds
 *   boom()                -> throws an application error ("<label>: boom"); sofa-rpc-node
 *                            answers it as a failed call: Dubbo status 80 (SERVER_ERROR)
 *                            with the message, Bolt respstatus 2 (SERVER_EXCEPTION) with
 *                            an RpcServerException body
 *   appException()        -> returns an application exception the way Java providers do:
 *                            an OK response carrying the exception (Dubbo status 20 +
 *                            RESPONSE_WITH_EXCEPTION; Bolt success + a SofaResponse whose
 *                            appResponse is the exception)
 * --delay-ms delays every answer; each --fail-method NAME (repeatable, or comma separated)
 * makes that method throw as boom does.
 *
 * A request must name the service exactly as the server exports it: the version (and for
 * Bolt the uniqueId, which is what --group sets) are part of the signature, and a Dubbo
 * request's `group` attachment must equal --group, as in Dubbo itself. Otherwise the call
 * fails with a "not found service" remote error.
 */
'use strict';

const net = require('net');
const { RpcServer, RpcService } = require('sofa-rpc-node').server;
const {
  UsageError, parseCli, die, protocolOf, parseInteger, serviceSignature, stderrLogger,
  boltRequestHeaders, observeDecodedFrames,
} = require('./common');

const USAGE = `usage: node server.js --protocol dubbo|bolt --port N --label LABEL
                      [--interface com.example.Greeter] [--version 1.0.0] [--group G]
                      [--delay-ms 0] [--fail-method NAME ...]`;

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

function parseOptions() {
  const values = parseCli({
    protocol: { type: 'string' },
    port: { type: 'string' },
    label: { type: 'string' },
    interface: { type: 'string', default: 'com.example.Greeter' },
    version: { type: 'string', default: '1.0.0' },
    group: { type: 'string', default: '' },
    'delay-ms': { type: 'string', default: '0' },
    'fail-method': { type: 'string', multiple: true, default: [] },
    help: { type: 'boolean', short: 'h' },
  }, USAGE);
  for (const required of [ 'protocol', 'port', 'label' ]) {
    if (values[required] === undefined) throw new UsageError(`--${required} is required\n${USAGE}`);
  }
  protocolOf(values.protocol);
  const port = parseInteger('port', values.port, 0);
  if (port > 65535) throw new UsageError(`--port must be <= 65535, not ${port}`);
  if (!values.interface) throw new UsageError('--interface must not be empty');
  return {
    protocol: values.protocol,
    port,
    label: values.label,
    interface: values.interface,
    version: values.version,
    group: values.group,
    delayMs: parseInteger('delay-ms', values['delay-ms'], 0),
    failMethods: new Set(values['fail-method'].flatMap(names => names.split(',')).filter(Boolean)),
  };
}

/** sofa-rpc-node's RpcServer, bound to 127.0.0.1 and handing each call its request. */
class LoopbackRpcServer extends RpcServer {
  // Same as RpcServer#_startServer, but bound to the loopback address only.
  _startServer(port) {
    const server = net.createServer();
    server.once('error', err => { this.emit('error', err); });
    server.on('connection', socket => { this._handleSocket(socket); });
    server.listen(port, '127.0.0.1', () => {
      if (port === this.publishPort && port === 0) {
        this.publishPort = server.address().port;
      }
    });
    return server;
  }

  // The service methods run with this as `this`, so whoami can see the request.
  createContext(req, res) {
    return { req, res };
  }
}

/**
 * An RpcService keyed by the signature clients send (see serviceSignature), and for
 * Dubbo also checking the group attachment, as a Dubbo provider does.
 */
function serviceClassFor(options) {
  return class GreeterService extends RpcService {
    constructor(serviceOptions) {
      super(serviceOptions);
      this.id = serviceSignature(options.protocol, options.interface, options.version, options.group);
    }

    async invoke(ctx, req, res) {
      const props = req.data.requestProps || {};
      if (options.protocol === 'dubbo' && (props.group || '') !== options.group) {
        const wanted = (props.group ? props.group + '/' : '') + req.data.serverSignature;
        throw new Error(`not found service: ${wanted} (this server exports ` +
          `${options.group ? options.group + '/' : ''}${this.id})`);
      }
      return super.invoke(ctx, req, res);
    }

    convertResult(req, result) {
      // dubbo-remoting writes a falsy result (null, 0, false, '') without the result-flag
      // byte, which breaks the client's decoding; as a typed value it goes out as
      // RESPONSE_VALUE + the Hessian2 value, as a Java provider would send it.
      if (options.protocol === 'dubbo' && !result) result = typedFalsy(result);
      return super.convertResult(req, result);
    }
  };
}

function typedFalsy(value) {
  switch (typeof value) {
    case 'boolean': return { $class: 'java.lang.Boolean', $: value };
    case 'string': return { $class: 'java.lang.String', $: value };
    case 'number': return { $class: Number.isInteger(value) ? 'java.lang.Integer' : 'java.lang.Double', $: value };
    default: return { $class: 'java.lang.Object', $: null };
  }
}

function greeter(options, server) {
  let served = 0;
  const failure = name => {
    const err = new Error(`${options.label}: ${name}`);
    err.name = 'GreeterException';
    err.ignoreLog = true; // expected: keep stderr for real problems
    return err;
  };
  // Every method goes through here: count, apply --delay-ms, fail if asked to.
  const answer = async (name, produce) => {
    served += 1;
    if (options.delayMs) await sleep(options.delayMs);
    if (name === 'boom' || options.failMethods.has(name)) throw failure(name);
    return produce();
  };
  return {
    async sayHello(name) {
      return answer('sayHello', () => `${options.label}: hello ${name}`);
    },
    async echo(value) {
      return answer('echo', () => value);
    },
    async whoami() {
      const req = this.req; // `this` is the context LoopbackRpcServer#createContext made
      return answer('whoami', () => JSON.stringify({
        label: options.label,
        protocol: options.protocol,
        interface: options.interface,
        version: options.version,
        group: options.group,
        port: server.publishPort,
        pid: process.pid,
        served,
        service: req.data.serverSignature,
        attachments: req.data.requestProps || {},
        headers: req.data.boltHeaders || null,
        timeout: req.options.timeout === undefined ? null : req.options.timeout,
      }));
    },
    async slow(ms) {
      return answer('slow', async () => {
        await sleep(Number(ms) || 0);
        return `${options.label}: slept ${ms}ms`;
      });
    },
    async boom() {
      return answer('boom', () => null);
    },
    async appException() {
      return answer('appException', () => failure('appException'));
    },
  };
}

async function main() {
  const options = parseOptions();
  const { protocol } = protocolOf(options.protocol);
  const logger = stderrLogger(`server ${options.label}`);

  if (options.protocol === 'bolt') {
    // Keep the Bolt header map of each request, for whoami.
    observeDecodedFrames('bolt', (packet, decoded) => {
      if (decoded.packetType === 'request' && decoded.data) {
        decoded.data.boltHeaders = boltRequestHeaders(packet);
      }
    });
  }

  const server = new LoopbackRpcServer({
    logger,
    protocol,
    port: options.port,
    serviceClass: serviceClassFor(options),
    killTimeout: 3000,
  });
  // Failed calls (unknown service, a thrown error) are reported to the caller; note them.
  server.on('error', err => logger.warn('%s', err && err.message || err));
  server.addService({
    interfaceName: options.interface,
    version: options.version,
    uniqueId: options.protocol === 'bolt' ? options.group : '',
  }, greeter(options, server));
  await server.start();

  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    setTimeout(() => process.exit(0), 2000).unref();
    try {
      await server.close();
    } finally {
      process.exit(0);
    }
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);

  process.stdout.write(`READY ${server.publishPort}\n`);
}

main().catch(die);
