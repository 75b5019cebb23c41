"""The ``train`` and ``eval`` subcommands of each method; one module per method, registered in cli.py."""
