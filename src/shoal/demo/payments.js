#!/usr/bin/env node
/*
 * payments.js — the demo shop's payments service: a real Dubbo provider, so that the shop's
 * RPC hop crosses Shoal's Dubbo codec between two implementations that are not Shoal's.
 *
 *   node payments.js --port N
 *
 * sofa-rpc-node's RpcServer with dubbo-remoting as its protocol (Dubbo 2 frames, Hessian2
 * bodies), the packages tests/rpc_peers installs (`make setup`); `python -m shoal.demo`
 * runs it with NODE_PATH pointing there. It listens on 127.0.0.1 only, prints
 * `READY <port>` once listening, and exits 0 on SIGTERM / SIGINT.
 *
 * It exports com.shoal.demo.Payments, version 1.0.0, with one method:
 *   charge(String order, int cents, String card) -> "receipt <order>: <cents> cents"
 * A card ending in 0002 is declined: the call fails with a remote error (Dubbo status 80,
 * SERVER_ERROR), which the proxy counts as an RPC error, as it would a Java provider's.
 */
'use strict';

const net = require('net');
const util = require('util');
const { RpcServer } = require('sofa-rpc-node').server;
const dubbo = require('dubbo-remoting');

const INTERFACE = 'com.shoal.demo.Payments';
const VERSION = '1.0.0';

/** RpcServer bound to 127.0.0.1: its own _startServer listens on every interface. */
class LoopbackRpcServer extends RpcServer {
  _startServer(port) {
    const server = net.createServer();
    server.once('error', err => { this.emit('error', err); });
    server.on('connection', socket => { this._handleSocket(socket); });
    server.listen(port, '127.0.0.1');
    return server;
  }
}

const quiet = () => {};
const logger = {
  debug: quiet,
  info: quiet,
  warn: (...args) => process.stderr.write(`[payments] WARN ${util.format(...args)}\n`),
  error: (...args) => process.stderr.write(`[payments] ERROR ${util.format(...args)}\n`),
};

async function main() {
  const { values } = util.parseArgs({ options: { port: { type: 'string' } } });
  const port = Number(values.port);
  if (!Number.isInteger(port) || port <= 0) {
    throw new Error('usage: node payments.js --port N');
  }
  const server = new LoopbackRpcServer({ logger, protocol: dubbo, port, killTimeout: 2000 });
  server.addService({ interfaceName: INTERFACE, version: VERSION }, {
    async charge(order, cents, card) {
      if (String(card).endsWith('0002')) {
        const declined = new Error(`card declined for ${order}`);
        declined.ignoreLog = true; // the demo's load sends such cards on purpose
        throw declined;
      }
      return `receipt ${order}: ${cents} cents`;
    },
  });
  await server.start();
  const stop = () => {
    setTimeout(() => process.exit(0), 1000).unref();
    server.close().finally(() => process.exit(0));
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  process.stdout.write(`READY ${port}\n`);
}

main().catch(err => {
  process.stderr.write(`[payments] ${err && err.stack || err}\n`);
  process.exit(1);
});
