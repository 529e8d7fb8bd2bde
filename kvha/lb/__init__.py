"""Load-balancer pair (see the load-balancer issue)."""
