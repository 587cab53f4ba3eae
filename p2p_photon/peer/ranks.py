"""A peer bigger than one device: N ranks under torchrun, one swarm identity (see distributed.py).

    rank 0      the peer (loop.Peer): DHT, records, all-reduce, checkpoints; its inner trainer is a
                `RankTrainer` that announces every step, so the other ranks step with it
    ranks 1..   `serve()`: wait for rank 0's command, do it, repeat; leave on STOP or when rank 0 is gone

DDP (default): rank 0's model is wrapped in place, so after a round its parameters are the peer's
θ_local and Δ = θ − θ_local is formed once, on rank 0, exactly as on a one-process peer. The inner
optimizer sees the same all-reduced gradients on every rank, so its state is the same everywhere;
rank 0 checkpoints it and sends it to the others after a resume. FSDP2 (inner.parallel = "fsdp2"):
a sharded copy trains; at the end of a round its shards are gathered into rank 0's full model
(Δ as above), at the start of a round θ is scattered into the shards. Samples and tokens a step
reports are summed over the ranks (every rank trains B sequences), the loss is their mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import threading

import torch
import torch.distributed as dist

from .. import data, state
from ..config import Config
from ..distributed import BEGIN, END, STEP, STOP, RankFailure, RankGroup, RankSlice, wrap_ddp, wrap_fsdp2
from ..errors import UsageError
from ..inner import InnerTrainer, StepStats, resolve_device
from ..model import build_model
from ..watchdog import stop_on_signals
from .contribution import ContributionPolicy
from .loop import Peer
from .parts import PeerParts

logger = logging.getLogger(__name__)


class RankTrainer:
    """One rank's inner trainer. On rank 0 it has InnerTrainer's interface (LocalTraining and PeerParts
    use it unchanged) and sends each command before doing its own part; ranks 1.. run `serve()`."""

    def __init__(self, group: RankGroup, cfg: Config, model: torch.nn.Module, stream: RankSlice):
        self.group, self.cfg, self.model, self.stream = group, cfg, model, stream
        self.fsdp = cfg.inner.parallel == "fsdp2"
        if self.fsdp:  # rank 0 keeps `model` whole (θ, Δ, evaluation); a sharded copy trains
            shard = build_model(cfg.model.preset, model.config.vocab_size, cfg.model.seq_len, cfg.seed, group.device)
            self.train_model = wrap_fsdp2(shard, group)
        else:
            self.train_model = wrap_ddp(model, group)
        self.inner = InnerTrainer(self.train_model, cfg.inner, group.device)
        self.full_sync_due = True  # the first round also sends the inner optimizer state and the cursor

    # ------------------------------------------------------------------ rank 0: InnerTrainer's interface

    @property
    def optimizer(self):
        return _ShardedState(self.inner.optimizer) if self.fsdp else self.inner.optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.inner.params

    def reset_optimizer(self) -> None:
        raise UsageError("outer.block_cycle is not supported by a multi-rank peer yet")

    def begin_round(self) -> None:
        full, self.full_sync_due = self.full_sync_due, False
        self.group.command(BEGIN, int(full))
        self._begin(full)

    def step(self, next_batch, global_step: int) -> StepStats:
        self.group.command(STEP, global_step)
        return self._step(next_batch, global_step)

    def end_round(self) -> None:
        self.group.command(END)
        self._end()

    def stop(self) -> None:
        self.group.command(STOP)

    def release(self) -> None:
        """Drop the wrapped model and its optimizer before the rank group is destroyed. FSDP2's and DDP's
        state holds the gloo/NCCL process group and its pending work in reference cycles; freed only at
        interpreter exit, after destroy_process_group, they aborted a rank ("terminate called without an
        active exception", 2 of 20 runs of a two-rank fully_shard script; 0 of 40 when freed first)."""
        self.train_model = self.inner = None

    # ------------------------------------------------------------------ what every rank does

    def _begin(self, full: bool) -> None:
        """θ_local from rank 0 (whatever rank 0 did to its model since the last round: outer step,
        download, resume, overlapped landing); after a resume also the optimizer state and cursor."""
        params = list(self.model.parameters())
        self.group.broadcast(params)
        if self.fsdp:
            with torch.no_grad():
                for p, full_p in zip(self.train_model.parameters(), params):
                    p.to_local().copy_(_local_shard(full_p.to(p.device), p))
        if full:
            self._sync_inner_state()

    def _step(self, next_batch, global_step: int) -> StepStats:
        s = self.inner.step(next_batch, global_step)
        w = self.group.world
        return dataclasses.replace(s, loss=self.group.mean(s.loss), samples=s.samples * w, tokens=s.tokens * w)

    @torch.no_grad()
    def _end(self) -> None:
        if not self.fsdp:
            return  # DDP trained rank 0's model itself
        with self.group.guard("gathering the shards"):
            for p, full_p in zip(self.train_model.parameters(), self.model.parameters()):
                whole = p.full_tensor()
                if self.group.leader:
                    full_p.copy_(whole)

    def _sync_inner_state(self) -> None:
        """Rank 0's inner optimizer state and data cursor to every rank (DDP: the replicas' states are
        equal from then on; FSDP2: each rank's state is its own shard's, so only the cursor is sent
        and a resumed peer starts a fresh inner optimizer)."""
        leader = self.group.leader
        sd = self.optimizer.state_dict() if leader and not self.fsdp else None
        tensors, plain = state.split_optimizer_state(sd) if sd is not None else ({}, None)
        spec = dict(plain=plain, cursor=self.stream.state_dict(),
                    tensors=[[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in sorted(tensors.items())])
        spec = self.group.broadcast_json(spec if leader else None)
        got = {}
        with self.group.guard("sending the inner optimizer state"):
            for k, shape, dtype in spec["tensors"]:
                t = tensors[k] if leader else torch.empty(shape, dtype=getattr(torch, dtype))
                t = t.to(self.group.comm_device)
                dist.broadcast(t, 0)
                got[k] = t.cpu()
        if not leader:
            self.stream.load_state_dict(spec["cursor"])
            if spec["plain"] is not None:
                self.optimizer.load_state_dict(state.join_optimizer_state(got, spec["plain"]))

    # ------------------------------------------------------------------ ranks 1..

    def serve(self) -> None:
        """Do what rank 0 says until STOP (RankFailure when rank 0 is gone)."""
        while True:
            cmd, arg = self.group.command()
            if cmd == STEP:
                self._step(self.stream.next_batch, arg)
            elif cmd == BEGIN:
                self._begin(bool(arg))
            elif cmd == END:
                self._end()
            elif cmd == STOP:
                return
            else:
                raise RankFailure(f"rank {self.group.rank}: unknown command {cmd} from rank 0")


class _ShardedState:
    """FSDP2 on rank 0: the inner optimizer whose state is sharded over the ranks, as checkpoints see it.
    Its state is not checkpointed (each rank holds a shard of it; gathering it would need every rank at
    every checkpoint): a resumed FSDP2 peer restores θ, the outer state and the data cursor, and starts
    a fresh inner optimizer."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.state, self.param_groups = opt, opt.state, opt.param_groups

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": self.opt.state_dict()["param_groups"]}  # loadable by any peer

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("state"):
            logger.warning("inner.parallel = 'fsdp2': the checkpoint's inner optimizer state is not restored "
                           "(it is sharded over the ranks); the inner optimizer starts fresh")


def _local_shard(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's part of `full` as the DTensor parameter `p` holds it (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


@dataclasses.dataclass
class PeerRanks:
    """What PeerParts.setup calls (as `rank_group`) to build its stream and trainer on rank 0."""

    group: RankGroup
    trainer: RankTrainer | None = None

    def parts(self, cfg: Config, prep, model: torch.nn.Module, device) -> tuple[RankSlice, RankTrainer]:
        if self.group.leader:  # ranks 1.. wait here until rank 0 has prepared the data
            self.group.barrier("waiting for the other ranks")
        logger.debug("rank %d: data prepared, wrapping the model", self.group.rank)
        w = self.group.world
        stream = data.open_silo_stream(prep, [cfg.data.silo], seq_len=cfg.model.seq_len,
                                       batch_size=cfg.inner.batch_size * w, seed=cfg.seed, stream_id=cfg.data.silo)
        sliced = RankSlice(stream, self.group.rank, w)
        self.trainer = RankTrainer(self.group, cfg, model, sliced)
        logger.debug("rank %d: model wrapped (%s)", self.group.rank, cfg.inner.parallel)
        return sliced, self.trainer


def check_supported(cfg: Config) -> None:
    if cfg.data.run_spec:
        raise UsageError("a multi-rank peer (--nproc) trains on the run's shared corpus silos only for now; "
                         "join with --data as one process per peer (drop --nproc)")
    if cfg.outer.block_cycle:
        raise UsageError("outer.block_cycle is not supported by a multi-rank peer yet; run one process per "
                         "device, or turn block cycling off")
    if cfg.inner.parallel == "fsdp2" and cfg.inner.optimizer == "adamw8bit":
        raise UsageError("inner.parallel = 'fsdp2' needs inner.optimizer = 'adamw': bitsandbytes 0.50's 8-bit "
                         "optimizers refuse FSDP2's DTensor parameters; use inner.parallel = 'ddp' for 8-bit states")


def run_ranked_peer(cfg: Config, *, resume: bool = False, summary_out: str | None = None,
                    policy_class: type[ContributionPolicy] = ContributionPolicy) -> int:
    """`torchrun --nproc-per-node N -m p2p_photon.cli peer ...`: this process is one rank of the peer."""
    check_supported(cfg)
    group = RankGroup(resolve_device(cfg.inner))
    try:
        if group.leader:
            return _lead(cfg, group, resume, summary_out, policy_class)
        return follow(cfg, group)
    finally:
        group.close()


def _lead(cfg: Config, group: RankGroup, resume: bool, summary_out: str | None,
          policy_class: type[ContributionPolicy]) -> int:
    PeerParts.check_inputs(cfg)
    ranks, stop = PeerRanks(group), threading.Event()
    logger.info("rank 0 of %d: this process is the peer in the swarm; the other ranks train with it", group.world)
    with stop_on_signals(stop, "finishing the current step, checkpointing and leaving"):
        peer = Peer(cfg, resume=resume, stop_event=stop, summary_out=summary_out,
                    policy=policy_class(cfg.averaging.max_delta_norm_ratio))
        peer.rank_group = ranks
        try:
            return peer.run()
        finally:  # the other ranks leave too (unless they are what failed: then they are gone already)
            if ranks.trainer is not None and not isinstance(sys.exc_info()[1], RankFailure):
                with contextlib.suppress(RankFailure):
                    ranks.trainer.stop()
            if ranks.trainer is not None:
                ranks.trainer.release()


def follow(cfg: Config, group: RankGroup) -> int:
    """Rank 1..: train with rank 0 until it says stop. SIGINT/SIGTERM are left to rank 0 (which gets them
    too, finishes its step and sends STOP); a rank 0 that is gone ends this one at its next command."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: logger.info("rank %d: %s: leaving when rank 0 says so", group.rank,
                                                     signal.Signals(s).name))
    group.barrier("waiting for rank 0 to prepare the data")
    prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=False))
    model = build_model(cfg.model.preset, prep.vocab_size, cfg.model.seq_len, cfg.seed, group.device)
    _, trainer = PeerRanks(group).parts(cfg, prep, model, group.device)
    try:
        trainer.serve()
    finally:
        trainer.release()
    logger.info("rank %d: rank 0 said stop", group.rank)
    return 0
