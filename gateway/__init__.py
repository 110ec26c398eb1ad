"""tiergate gateway: the front doors (HTTP API, CLI, producer client)."""
