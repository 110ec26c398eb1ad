"""tiergate workers: everything that computes a decision (settings, schemas, tiers, cascade)."""
