"""Overread: the thin application package (settings, CLI, start-up wiring)."""
