"""The xDS client: subscribe to a management server over ADS, ACK what applies, NACK what
does not, and keep the last good config when the server is away.

The resource type URLs live here, without the client's gRPC imports, so that pilot (the
server side) names the same four types from the same place."""

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_URLS = (CLUSTER, ENDPOINT, LISTENER, ROUTE)  # the order Envoy wants updates in
