"""A hostile peer for the trust tests: the real peer (real DHT, real averager) with a hostile
contribution policy swapped in (`run_peer(policy_class=AttackPolicy)`). Run as `python tests/attacker.py peer ARGS...` (what
`p2p-photon peer` takes) with P2P_PHOTON_ATTACK set to one of:

  scale=F     send F x its pseudo-gradient (skipping its own self-check)
  nan         send a pseudo-gradient full of NaN (skipping its own self-check)
  weight=W    claim weight W (samples) for its contribution
  samples=K   publish K x the samples (and throughput) it trained
  round=K     publish round + K
  donor       claim the highest state-sharing priority and serve NaN / wrong-shaped state
  fork=R      (not hostile: broken) after the outer step of round R, hold a θ that is off the swarm's
  lag=R:S     (not hostile: slow) before training round R, sleep S seconds; its last record (round R-1's
              averaging) keeps being re-published meanwhile, so the others see a live peer lagging behind

Never used outside tests.
"""

import functools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_photon import cli, peer  # noqa: E402
from p2p_photon.peer import ContributionPolicy  # noqa: E402

KIND, _, ARG = os.environ.get("P2P_PHOTON_ATTACK", "").partition("=")


class AttackPolicy(ContributionPolicy):
    def contribution(self, deltas):
        if KIND == "scale":
            return [d * float(ARG) for d in deltas]
        if KIND == "nan":
            return [torch.full_like(d, float("nan")) for d in deltas]
        return deltas

    def self_check(self, deltas, active):
        norm, problem = super().self_check(deltas, active)
        return norm, None if KIND in ("scale", "nan") else problem

    def weight(self, samples):
        return float(ARG) if KIND == "weight" else super().weight(samples)

    def record(self, rec):
        if KIND == "samples":
            k = int(ARG)
            return rec.model_copy(update=dict(samples=rec.samples * k, tokens_per_s=rec.tokens_per_s * k,
                                              total_samples=rec.total_samples + rec.samples * (k - 1)))
        if KIND == "round":
            return rec.model_copy(update=dict(round=rec.round + int(ARG)))
        return rec

    def served_state(self, meta, tensors):
        if KIND == "donor":
            tensors = [torch.full_like(t, float("nan")) for t in tensors]
            tensors[0] = torch.zeros(3, 3)  # wrong shape too
        return meta, tensors

    def sharing_priority(self, round_no):
        return 1e9 if KIND == "donor" else super().sharing_priority(round_no)


def fork_after(round_no: int) -> None:
    """This process's peer ends round `round_no` holding a θ slightly off the swarm's (as after averaging
    in a group apart from the others)."""
    from p2p_photon.outer import load_into_model
    from p2p_photon.peer.global_state import GlobalState

    honest_apply = GlobalState.apply

    def apply(self, res, model):
        honest_apply(self, res, model)
        if self.counters.round == round_no + 1:
            with self.lock:
                self.theta[0].add_(1e-3)
                if model is not None:
                    load_into_model(self.theta, model)
                self.rehash()

    GlobalState.apply = apply


def lag_at(round_no: int, seconds: float) -> None:
    """This process's peer stalls for `seconds` before it trains round `round_no` (once)."""
    import time

    from p2p_photon.peer.loop import Peer

    honest_train = Peer.train_until_round_ends
    stalled = []

    def train(self):
        if self.train_round == round_no and not stalled:
            stalled.append(True)
            time.sleep(seconds)
        return honest_train(self)

    Peer.train_until_round_ends = train


if __name__ == "__main__":
    if KIND == "fork":
        fork_after(int(ARG))
    if KIND == "lag":
        lag_at(int(ARG.split(":")[0]), float(ARG.split(":")[1]))
    # `p2p-photon peer` calls p2p_photon.peer.run_peer: the same peer, with the hostile policy
    peer.run_peer = functools.partial(peer.run_peer, policy_class=AttackPolicy)
    sys.exit(cli.main())
