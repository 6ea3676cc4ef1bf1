"""HTTP/2 internals: HPACK and its tables. The connection itself is shoal.codec.http2."""
