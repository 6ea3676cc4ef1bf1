// One bidirectional gRPC stream for bench/h2.py, on Node's http2 module (nghttp2 in C).
//
//   node bench/h2-echo.js server PORT
//       h2c server: any stream gets :status 200, content-type application/grpc, its request
//       body echoed back as it arrives (gRPC messages echoed byte for byte are valid gRPC
//       messages), then the trailer grpc-status 0 once the request has ended. Prints READY.
//   node bench/h2-echo.js client PORT SECONDS [MESSAGE_BYTES]
//       one POST /bench.Echo/Bidi stream: writes gRPC messages of MESSAGE_BYTES (default
//       65536) for SECONDS as fast as flow control lets it, half-closes, reads the echo to
//       the end, and prints one JSON line: bytes sent and received, seconds, the trailers.
//
// Both ends advertise 1 MiB stream and 16 MiB connection windows, whichever proxy is
// between them.
"use strict";
const http2 = require("http2");

const STREAM_WINDOW = 1 << 20;
const CONNECTION_WINDOW = 16 << 20;
const settings = { initialWindowSize: STREAM_WINDOW };

function server(port) {
  const srv = http2.createServer({ settings });
  srv.on("session", (session) => session.setLocalWindowSize(CONNECTION_WINDOW));
  srv.on("stream", (stream) => {
    stream.respond(
      { ":status": 200, "content-type": "application/grpc" },
      { waitForTrailers: true },
    );
    stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
    stream.on("error", () => {});
    stream.pipe(stream);
  });
  srv.listen(port, "127.0.0.1", () => console.log("READY"));
}

function client(port, seconds, size) {
  const message = Buffer.alloc(5 + size, 0x78);
  message[0] = 0; // not compressed
  message.writeUInt32BE(size, 1);
  const session = http2.connect(`http://127.0.0.1:${port}`, { settings });
  session.on("error", (err) => fail(`session: ${err.message}`));
  session.on("connect", () => session.setLocalWindowSize(CONNECTION_WINDOW));
  const req = session.request({
    ":method": "POST",
    ":path": "/bench.Echo/Bidi",
    "content-type": "application/grpc",
    te: "trailers",
  });
  let sent = 0;
  let received = 0;
  let status = 0;
  let trailers = {};
  let stop = false;
  const start = process.hrtime.bigint();
  setTimeout(() => {
    stop = true;
  }, seconds * 1000);
  function pump() {
    while (!stop) {
      sent += message.length;
      if (!req.write(message)) {
        req.once("drain", pump);
        return;
      }
    }
    req.end();
  }
  req.on("response", (headers) => {
    status = headers[":status"];
  });
  req.on("data", (chunk) => {
    received += chunk.length;
  });
  req.on("trailers", (t) => {
    trailers = t;
  });
  req.on("error", (err) => fail(`stream: ${err.message}`));
  req.on("end", () => {
    const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
    const grpcStatus = trailers["grpc-status"] ?? null;
    console.log(JSON.stringify({ sent, received, seconds: elapsed, status, grpcStatus }));
    session.close();
  });
  pump();
}

function fail(why) {
  console.log(JSON.stringify({ error: why }));
  process.exit(1);
}

const [mode, port, ...rest] = process.argv.slice(2);
if (mode === "server") {
  server(Number(port));
} else if (mode === "client") {
  client(Number(port), Number(rest[0]), Number(rest[1] || 65536));
} else {
  console.error("usage: h2-echo.js server PORT | client PORT SECONDS [MESSAGE_BYTES]");
  process.exit(2);
}
