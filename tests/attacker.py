"""A hostile peer for the trust tests: the real peer (real DHT, real averager) with one behaviour
replaced. Run as `python tests/attacker.py peer ARGS...` (what `p2p-photon peer` takes) with
P2P_PHOTON_ATTACK set to one of:

  scale=F     send F x its pseudo-gradient (skipping its own self-check)
  nan         send a pseudo-gradient full of NaN (skipping its own self-check)
  weight=W    claim weight W (samples) for its contribution
  samples=K   publish K x the samples (and throughput) it trained
  round=K     publish round + K
  donor       claim the highest state-sharing priority and serve NaN / wrong-shaped state

Never used outside tests.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_photon import cli, peer  # noqa: E402

KIND, _, ARG = os.environ.get("P2P_PHOTON_ATTACK", "").partition("=")


class Attacker(peer.Peer):
    def _contribution(self, deltas):
        if KIND == "scale":
            return [d * float(ARG) for d in deltas]
        if KIND == "nan":
            return [torch.full_like(d, float("nan")) for d in deltas]
        return deltas

    def _self_check(self, deltas, active):
        norm, problem = super()._self_check(deltas, active)
        return norm, None if KIND in ("scale", "nan") else problem

    def _weight(self, st):
        return float(ARG) if KIND == "weight" else super()._weight(st)

    def _publish(self, st, phase, now=False):
        if KIND == "samples":
            st = peer.RoundStats(**{**st.__dict__, "samples": st.samples * int(ARG), "tokens": st.tokens * int(ARG)})
        if KIND == "round":
            real = self.counters.round
            self.counters.round = real + int(ARG)
            try:
                return super()._publish(st, phase, now)
            finally:
                self.counters.round = real
        return super()._publish(st, phase, now)

    def _share_state(self):
        meta, tensors = super()._share_state()
        if KIND == "donor":
            tensors = [torch.full_like(t, float("nan")) for t in tensors]
            tensors[0] = torch.zeros(3, 3)  # wrong shape too
        return meta, tensors

    def _start_network(self):
        super()._start_network()
        if KIND == "donor":
            real = self.averager.set_priority
            self.averager.set_priority = lambda round_no: real(10**9)
            real(10**9)


if __name__ == "__main__":
    peer.Peer = Attacker
    sys.exit(cli.main())
