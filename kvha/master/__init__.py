"""Master node: client protocols and routing (see the master-node issues)."""
