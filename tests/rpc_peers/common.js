/*
 * common.js — shared helpers for Shoal's real Dubbo / SOFA Bolt test peers
 * (server.js and client.js).
 *
 * Both peers are built on sofa-rpc-node (RpcServer / RpcClient). The wire protocol is
 * pluggable there: sofa-bolt-node is its default (Bolt v1 + Hessian2), and dubbo-remoting
 * plugs in the Dubbo protocol (Dubbo 2.x exchange frames + Hessian2), as its README shows.
 *
 * On the wire: Bolt frames are Bolt v1 (proto 0x01, codec 1 = hessian2) whose bodies
 * sofa-hessian-node writes in the Hessian 3.x flavour of Hessian2 (class definitions 'O',
 * instances 'o', typed lists 'V'); Dubbo frames carry serialization id 2 (hessian2) with
 * final-spec Hessian 2.0 bodies from hessian.js.
 *
 * This module holds what both sides need: argument parsing with usage errors (exit 2),
 * a quiet stderr logger, the protocol table, and the small view into raw frames that the
 * libraries do not expose (Bolt header maps, response status codes).
 */
'use strict';

const util = require('util');
const boltProtocol = require('sofa-bolt-node');
const boltWire = require('sofa-bolt-node/lib/protocol');
const SimpleMapSerializer = require('sofa-bolt-node/lib/simple_map_serializer');
const dubboProtocol = require('dubbo-remoting');
const dubboWire = require('dubbo-remoting/lib/protocol');

const PROTOCOLS = {
  bolt: { protocol: boltProtocol, wire: boltWire },
  dubbo: { protocol: dubboProtocol, wire: dubboWire },
};

class UsageError extends Error {}

/**
 * Parse argv with util.parseArgs; any problem is a UsageError (the caller exits 2).
 *
 * @param {Object} options - util.parseArgs option specs
 * @param {string} usage - the usage text printed with the error
 * @return {Object} the parsed values
 */
function parseCli(options, usage) {
  let parsed;
  try {
    parsed = util.parseArgs({ args: process.argv.slice(2), options, strict: true, allowPositionals: false });
  } catch (err) {
    throw new UsageError(err.message + '\n' + usage);
  }
  if (parsed.values.help) {
    process.stdout.write(usage + '\n');
    process.exit(0);
  }
  return parsed.values;
}

/**
 * Exit on an error: 2 for usage errors, 1 for anything else.
 *
 * @param {Error} err - the error
 */
function die(err) {
  if (err instanceof UsageError) {
    process.stderr.write('usage error: ' + err.message + '\n');
    process.exit(2);
  }
  process.stderr.write((err && err.stack || String(err)) + '\n');
  process.exit(1);
}

function protocolOf(name) {
  const entry = PROTOCOLS[name];
  if (!entry) {
    throw new UsageError(`--protocol must be one of ${Object.keys(PROTOCOLS).join(', ')}, not ${JSON.stringify(name)}`);
  }
  return entry;
}

function parseInteger(name, text, min) {
  if (!/^-?\d+$/.test(String(text))) {
    throw new UsageError(`--${name} must be an integer, not ${JSON.stringify(text)}`);
  }
  const value = Number(text);
  if (value < min) {
    throw new UsageError(`--${name} must be >= ${min}, not ${value}`);
  }
  return value;
}

/**
 * The service signature both sides use to name a service: what the client puts on the
 * wire and the key the server looks services up by.
 *  - Dubbo: `interface[:version]` (dubbo-remoting turns it into the `path` and `version`
 *    fields; the group travels as the `group` attachment);
 *  - Bolt: SOFARPC's targetServiceUniqueName, `interface:version[:uniqueId]`; a SOFA
 *    service's uniqueId plays the part of a Dubbo group, so --group maps onto it.
 *
 * @param {string} protocolName - bolt or dubbo
 * @param {string} iface - interface name
 * @param {string} version - service version ('' for none)
 * @param {string} group - group / uniqueId ('' for none)
 * @return {string} signature
 */
function serviceSignature(protocolName, iface, version, group) {
  if (protocolName === 'bolt' && group) return `${iface}:${version}:${group}`;
  return version ? `${iface}:${version}` : iface;
}

/**
 * A logger for sofa-rpc-node: warnings and errors go to stderr (stdout belongs to the
 * peer's protocol with the test harness); info and debug only with SHOAL_RPC_PEER_DEBUG=1.
 *
 * @param {string} name - prefix for each line
 * @return {Object} logger
 */
function stderrLogger(name) {
  const verbose = Boolean(process.env.SHOAL_RPC_PEER_DEBUG);
  const write = level => (...args) => {
    process.stderr.write(`[${name}] ${level} ${util.format(...args)}\n`);
  };
  const quiet = () => {};
  return {
    debug: verbose ? write('DEBUG') : quiet,
    info: verbose ? write('INFO') : quiet,
    warn: write('WARN'),
    error: write('ERROR'),
  };
}

/**
 * The Bolt header map of a raw Bolt request frame (v1 or v2). sofa-bolt-node decodes it
 * only for protobuf, but Java SOFARPC always sends it (service, sofa_head_* and the
 * flattened request props), and it is what a proxy routes on.
 *
 * @param {Buffer} packet - one whole Bolt request frame
 * @return {Object|null} the header map
 */
function boltRequestHeaders(packet) {
  const v2 = packet[0] === 0x02;
  const base = v2 ? 16 : 14; // offset of classLen in the fixed header
  const fixed = v2 ? 24 : 22; // length of the fixed request header
  const classLen = packet.readInt16BE(base);
  const headerLen = packet.readInt16BE(base + 2);
  const start = fixed + classLen;
  return SimpleMapSerializer.decode(packet.subarray(start, start + headerLen)) || {};
}

/**
 * The response status of a raw response frame: the Dubbo status byte (20 = OK, 30/31
 * timeouts, 40 bad request, 50 bad response, 60 service not found, 70 service error,
 * 80 server error, 90 client error) or the Bolt respstatus short (0 = success,
 * 2 = server exception, 6 = no processor, 7 = timeout, ...).
 *
 * @param {string} protocolName - bolt or dubbo
 * @param {Buffer} packet - one whole response frame
 * @return {number} status
 */
function responseStatus(protocolName, packet) {
  if (protocolName === 'dubbo') return packet[3];
  return packet[0] === 0x02 ? packet.readInt16BE(12) : packet.readInt16BE(10);
}

/**
 * Observe every frame a protocol decodes: fn(packet, decoded) runs after the library's
 * own decode. The decoders look `protocol.decode` up on the module at each call, so
 * wrapping the module's export is enough and leaves the framing untouched.
 *
 * @param {string} protocolName - bolt or dubbo
 * @param {Function} fn - observer
 */
function observeDecodedFrames(protocolName, fn) {
  const wire = PROTOCOLS[protocolName].wire;
  const decode = wire.decode;
  wire.decode = (packet, options) => {
    const decoded = decode(packet, options);
    fn(packet, decoded);
    return decoded;
  };
}

module.exports = {
  PROTOCOLS,
  UsageError,
  parseCli,
  die,
  protocolOf,
  parseInteger,
  serviceSignature,
  stderrLogger,
  boltRequestHeaders,
  responseStatus,
  observeDecodedFrames,
};
