"""``shoal ratelimit``: a global rate limit service speaking Envoy's
``envoy.service.ratelimit.v3.RateLimitService`` protocol, with counters in Redis so every
proxy that asks it shares one budget.

- :mod:`.config` reads the YAML descriptors (the format of Envoy's reference service,
  envoyproxy/ratelimit) and finds the limit of a request descriptor.
- :mod:`.limiter` is the sans-IO core: a request becomes Redis increments, the counts
  become the response and the stats.
- :mod:`.store` keeps the fixed-window counters in Redis.
- :mod:`.stats` holds the counters and renders them (Prometheus text, or dotted names).
- :mod:`.service` is the grpc.aio server, the HTTP endpoint (``/stats``, ``/ready``) and
  the process lifecycle.

See docs/ratelimit.md.
"""
