"""``python -m edgeos`` runs the command line."""

from edgeos.cli.main import main

main()
