"""The command line: the click group and its error policy, shared options, one module per verb group."""
