"""A peer's local training, one process or one rank of N under torchrun (tests/test_ranks.py).

Sets a peer up (rank 0 starts its DHT on 127.0.0.1; there is no swarm), trains two rounds of
rounds.max_local_steps steps each, dropping the first round's work in between (θ_local ← θ on
rank 0 alone, as after a failed round: the second round shows that every rank starts from rank 0's
model), and writes each round's Δ = θ − θ_local and stats to OUT.safetensors / OUT.json.

    python tests/ranks_worker.py OUT --set key=value ...
    torchrun --nproc-per-node 2 tests/ranks_worker.py OUT --set key=value ...
"""

from __future__ import annotations

import json
import sys
import threading

import torch
from safetensors.torch import save_file

from p2p_photon.config import load_config
from p2p_photon.distributed import RankGroup, world_from_env
from p2p_photon.peer import Peer, RoundStats
from p2p_photon.peer.ranks import PeerRanks, follow


def main(argv: list[str]) -> int:
    out, overrides = argv[0], [a for a in argv[1:] if a != "--set"]
    cfg = load_config(None, overrides)
    group = RankGroup(torch.device("cpu")) if world_from_env() > 1 else None
    if group is not None and not group.leader:
        follow(cfg, group)
        group.close()
        return 0
    peer = Peer(cfg)
    if group is not None:
        peer.rank_group = PeerRanks(group)
    deltas, stats = {}, []
    try:
        peer.setup()
        for r in range(2):
            st = peer.training.train(RoundStats(), round_over=lambda s: False, publish=lambda s: None,
                                     stop=threading.Event())
            for name, d in zip(peer.gs.names, peer.gs.pseudo_gradient(peer.model)):
                deltas[f"{r}.{name}"] = d.contiguous()
            stats.append(dict(samples=st.samples, steps=st.steps, tokens=st.tokens, loss=st.loss))
            peer.gs.reset_local(peer.model)
        if group is not None:
            peer.rank_group.trainer.stop()
            peer.rank_group.trainer.release()
    finally:
        peer.close()
        if group is not None:
            group.close()
    save_file(deltas, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump(stats, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
