"""Small gRPC programs run as their own processes (gRPC's xDS client is one per process)."""
