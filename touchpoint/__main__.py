"""``python -m touchpoint`` runs the CLI."""

from touchpoint.cli import main

main()
