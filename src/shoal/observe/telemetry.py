"""The proxy process's telemetry: who it is, its Istio series and its span exporters.

Like Envoy's local info, the identity comes from the bootstrap's node once, at start (a
changed node needs a restart, as in Envoy). Listener contexts read it when they are built;
the admin API adds the series and exporter counters to each scrape, and shutdown sends the
spans still queued.
"""

from __future__ import annotations

from shoal.config.model import Node
from shoal.observe.export import EXPORTERS, Exporters
from shoal.observe.istio import METRICS, UNKNOWN_WORKLOAD, IstioMetrics, Workload, local_workload
from shoal.observe.stats import Snapshot
from shoal.observe.tracing import LocalInfo


class Telemetry:
    def __init__(self, metrics: IstioMetrics, exporters: Exporters) -> None:
        self.metrics = metrics
        self.exporters = exporters
        self.workload: Workload = UNKNOWN_WORKLOAD
        self.service = ""  # the service host this proxy fronts (node metadata SERVICE)
        self.info = LocalInfo()

    def configure(self, node: Node) -> None:
        """Take the proxy's identity from the bootstrap node (before listeners are built)."""
        self.workload, self.service = local_workload(node)
        self.info = LocalInfo(node_id=node.id, cluster=node.cluster)

    def contribute(self, snapshot: Snapshot) -> None:
        """Add Istio's series and the exporters' ``tracing.*`` counters to a scrape."""
        self.metrics.contribute(snapshot)
        snapshot.counters.update(self.exporters.counters())

    async def close(self) -> None:
        """Send the spans still queued (bounded wait) and close exporter channels."""
        await self.exporters.close()


TELEMETRY = Telemetry(METRICS, EXPORTERS)
