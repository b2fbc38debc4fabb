"""The ``sgdm-ldm`` command line. Each subcommand lives in its own module."""
