"""Shared code of the four scripts: streaming I/O, adapters, precision, metrics, reports."""
