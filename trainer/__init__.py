"""Offline trainer: data, IBIM encoders, evaluation and the command line."""
