"""``python -m orchestrator_data`` runs the CLI."""

from orchestrator_data.cli import main

main()
