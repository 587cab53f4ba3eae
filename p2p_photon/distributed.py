"""torch.distributed inside one peer: the rank group, rank 0's command channel, DDP/FSDP2 wrapping, the
data split, and `--nproc` (torchrun's launcher with a one-line reason when a rank dies).

A multi-device peer is N processes (ranks) started by torchrun. Rank 0 is the peer the swarm knows:
it alone runs the DHT, the progress records and the swarm's all-reduce. Ranks 1..N-1 only train.
Rank 0 drives them through a command channel, a broadcast of two int64s [command, argument] before
each thing they do together, so every rank makes the same collective calls in the same order:

    STEP  g     one inner step at global step g (DDP all-reduces the gradients), then the mean loss
    BEGIN full  a round starts: θ_local from rank 0 to every rank (+ inner optimizer state and
                data cursor when `full`: the first round, after a resume)
    END         a round ended (FSDP2: the shards are gathered into rank 0's full model)
    STOP        leave

Data: every rank opens the peer's stream with batch N·B and keeps its own B rows (`RankSlice`), so
the ranks see disjoint data, their union is what one rank with batch N·B would see, and the cursor
(in windows, not batches) is one number for the whole peer. No pickle: JSON and raw tensors only.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import sys
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from .errors import UserError
from .watchdog import end_with_parent

logger = logging.getLogger(__name__)

STEP, BEGIN, END, STOP = 1, 2, 3, 4
TIMEOUT = timedelta(minutes=30)  # ranks 1.. wait in a broadcast while rank 0 averages, syncs or lingers


class RankFailure(UserError):
    """Another rank of this peer is gone (or a collective between the ranks failed): the peer stops."""


def world_from_env() -> int:
    """Ranks of this peer as torchrun says (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class RankGroup:
    """This process's place in the peer's ranks, and the few collectives the peer needs."""

    def __init__(self, device: torch.device):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        end_with_parent()  # SIGTERM when torchrun's agent (our parent) dies, even by SIGKILL: rank 0 then
        # leaves cleanly and tells the other ranks to stop
        if self.rank == 0:
            # torchrun ends a rank with killpg(SIGTERM): the DHT, averager and p2pd that rank 0 forks get
            # their own process group, so that they stay up while rank 0 leaves cleanly (checkpoint, 'done'
            # record, then shuts them down itself; the orphan reaper covers a rank 0 that is SIGKILLed)
            os.register_at_fork(after_in_child=os.setpgrp)
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        self.device = torch.device("cuda", self.local_rank) if device.type == "cuda" else device
        self.mesh = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def guard(self, what: str):
        return _Guard(self, what)

    def command(self, cmd: int = 0, arg: int = 0) -> tuple[int, int]:
        """Rank 0 sends [cmd, arg]; the others receive it."""
        t = torch.tensor([cmd, arg], dtype=torch.int64, device=self.comm_device)
        with self.guard("waiting for rank 0's next command" if not self.leader else "sending a command"):
            dist.broadcast(t, 0)
        c, a = t.tolist()
        return int(c), int(a)

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    @torch.no_grad()
    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` into every rank's (one flat buffer, one collective)."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(self.comm_device, torch.float32) for t in tensors])
        with self.guard("sending θ to the ranks"):
            dist.broadcast(flat, 0)
        i = 0
        for t in tensors:
            t.copy_(flat[i: i + t.numel()].view(t.shape))
            i += t.numel()

    def broadcast_json(self, obj=None):
        """A JSON-able object from rank 0 (length, then bytes)."""
        raw = json.dumps(obj).encode() if self.leader else b""
        n = torch.tensor([len(raw)], dtype=torch.int64, device=self.comm_device)
        with self.guard("sending state to the ranks"):
            dist.broadcast(n, 0)
            buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if self.leader else \
                torch.empty(int(n.item()), dtype=torch.uint8)
            buf = buf.to(self.comm_device)
            dist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.comm_device)
        with self.guard("averaging the loss over the ranks"):
            dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self, what: str) -> None:
        with self.guard(what):
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group, after collecting what still holds it (RankTrainer.release drops the
        wrapped models; their reference cycles would otherwise be freed at interpreter exit, too late)."""
        gc.collect()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a dead rank can make the teardown fail too; we are leaving anyway
                logger.debug("destroy_process_group: %r", e)


class _Guard:
    """Turns a failed collective into RankFailure naming what we were doing and which ranks are gone."""

    def __init__(self, group: RankGroup, what: str):
        self.group, self.what = group, what

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if e is None or not isinstance(e, RuntimeError) or isinstance(e, UserError):
            return False
        gone = gone_ranks()
        who = f"rank(s) {', '.join(map(str, gone))} of this peer are gone" if gone else \
            "another rank of this peer failed"
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise RankFailure(f"rank {self.group.rank}: {who} ({self.what}: {first}); the whole peer stops; "
                          "restart it with --resume") from e


def gone_ranks() -> list[int]:
    """Ranks of this node that are no longer running, found among torchrun's children (our siblings)."""
    try:
        agent = psutil.Process().parent()
        ranks = set()
        for p in agent.children():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "RANK" in (env := p.environ()):
                    ranks.add(int(env["RANK"]))
            except (psutil.Error, OSError, ValueError):
                continue
    except (psutil.Error, OSError, AttributeError):
        return []
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    first = int(os.environ.get("RANK", "0")) - int(os.environ.get("LOCAL_RANK", "0"))
    return sorted(set(range(first, first + local)) - ranks) if ranks else []


# ----------------------------------------------------------------------------- data and model


class RankSlice:
    """Rank k's rows of the peer's stream: each batch of N·B windows, rows [k·B, (k+1)·B).

    The cursor is the shared stream's, so a checkpoint's data cursor is the whole peer's."""

    def __init__(self, stream, rank: int, world: int):
        assert stream.batch_size % world == 0
        self.stream, self.rank, self.world = stream, rank, world
        self.batch_size = stream.batch_size // world

    def next_batch(self) -> torch.Tensor:
        b = self.batch_size
        return self.stream.next_batch()[self.rank * b: (self.rank + 1) * b]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def wrap_ddp(model: torch.nn.Module, group: RankGroup) -> torch.nn.Module:
    """DDP over `model` itself (rank 0's model is the one trained: Δ is formed from it as on any peer)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [group.local_rank] if group.device.type == "cuda" else None
    # no buffer sync before each forward (the model's only buffers are constants); the keyword is new in
    # torch 2.13, which deprecates the older one: a GPU box's own torch may be older than the pinned one
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = dict(forward_sync_buffers=False) if "forward_sync_buffers" in params else dict(broadcast_buffers=False)
    with group.guard("wrapping the model in DDP"):
        return DistributedDataParallel(model, device_ids=ids, **no_sync)


def wrap_fsdp2(model: torch.nn.Module, group: RankGroup) -> torch.nn.Module:
    """fully_shard each decoder layer, then the whole model (parameters become DTensors, Shard(0))."""
    from torch.distributed.fsdp import fully_shard

    with group.guard("sharding the model (FSDP2)"):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


# ----------------------------------------------------------------------------- --nproc


def launch_ranks(nproc: int, peer_argv: list[str]) -> int:
    """`p2p-photon peer --nproc N ARGS`: what `torchrun --standalone --nproc-per-node N -m p2p_photon.cli
    peer ARGS` does (torch's elastic launcher, 127.0.0.1), but a rank that dies is one line on stderr."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    # torchrun --standalone: a c10d rendezvous on a free port of this host, here on 127.0.0.1
    args = get_args_parser().parse_args([f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                                         "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4()}",
                                         "--local-addr=127.0.0.1", "--module", "p2p_photon.cli", *peer_argv])
    config, cmd, cmd_args = config_from_args(args)
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: rank {rank} of this peer was killed by {failure.signal_name()} (pid {failure.pid}); "
                  "the whole peer stopped; restart it with --resume", file=sys.stderr)
            return 1
        print(f"error: rank {rank} of this peer exited with code {failure.exitcode} (its error is above); the "
              "whole peer stopped", file=sys.stderr)
        return failure.exitcode
    except SignalException as e:  # the agent passed it on to the ranks (SIGTERM), they left and it did
        logger.info("launcher: %s; the ranks were told to leave", e)
        return 0
    return 0


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N` (the ranks must not launch ranks)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
