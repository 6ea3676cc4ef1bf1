"""Istio's standard metrics: who called whom and how it went, in Istio's names and labels.

A listener with Shoal's ``istio_stats`` filter reports each request (or TCP connection) as
one side of a call: ``source`` (outbound, the caller's proxy) or ``destination`` (inbound,
the callee's). The other side's identity comes from peer metadata exchange, as in Istio:
the source proxy adds ``x-shoal-peer`` (its workload, compactly) to the request; the
destination proxy reads and strips it and answers with its own on the response, which the
source reads and strips. A peer that sent none is ``unknown``, as in Istio; so is every
peer of TCP and RPC listeners, whose bytes Shoal does not rewrite.

Hot path: a request costs one tuple, one dict lookup and three histogram records. Its
series is cached under the raw inputs (peer header, cluster, authority, status, flags);
labels are worked out once per combination and rendered only at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from shoal.config.model import IstioStats, Node
from shoal.observe.stats import LABEL_ESCAPES, Histogram, Snapshot

UNKNOWN = "unknown"
PEER_HEADER = b"x-shoal-peer"
PEER_HEADERS = frozenset({PEER_HEADER})
# series per kind before new label sets fold into one "unknown peer" series (peer headers
# and authorities come from clients: they must not grow memory without bound)
MAX_SERIES = 10_000
_MAX_PEER_BYTES = 1024

HTTP_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
TCP_LABELS = tuple(n for n in HTTP_LABELS if n not in ("response_code", "grpc_response_status"))

# the proxy's own answers to RPC calls, as the HTTP status Istio's dashboards read
RequestKey = tuple[bytes, str, bytes, int, str]
# an HTTP/2 stream's: the same, then request_protocol ("grpc" or "http") and grpc-status
StreamKey = tuple[bytes, str, bytes, int, str, str, str]
_RPC_CODES = {"NR": 404, "UH": 503, "UF": 503, "UT": 504, "RL": 429, "UO": 503, "DPE": 400}


@dataclass(frozen=True, slots=True)
class Workload:
    """One side of a call, as Istio's labels describe it."""

    name: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"
    cluster: str = UNKNOWN

    def encode(self) -> bytes:
        """The ``x-shoal-peer`` value: ``key=value`` pairs joined by ``;``, values
        percent-encoded, defaults left out."""
        return ";".join(
            f"{key}={quote(getattr(self, name), safe='')}"
            for key, name, default in _WIRE
            if getattr(self, name) != default
        ).encode("ascii")

    @classmethod
    def decode(cls, value: bytes) -> Workload:
        """A peer's header; unknown keys are skipped, a malformed value is an unknown peer."""
        if len(value) > _MAX_PEER_BYTES:
            return UNKNOWN_WORKLOAD
        known: dict[str, str] = {}
        for pair in value.decode("latin-1").split(";"):
            key, sep, text = pair.partition("=")
            name = _BY_KEY.get(key)
            if sep and name is not None and text:
                known[name] = unquote(text)
        return cls(**known)


_WIRE = tuple(
    (key, f.name, f.default)
    for key, f in zip("wnavsrc", fields(Workload), strict=True)  # one letter per field
)
_BY_KEY = {key: name for key, name, _ in _WIRE}
UNKNOWN_WORKLOAD = Workload()


def local_workload(node: Node) -> tuple[Workload, str]:
    """This proxy's workload and the service host it serves, from the bootstrap node:
    ``WORKLOAD_NAME`` (else ``node.cluster``), ``NAMESPACE``, ``CLUSTER_ID``, ``LABELS``
    (``app``, ``version`` and Istio's canonical-name/-revision, with Istio's fallbacks)
    and ``SERVICE`` (``host[:port]``)."""
    metadata = node.metadata
    raw_labels = metadata.get("LABELS")
    labels = {str(k): str(v) for k, v in raw_labels.items()} if isinstance(raw_labels, dict) else {}
    # node.cluster is the service cluster, which shoal bootstrap writes as host[:port]
    name = _text(metadata.get("WORKLOAD_NAME")) or _host(node.cluster) or UNKNOWN
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or ""
    version = labels.get("version") or labels.get("app.kubernetes.io/version") or ""
    workload = Workload(
        name=name,
        namespace=_text(metadata.get("NAMESPACE")) or UNKNOWN,
        app=app or UNKNOWN,
        version=version or UNKNOWN,
        canonical_service=labels.get("service.istio.io/canonical-name") or app or name,
        canonical_revision=labels.get("service.istio.io/canonical-revision") or version or "latest",
        cluster=_text(metadata.get("CLUSTER_ID")) or UNKNOWN,
    )
    return workload, _host(_text(metadata.get("SERVICE")))


