"""The supervisor process: store, admin API, shared memory and the worker slots."""
