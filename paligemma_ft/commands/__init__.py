"""The `paligemma-ft` command and its subcommands (thin layers over the library)."""
