"""The demo mesh and its sample service (also the upstream the test suite proxies to)."""
