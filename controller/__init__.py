"""controller: make the cluster match the spec (make it so)."""
