"""How a run ends when it cannot go on: exceptions light enough for the CLI to import."""
from __future__ import annotations


class DriverGone(Exception):
    """Raised in a replica whose driver's lease expired: the replica stops."""


class RunLost(RuntimeError):
    """Training cannot continue: ``lost`` names what is gone, ``checkpoint`` the last complete
    checkpoint (or None)."""

    def __init__(self, lost: str, checkpoint=None):
        self.lost, self.checkpoint = lost, None if checkpoint is None else str(checkpoint)
        super().__init__(f"lost {lost}; last complete checkpoint: {self.checkpoint or 'none'}")
