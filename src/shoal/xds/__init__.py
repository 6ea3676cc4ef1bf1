"""The xDS client: subscribe to a management server over ADS, ACK what applies, NACK what
does not, and keep the last good config when the server is away."""
