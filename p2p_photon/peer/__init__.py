"""A volunteer trainer: join, sync, train, average, checkpoint (see loop.py for the algorithm)."""

from .contribution import ContributionPolicy
from .loop import Peer, run_peer
from .parts import FingerprintMismatch
from .reporting import RoundReport
from .training import RoundStats

__all__ = ["ContributionPolicy", "FingerprintMismatch", "Peer", "RoundReport", "RoundStats", "run_peer"]
