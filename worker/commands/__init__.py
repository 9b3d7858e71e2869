"""Subcommands of the ``sinkstream`` command line, one module per command group."""
