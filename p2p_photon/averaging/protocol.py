"""Our averaging protocol as plain functions: what a round's result is, which weights are accepted,
how an owner combines its slice, how a member checks what an owner sent back.

Nothing here touches hivemind's internals; `hivemind_backend.py` calls these from inside the
all-reduce, so the arithmetic can be tested against hand-computed values without a network.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from .. import robust
from ..codecs import Codec

ROUND_BITS = 20  # round number -> group bits (wraps after ~1M rounds)


class AveragingFailed(RuntimeError):
    """A round's all-reduce did not complete (no group, timeout, peer failure, inconsistent group)."""


class AveragedWithoutUs(AveragingFailed):
    """Other groups of the swarm already averaged this round (ours finished too late to join them): the
    peer should download the swarm's newer state now rather than retry the round."""


@dataclass
class RoundResult:
    deltas: list[torch.Tensor | None]  # the group's averaged Δ per tensor (None: not averaged this round)
    group_size: int
    gathered: dict[str, dict[str, Any]]  # peer id -> metadata it sent
    bytes_sent: int  # measured: protobuf payloads this peer put on the wire for this all-reduce
    bytes_received: int
    seconds: float
    residual_norm: float = 0.0  # norm of the quantization error carried to the next round
    totals: dict[str, int] | None = None  # steps and samples the average covers (default: the group's)

    def __post_init__(self):
        if self.totals is None:
            self.totals = totals_of(self.gathered)


