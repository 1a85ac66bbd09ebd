"""Per-connection machinery that runs in each worker process."""