def _host(host_port: str) -> str:
    """``host`` of ``host:port`` (or of a bare host)."""
    host, _, port = host_port.rpartition(":")
    return host if port.isdigit() else host_port


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def rpc_response_code(ok: bool, flags: str) -> int:
    """An RPC call's outcome as the HTTP status Istio's dashboards count: 200 for a
    successful answer, 500 for an error answer, the proxy's own answers by their flag."""
    if ok:
        return 200
    return _RPC_CODES.get(flags, 500)


@dataclass(slots=True)
class RequestSeries:
    count: int = 0
    duration: Histogram = field(default_factory=Histogram)
    request_bytes: Histogram = field(default_factory=Histogram)
    response_bytes: Histogram = field(default_factory=Histogram)


@dataclass(slots=True)
class TcpSeries:
    opened: int = 0
    closed: int = 0
    sent: int = 0
    received: int = 0


class IstioMetrics:
    """The process's series, shared by every listener and config version (counters are
    cumulative across reloads, as Istio's)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], RequestSeries] = {}
        self.tcp: dict[tuple[str, ...], TcpSeries] = {}

    def contribute(self, snapshot: Snapshot) -> None:
        """Add every series to a scrape, under Istio's metric names."""
        if self.requests:
            total = snapshot.labelled_counters.setdefault("istio_requests_total", {})
            histograms = {
                metric: snapshot.labelled_histograms.setdefault(metric, {})
                for metric in (
                    "istio_request_duration_milliseconds",
                    "istio_request_bytes",
                    "istio_response_bytes",
                )
            }
            for values, series in self.requests.items():
                text = _label_text(HTTP_LABELS, values)
                total[text] = series.count
                histograms["istio_request_duration_milliseconds"][text] = series.duration
                histograms["istio_request_bytes"][text] = series.request_bytes
                histograms["istio_response_bytes"][text] = series.response_bytes
        for values, tcp in self.tcp.items():
            text = _label_text(TCP_LABELS, values)
            for metric, value in (
                ("istio_tcp_connections_opened_total", tcp.opened),
                ("istio_tcp_connections_closed_total", tcp.closed),
                ("istio_tcp_sent_bytes_total", tcp.sent),
                ("istio_tcp_received_bytes_total", tcp.received),
            ):
                snapshot.labelled_counters.setdefault(metric, {})[text] = value


METRICS = IstioMetrics()


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(
        f'{name}="{value.translate(LABEL_ESCAPES)}"'
        for name, value in zip(names, values, strict=True)
    )


