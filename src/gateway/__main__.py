"""``python -m gateway`` runs the tiergate CLI."""

from gateway.cli import main

main()
