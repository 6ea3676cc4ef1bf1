"""Where services come from: one Registry interface, several sources."""
