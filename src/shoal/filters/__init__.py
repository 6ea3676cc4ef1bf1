"""HTTP filters that run before the router (Envoy's filter chain, minus the router)."""
