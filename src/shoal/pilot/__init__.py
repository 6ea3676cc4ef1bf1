"""shoal pilot: the control plane. Registries and Istio-style rules in, xDS v3 out."""
