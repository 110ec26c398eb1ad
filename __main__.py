"""``python -m tiergate`` runs the tiergate CLI."""

from tiergate.gateway.cli import main

main()
