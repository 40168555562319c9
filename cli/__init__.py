"""The `inco` command line."""
