"""One module per `merge-lab` subcommand."""
