"""The only place that talks to hivemind's averager: groups, weights, compression, robust reduction,
membership, measured bytes, state sharing.

hivemind's matchmaking forms the round's group (group bits = round number, prefix = run id +
fingerprint, so peers only average with the same round of the same run). The all-reduce itself
is ours, run on hivemind's butterfly all-reduce with its reducer and containers replaced:

* butterfly reduce-scatter: each member owns a slice of the flat pseudo-gradient; every member
  sends its slices, encoded with the run's codec (none/fp16/int8/int4, see codecs.py), to their
  owners. What the encoding loses stays with the sender and is added to its next round's Δ
  (error feedback).
* the owner checks every contribution (decodable, right size, a finite positive weight not above
  the cap its progress record allows) and combines the valid ones (robust.py: weighted mean,
  norm clipping or CenteredClip), adds its own carried output-quantization error (error feedback
  on the way back, as in DoubleSqueeze), encodes the result ONCE and sends the same bytes to every
  member. Every member decodes the same bytes with the same elementwise ops, so the average, and
  θ after the outer step, are bit-identical across the group without any trick on the values.
* every member then publishes the hash of its average under a per-group DHT key and checks the
  others' before applying (hivemind would keep a peer's own values for a slice whose owner died).
* bytes are counted on the messages actually sent and received (protobuf payloads).
* in a closed swarm (members given) non-members are dropped from the group before the all-reduce
  and refused when they ask for state.

Modules: `protocol.py` (the rules above as plain functions), `consensus.py` (the hash check, public
DHT API only), `state_download.py` (donor order, reading a donor's stream), `hivemind_backend.py`
(every subclass and private name of hivemind, with a version check; tests/test_hivemind_contract.py
checks each reliance), `swarm_averager.py` (SwarmAverager, what the peer uses).
"""

from .protocol import (
           ROUND_BITS,
           AveragedWithoutUs,
           AveragingFailed,
           RoundResult,
           banned_message,
           weight_problem,
)
from .swarm_averager import SwarmAverager

__all__ = ["ROUND_BITS", "AveragedWithoutUs", "AveragingFailed", "RoundResult", "SwarmAverager", "banned_message",
           "weight_problem"]
