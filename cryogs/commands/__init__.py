"""One module per ``cryogs`` subcommand, each with ``add_args(parser)`` and ``main(args)``."""
