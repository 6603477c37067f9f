"""Assignment: a user's stable point in [0, 1) and the variant whose interval holds it."""

from __future__ import annotations

import hashlib

from service.ab.spec import VariantSpec


def user_point(experiment: str, user_id: str) -> float:
    """The user's stable point in [0, 1) for this experiment (see the module docstring)."""
    digest = hashlib.sha256(f"{experiment}\n{user_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Assigner:
    """User id -> variant name, by the shares in the order given."""

    def __init__(self, specs: list[VariantSpec], experiment: str) -> None:
        self.experiment = experiment
        self.bounds: list[tuple[float, str]] = []
        total = 0.0
        for spec in specs:
            if spec.share > 0:  # a variant at 0 is loaded but gets nobody
                total += spec.share
                self.bounds.append((total, spec.name))
        if not self.bounds:
            raise ValueError("no variant has a share above 0")

    def variant(self, user_id: str) -> str:
        point = user_point(self.experiment, user_id)
        for bound, name in self.bounds:
            if point < bound:
                return name
        return self.bounds[-1][1]  # a rounding remainder of the shares' sum


def user_digest(user_id: str) -> str:
    """What a request id remembers of its user: enough to tell another user's event apart,
    16 bytes of Redis memory whatever the id's length."""
    return hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
