"""tiergate workers: everything that computes a decision (settings, schemas, tiers, cascade)."""

__version__ = "0.1.0"
