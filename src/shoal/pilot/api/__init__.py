"""Traffic rules: Istio's resource kinds (and later Shoal's own), parsed and validated."""
