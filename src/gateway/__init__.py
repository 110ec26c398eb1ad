"""tiergate gateway: the front doors (CLI now; HTTP API and producer client later)."""