class IstioReporter:
    """One listener's reporting: the peer headers it adds and the series it counts into.

    ``request_line`` (``request_value`` alone) is the header line a source proxy adds to
    requests; ``response_line`` (``response_value`` alone) what a destination proxy answers
    with (empty on the other side)."""

    __slots__ = (
        "_cache",
        "_stream_cache",
        "destination",
        "local",
        "metrics",
        "protocol",
        "request_line",
        "request_value",
        "response_line",
        "response_value",
        "service",
    )

    def __init__(
        self,
        config: IstioStats,
        local: Workload,
        service: str,
        protocol: str = "http",
        metrics: IstioMetrics = METRICS,
    ) -> None:
        self.destination = config.reporter == "destination"
        self.local = local
        self.service = service
        self.protocol = protocol
        self.metrics = metrics
        header = local.encode()
        self.request_line = b"" if self.destination else PEER_HEADER + b": " + header + b"\r\n"
        self.request_value = b"" if self.destination else header
        self.response_value = header if self.destination else b""
        self.response_line = PEER_HEADER + b": " + header + b"\r\n" if self.destination else b""
        self._cache: dict[RequestKey, RequestSeries] = {}
        self._stream_cache: dict[StreamKey, RequestSeries] = {}

    def record(self, key: RequestKey, duration: float, received: int, sent: int) -> None:
        """Count one finished request: ``key`` is (peer header, cluster, authority, status,
        response flags), ``duration`` in seconds, body bytes each way."""
        series = self._cache.get(key)
        if series is None:
            if len(self._cache) >= MAX_SERIES:
                self._cache.clear()
            peer, cluster, authority, status, flags = key
            labels = (
                *self._labels(peer, cluster, authority),
                self.protocol,
                str(status),
                "",  # grpc_response_status: gRPC needs HTTP/2
                flags,
                self._security(),
            )
            series = self._cache[key] = _series(self.metrics.requests, labels, RequestSeries)
        series.count += 1
        series.duration.record(duration * 1000.0)
        series.request_bytes.record(received)
        series.response_bytes.record(sent)

    def record_stream(self, key: StreamKey, duration: float, received: int, sent: int) -> None:
        """Count one finished HTTP/2 stream: ``key`` is (peer header, cluster, authority,
        :status, response flags, request_protocol, grpc-status or "")."""
        series = self._stream_cache.get(key)
        if series is None:
            if len(self._stream_cache) >= MAX_SERIES:
                self._stream_cache.clear()
            peer, cluster, authority, status, flags, protocol, grpc_status = key
            labels = (
                *self._labels(peer, cluster, authority),
                protocol,
                str(status),
                grpc_status,
                flags,
                self._security(),
            )
            series = self._stream_cache[key] = _series(self.metrics.requests, labels, RequestSeries)
        series.count += 1
        series.duration.record(duration * 1000.0)
        series.request_bytes.record(received)
        series.response_bytes.record(sent)

    def record_tcp(self, session: Any) -> None:
        """A tcp_proxy connection ended (an access-log sink). Without peer metadata Istio
        reports a connection once, when it closes; so does Shoal."""
        flags = str(session.response_flags)
        labels = (
            *self._labels(b"", str(session.upstream_cluster), b""),
            "tcp",
            flags,
            self._security(),
        )
        tcp = _series(self.metrics.tcp, labels, TcpSeries)
        tcp.opened += 1
        tcp.closed += 1
        tcp.received += int(session.bytes_received)
        tcp.sent += int(session.bytes_sent)

    def _security(self) -> str:
        # no mTLS yet: Istio says "none" on the server side and "unknown" on the client's
        return "none" if self.destination else UNKNOWN

    def _labels(self, peer: bytes, cluster: str, authority: bytes) -> tuple[str, ...]:
        """reporter, the source's eight labels, then the destination's eleven."""
        remote = Workload.decode(peer) if peer else UNKNOWN_WORKLOAD
        source, destination = (remote, self.local) if self.destination else (self.local, remote)
        # the service: the node's SERVICE inbound, the host in Istio's cluster names
        # (outbound|80||reviews.default.svc.cluster.local), else the request's authority
        host = self.service if self.destination else ""
        if not host and "|" in cluster:
            host = cluster.rpartition("|")[2]
        if host:
            name = host.partition(".")[0]
        else:
            host = name = _without_port(authority.decode("latin-1")) if authority else ""
        parts = host.split(".")
        namespace = parts[1] if len(parts) > 2 and parts[2] == "svc" else ""
        if self.destination:
            namespace = self.local.namespace
            host = host or self.local.canonical_service
            name = name or self.local.canonical_service
        return (
            "destination" if self.destination else "source",
            source.name,
            source.canonical_service,
            source.canonical_revision,
            source.namespace,
            UNKNOWN,  # source_principal: no mTLS yet
            source.app,
            source.version,
            source.cluster,
            destination.name,
            destination.namespace,
            UNKNOWN,  # destination_principal
            destination.app,
            destination.version,
            host or UNKNOWN,
            destination.canonical_service,
            destination.canonical_revision,
            name or UNKNOWN,
            namespace or destination.namespace,
            destination.cluster,
        )


_S = TypeVar("_S", RequestSeries, TcpSeries)


def _series(store: dict[tuple[str, ...], _S], labels: tuple[str, ...], kind: type[_S]) -> _S:
    """The series for ``labels``; past MAX_SERIES a new label set is counted with every
    peer-side label unknown (one series per reporter, status and flags)."""
    series = store.get(labels)
    if series is not None:
        return series
    if len(store) >= MAX_SERIES:
        labels = (labels[0], *([UNKNOWN] * 19), *labels[20:])
        series = store.get(labels)
        if series is not None:
            return series
    series = store[labels] = kind()
    return series


def _without_port(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    return authority.partition(":")[0]
