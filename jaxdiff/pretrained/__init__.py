"""Published networks: torch-free weight files, converters and parity-checked loaders."""
