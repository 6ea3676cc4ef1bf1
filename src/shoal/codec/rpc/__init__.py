"""RPC protocols (MOSN's x-protocol): one sans-IO codec contract, one module a protocol."""
