"""Online multi-interest recommendation service (no torch, no trainer imports)."""