def totals_of(peers: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """The local steps and samples the members' metadata report, summed."""
    return dict(steps=sum(int(m.get("steps", 0)) for m in peers.values()),
                samples=sum(int(m.get("samples", 0)) for m in peers.values()))


@dataclass
class CombinedPart:
    """What an owner sends back for one part: the encoded bytes (the same for every member), their
    decoding (what the owner itself applies), and the output-quantization error it carries."""

    message: runtime_pb2.Tensor
    decoded: torch.Tensor
    residual: torch.Tensor | None
    dropped: list[int]  # positions of contributions refused as non-finite


# ----------------------------------------------------------------------------- rounds and groups


def group_bits(round_no: int) -> str:
    """hivemind group bits for a round: peers of the same round match, other rounds never do."""
    return format(round_no % (1 << ROUND_BITS), f"0{ROUND_BITS}b")


def digest(x: Any) -> str:
    """Short stable fingerprint of a small value (e.g. the list of active tensors) for group metadata."""
    return hashlib.sha256(repr(x).encode()).hexdigest()[:16]


def gather_metadata(meta: Mapping[str, Any], round_no: int, active: Sequence[int], codec_name: str
                    ) -> dict[str, Any]:
    """What this peer tells its group: the caller's metadata plus what every member must share (round,
    active tensors, codec) and a random nonce that makes the group's consensus key unique."""
    return dict(meta, round=round_no, active=digest(list(active)), codec=codec_name,
                nonce=os.urandom(8).hex())


def check_group(peers: Mapping[str, Any], round_no: int, meta: Mapping[str, Any]) -> None:
    """Every member must have averaged the same round, run, tensors and codec as we did: a mismatch
    means the average is meaningless to us, so the round fails."""
    for pid, m in peers.items():
        if not isinstance(m, dict):
            raise AveragingFailed(f"peer {pid[-8:]} sent malformed metadata")
        if m.get("round") != round_no:
            raise AveragingFailed(f"peer {pid[-8:]} averaged for round {m.get('round')}, "
                                  f"we are in {round_no}")
        for what in ("fingerprint", "active", "codec", "stage"):
            if m.get(what) != meta.get(what):
                raise AveragingFailed(f"peer {pid[-8:]} has {what} {m.get(what)}, ours is {meta.get(what)}")


def banned_message(rejected: Mapping[str, str]) -> str:
    """One log line for peers whose data was refused (they stay out of this run's all-reduces)."""
    why = "; ".join(f"peer {p[-8:]}: {r}" for p, r in sorted(rejected.items()))
    return f"refused the data of {why}; left out of this run's all-reduces from now on"


# ----------------------------------------------------------------------------- senders' weights


def weight_problem(weight: float, cap: float | None, zero_ok: bool = False) -> str | None:
    """Why a sender's weight (its samples this round) is refused, or None: it must be a finite positive
    number no larger than the cap its progress record allows (0 too where `zero_ok`: a broadcast's
    receivers send nothing that counts)."""
    if not (math.isfinite(weight) and (weight > 0 or (zero_ok and weight == 0))):
        return f"weight {weight!r} is not a positive number"
    if cap is not None and weight > cap:
        return f"weight {weight:g} is more than the {cap:g} samples its progress record allows"
    return None


def weight_cap(caps: Mapping[str, float], sender: str) -> float | None:
    """The most samples a sender may claim: its own cap, or, for a peer not in our view yet, no more
    than the largest known cap (None: no caps given, anything finite and positive goes)."""
    cap = caps.get(sender)
    if cap is None and caps:
        cap = max(caps.values())
    return cap


# ----------------------------------------------------------------------------- parts on the wire


def encode_with_feedback(codec: Codec, part: torch.Tensor, residual: torch.Tensor | None
                         ) -> runtime_pb2.Tensor:
    """A sender's part, encoded; what a lossy encoding lost is written into `residual` (a flat view
    of the sender's error-feedback buffer) so that the next round sends it."""
    if residual is None or not codec.lossy:
        return codec.encode(part)
    msg, decoded = codec.roundtrip(part)
    residual.copy_(part.reshape(-1) - decoded)
    return msg


BROADCAST = "broadcast"  # an aggregator mode of the owner: pass on the one weighted contribution unchanged


def broadcast_value(contributions: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor | None:
    """A broadcast's result: the contribution of its one sender with a positive weight, bit for bit
    (no arithmetic, so every group that broadcasts the same value delivers the same bits); None (a
    zero part) if there is not exactly one such sender: the members see that in the group's metadata
    (`check_broadcast`) and fail the round before applying anything."""
    senders = [x for x, w in contributions if w > 0]
    return senders[0].float() if len(senders) == 1 else None


def check_broadcast(peers: Mapping[str, Any]) -> str:
    """The one member of a broadcast group that sends (its metadata says `source`); AveragingFailed
    if there is none (it died or left) or more than one."""
    sources = [p for p, m in peers.items() if m.get("source")]
    if len(sources) != 1:
        raise AveragingFailed(f"the group has {len(sources)} senders of the swarm's average, not one "
                              "(our group's representative left?)")
    return sources[0]


def combine_part(contributions: Sequence[tuple[torch.Tensor, float]], numel: int, *, codec: Codec,
                 aggregator: str, clip_factor: float, carried: torch.Tensor | None) -> CombinedPart:
    """The owner's result for one part: the robust combination of the valid contributions, plus the
    output error the owner carried from earlier rounds (error feedback on the way back), encoded
    once. Every member decodes the same bytes, so every member ends up with the same bits."""
    if aggregator == BROADCAST:
        agg, dropped = broadcast_value(contributions), []
    else:
        agg, dropped = robust.aggregate(contributions, aggregator, clip_factor)
    if agg is None:  # nothing usable was sent: this part of the average is zero
        agg = torch.zeros(numel)
    if carried is not None and codec.lossy:
        agg = agg + carried
        msg, decoded = codec.roundtrip(agg)
        return CombinedPart(msg, decoded, agg - decoded, dropped)
    msg, decoded = codec.roundtrip(agg)
    return CombinedPart(msg, decoded, None, dropped)


def average_problem(averaged: torch.Tensor, numel: int) -> str | None:
    """Why an owner's result for our slice is refused (and the owner banned), or None. Only proof
    counts: the wrong size or non-finite values. Its size relative to what we sent is no proof (our
    own Δ may be atypical: a joiner's first round, a slow peer, block cycling), and a lying owner
    that sends finite values of the right size is caught by the consensus hash instead."""
    if averaged.numel() != numel:
        return f"sent {averaged.numel()} values where we expect {numel}"
    if not bool(torch.isfinite(averaged).all()):
        return "sent a non-finite average"
    return None
