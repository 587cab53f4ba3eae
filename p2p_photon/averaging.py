"""The only place that talks to hivemind's averager: groups, weights, compression, robust reduction,
membership, measured bytes, state sharing.

hivemind's matchmaking forms the round's group (group bits = round number, prefix = run id +
fingerprint, so peers only average with the same round of the same run). The all-reduce itself
is ours (`_Runner`, a hivemind AllReduceRunner with its reducer and containers replaced):

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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, AsyncIterator  # noqa: UP035 (hivemind reads a handler's hint by typing's _name)

import torch
from hivemind import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import BannedException, TensorPartContainer, TensorPartReducer
from hivemind.compression import CompressionInfo
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, enter_asynchronously
from hivemind.utils.mpfuture import MPFuture

from . import robust
from .codecs import Codec, make_codec
from .config import AveragingConfig
from .model import theta_hash

logger = logging.getLogger(__name__)

ROUND_BITS = 20  # round number -> group bits (wraps after ~1M rounds)


class AveragingFailed(RuntimeError):
    """A round's all-reduce did not complete (no group, timeout, peer failure, inconsistent group)."""


@dataclass
class RoundResult:
    deltas: list[torch.Tensor | None]  # the group's averaged Δ per tensor (None: not averaged this round)
    group_size: int
    gathered: dict[str, dict[str, Any]]  # peer id -> metadata it sent
    bytes_sent: int  # measured: protobuf payloads this peer put on the wire for this all-reduce
    bytes_received: int
    seconds: float
    residual_norm: float = 0.0  # norm of the quantization error carried to the next round


def banned_message(rejected: dict[str, str]) -> str:
    why = "; ".join(f"peer {p[-8:]}: {r}" for p, r in sorted(rejected.items()))
    return f"refused the data of {why}; left out of this run's all-reduces from now on"


def weight_problem(weight: float, cap: float | None) -> str | None:
    """Why a sender's weight (its samples this round) is refused, or None: it must be a finite positive
    number no larger than the cap its progress record allows."""
    if not (math.isfinite(weight) and weight > 0):
        return f"weight {weight!r} is not a positive number"
    if cap is not None and weight > cap:
        return f"weight {weight:g} is more than the {cap:g} samples its progress record allows"
    return None


def _digest(x: Any) -> str:
    return hashlib.sha256(repr(x).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the all-reduce


class _Container(TensorPartContainer):
    """Splits the active tensors into parts; encodes a sender's parts with the codec and writes what
    the encoding lost into the (shared-memory) residual buffers."""

    def __init__(self, tensors, peer_fractions, *, codec: Codec, residuals: dict[int, torch.Tensor] | None,
                 tensor_infos, part_size_bytes):
        super().__init__(tensors, peer_fractions, tensor_infos=tensor_infos, part_size_bytes=part_size_bytes,
                         return_deltas=False)
        self.codec, self.residuals = codec, residuals

    def part_location(self, peer_index: int, part_index: int) -> tuple[int, int, int]:
        """(global tensor index, start offset, numel) of a part."""
        part, info = self._input_parts_by_peer[peer_index][part_index]
        return info.key, info.part_index * info.part_size, part.numel()

    async def iterate_input_parts_for(self, peer_index: int):
        assert not self._inputs_consumed_by_peer[peer_index], "input parts of a given peer are already deallocated."
        self._inputs_consumed_by_peer[peer_index] = True

        def encode(item):
            part, info = item
            if self.residuals is None or not self.codec.lossy:
                return self.codec.encode(part)
            msg, decoded = self.codec.roundtrip(part)
            start = info.part_index * info.part_size
            self.residuals[info.key][start:start + part.numel()] = part.reshape(-1) - decoded
            return msg

        async for msg in amap_in_executor(encode, as_aiter(*self._input_parts_by_peer[peer_index]),
                                          max_prefetch=self.prefetch):
            yield msg


class _Reducer(TensorPartReducer):
    """Keeps every sender's contribution to the current part (instead of a running sum) and combines
    them with `combine(part_index, [(tensor, weight), ...]) -> decoded output` once all are in."""

    def __init__(self, part_shapes, num_senders, combine: Callable):
        self._combine = combine
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self.contributions: dict[int, tuple[torch.Tensor, float]] = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.contributions[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            order = sorted(self.contributions)  # fixed order: every reducer does the same float ops
            contributions = [(i, *self.contributions[i]) for i in order]
            self.current_part_future.set_result(self._combine(self.current_part_index, contributions))
            self.reset_accumulators()


class _Runner(AllReduceRunner):
    """AllReduceRunner whose owners send back one identically-encoded result per part (not deltas),
    with weight checks, robust combination, error feedback and byte counting."""

    def __init__(self, *, codec: Codec, residuals, out_residuals: dict[int, torch.Tensor] | None,
                 aggregator: str, clip_factor: float, weight_caps: dict[str, float], tensor_infos,
                 part_size_bytes: int, max_output_ratio: float = 0.0, **kwargs):
        tensors = kwargs.pop("tensors")
        super().__init__(tensors=(), **kwargs)  # the base class's container and reducer are replaced below
        self.codec, self.aggregator, self.clip_factor, self.weight_caps = codec, aggregator, clip_factor, weight_caps
        self.max_output_ratio = max_output_ratio
        self.out_residuals, self.staged_out_residuals = out_residuals, {}
        self.bytes_sent = self.bytes_received = 0
        self.failed_reducers: set[str] = set()
        self.rejected: dict[str, str] = {}  # peer id -> why its data was refused
        self.outputs: dict[int, Any] = {}
        me = self.ordered_peer_ids.index(self.peer_id)
        self.tensor_part_container = _Container(tensors, self.peer_fractions, codec=codec,
                                                residuals=residuals, tensor_infos=tensor_infos,
                                                part_size_bytes=part_size_bytes)
        self.parts_for_local_averaging = self.tensor_part_container.get_raw_input_parts(me)
        self._my_locations = [self.tensor_part_container.part_location(me, i)
                              for i in range(len(self.parts_for_local_averaging))]
        self.tensor_part_reducer = _Reducer(tuple(p.shape for p in self.parts_for_local_averaging),
                                            len(self.sender_peer_ids), self._combine)

    # -- owner side
    def _combine(self, part_index: int, contributions) -> torch.Tensor:
        agg, dropped = robust.aggregate([(x, w) for _, x, w in contributions], self.aggregator, self.clip_factor)
        for pos in dropped:
            sender = self.sender_peer_ids[contributions[pos][0]].to_base58()
            self.rejected.setdefault(sender, "sent non-finite values")
        key, start, n = self._my_locations[part_index]
        if agg is None:
            agg = torch.zeros(n)
        if self.out_residuals is not None and self.codec.lossy:
            agg = agg + self.out_residuals[key][start:start + n]
            msg, decoded = self.codec.roundtrip(agg)
            self.staged_out_residuals[(key, start)] = agg - decoded
        else:
            msg, decoded = self.codec.roundtrip(agg)
        self.outputs[part_index] = msg
        return decoded

    def _check_weight(self, sender: str, weight: float) -> None:
        cap = self.weight_caps.get(sender)
        if cap is None and self.weight_caps:
            cap = max(self.weight_caps.values())  # not in our view yet: no more than the largest known
        problem = weight_problem(weight, cap)
        if problem:
            raise AllreduceException(problem)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        sender = self.sender_peer_ids[sender_index].to_base58()
        expected = [p.numel() for p in self.parts_for_local_averaging]
        try:
            async for msg in stream:
                self.bytes_received += msg.ByteSize()
                try:
                    self._check_weight(sender, msg.weight)
                    part = await asyncio.get_event_loop().run_in_executor(None, self.codec.decode, msg.tensor_part)
                    if part_index >= len(expected) or part.numel() != expected[part_index]:
                        raise AllreduceException(f"sent a part of {part.numel()} values where we expect "
                                                 f"{expected[part_index] if part_index < len(expected) else 0}")
                except (AllreduceException, ValueError) as e:
                    self.rejected.setdefault(sender, str(e))
                    logger.warning("rejected the contribution of peer %s: %s", sender[-8:], e)
                    raise AllreduceException(str(e)) from None
                part = part.reshape(self.parts_for_local_averaging[part_index].shape)
                try:
                    await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=msg.weight)
                except BannedException:
                    break
                out = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=self.outputs[part_index])
                self.bytes_sent += out.ByteSize()
                part_index += 1
                yield out
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def _check_average(self, averaged: torch.Tensor, n: int, part_index: int, peer_index: int) -> None:
        """An owner's result for our slice must be the right size, finite, and not far larger than what
        we sent (clipped aggregates are at most clip_factor x the median contribution)."""
        if averaged.numel() != n:
            raise AllreduceException(f"sent {averaged.numel()} values where we expect {n}")
        if not bool(torch.isfinite(averaged).all()):
            raise AllreduceException("sent a non-finite average")
        if self.max_output_ratio and self.aggregator != "mean":
            part = self.tensor_part_container._input_parts_by_peer[peer_index][part_index][0]
            mine = float(part.norm())
            if mine > 0 and float(averaged.norm()) > self.max_output_ratio * mine:
                raise AllreduceException(f"sent an average {float(averaged.norm()) / mine:.3g}x the norm of ours")

    # -- sender side
    async def _generate_input_for_peer(self, peer_index: int):
        first = True
        async for part in self.tensor_part_container.iterate_input_parts_for(peer_index):
            msg = averaging_pb2.AveragingData(tensor_part=part, weight=self.weight)
            if first:
                msg.code, msg.group_id, first = averaging_pb2.PART_FOR_AVERAGING, self.group_id, False
            self.bytes_sent += msg.ByteSize()
            yield msg

    async def _communicate_with_peer(self, peer_id):
        peer_index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, part in enumerate(self.parts_for_local_averaging):
                averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                          weight=self.weight)
                container.register_processed_part(peer_index, part_index, averaged.reshape(part.shape))
            return
        try:
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(self._generate_input_for_peer(peer_index))
            part_index = 0
            async for msg in aiter_with_timeout(stream, self.reducer_timeout):
                self.bytes_received += msg.ByteSize()
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                if part_index >= container.num_parts_by_peer[peer_index]:
                    raise AllreduceException(f"{peer_id} sent more parts than it owns")
                _, _, n = container.part_location(peer_index, part_index)
                try:
                    averaged = await asyncio.get_event_loop().run_in_executor(None, self.codec.decode, msg.tensor_part)
                    self._check_average(averaged, n, part_index, peer_index)
                except (ValueError, AllreduceException) as e:
                    self.rejected.setdefault(peer_id.to_base58(), f"as owner of a slice: {e}")
                    raise AllreduceException(str(e)) from None
                container.register_processed_part(peer_index, part_index, averaged)
                part_index += 1
            if part_index != container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, expected "
                                         f"{container.num_parts_by_peer[peer_index]}")
        except BaseException as e:
            self.failed_reducers.add(str(peer_id))
            if isinstance(e, Exception):
                logger.debug("all-reduce with %s failed: %r", peer_id, e)
            container.register_failed_reducer(peer_index)
            raise


# ----------------------------------------------------------------------------- the averager process


class _Averager(DecentralizedAverager):
    """DecentralizedAverager running our all-reduce (see module doc); state for late joiners comes
    from the peer (get_current_state is hivemind's documented extension point)."""

    def __init__(self, averaged_tensors, dht, *, state_fn=None, codec_name="none", aggregator="mean",
                 clip_factor=2.0, error_feedback=True, members: frozenset[str] | None = None,
                 residuals: list[torch.Tensor] | None = None, wire: torch.Tensor | None = None, **kwargs):
        self._state_fn, self._codec_name, self._aggregator, self._clip_factor = state_fn, codec_name, aggregator, clip_factor
        self._error_feedback, self._members = error_feedback, members
        self._min_group = int(kwargs.get("min_group_size") or 1)
        self._residuals, self._wire = residuals, wire
        self._policy: dict[str, Any] = dict(active=None, weight_caps={}, banned=frozenset(), max_output_ratio=0.0)
        self._rejected: dict[str, str] = {}
        self._out_residuals: dict[int, torch.Tensor] | None = None
        super().__init__(averaged_tensors, dht, **kwargs)

    def get_current_state(self):
        if self._state_fn is None:
            return dict(), [], None
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    # -- per-round settings, sent to the averager process before step()
    def set_policy(self, **policy) -> None:
        future = MPFuture()
        self._outer_pipe.send(("_set_policy", [], dict(policy=policy, future=future)))
        future.result(timeout=30)

    async def _set_policy(self, policy: dict, future: MPFuture) -> None:
        self._policy.update(policy)
        future.set_result(None)

    def pop_rejected(self) -> dict[str, str]:
        """Peers whose data this averager refused since the last call (peer id -> why)."""
        future = MPFuture()
        self._outer_pipe.send(("_pop_rejected", [], dict(future=future)))
        return future.result(timeout=30)

    async def _pop_rejected(self, future: MPFuture) -> None:
        rejected, self._rejected = self._rejected, {}
        future.set_result(rejected)

    def _is_member(self, peer_id) -> bool:
        return self._members is None or peer_id.to_base58() in self._members

    def _is_welcome(self, peer_id) -> bool:
        return self._is_member(peer_id) and peer_id.to_base58() not in self._policy["banned"]

    @property
    def _matchmaking(self):
        return self.__dict__["_matchmaking_"]

    @_matchmaking.setter
    def _matchmaking(self, matchmaking) -> None:
        """hivemind builds its Matchmaking inside the averager process; ours never asks a non-member or
        banned peer to lead its group (followers of an outsider's group would be left alone in it)."""
        request_join_group = matchmaking._request_join_group

        async def request_join_welcome_group(leader):
            if not self._is_welcome(leader):
                logger.debug("not joining the group of non-member or banned peer %s", leader.to_base58()[-8:])
                return None
            return await request_join_group(leader)

        matchmaking._request_join_group = request_join_welcome_group  # redirects to another leader come here too
        self.__dict__["_matchmaking_"] = matchmaking

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        try:
            decoded = [self.serializer.loads(g) for g in group_info.gathered]
            keep = [i for i, p in enumerate(group_info.peer_ids) if self._is_welcome(p)]
            if len(keep) < len(group_info.peer_ids):
                outsiders = [group_info.peer_ids[i].to_base58()[-8:] for i in range(len(decoded)) if i not in keep]
                logger.info("leaving non-member or banned peer(s) %s out of the all-reduce", ", ".join(outsiders))
                group_info = GroupInfo(group_info.group_id, tuple(group_info.peer_ids[i] for i in keep),
                                       tuple(group_info.gathered[i] for i in keep))
                decoded = [decoded[i] for i in keep]
            if len(decoded) < self._min_group:
                raise AllreduceException(f"only {len(decoded)} of the group may average with us "
                                         f"(averaging.min_group_size = {self._min_group})")
            bandwidths, mode_ids, user_bytes = zip(*decoded)
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_bytes)))
            modes = tuple(map(AveragingMode, mode_ids))
            download = [b if m != AveragingMode.CLIENT else 0.0 for b, m in zip(bandwidths, modes)]
            fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, download, min_vector_size)
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                await self._run_allreduce_inplace_(local_tensors, group_info, peer_fractions=fractions,
                                                   modes=modes, **kwargs)
                return user_gathered
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("all-reduce failed: %r", e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}") from e

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        kwargs.pop("compression", None)
        kwargs.pop("tensor_infos", None)
        active = self._policy["active"] if self._policy["active"] is not None else list(range(len(tensors)))
        codec = make_codec(self._codec_name)
        if self._error_feedback and codec.lossy and self._out_residuals is None:
            self._out_residuals = {i: torch.zeros(t.numel()) for i, t in enumerate(tensors)}
        residuals = {i: r for i, r in enumerate(self._residuals)} if self._residuals is not None else None
        if residuals is not None:
            for i in active:
                residuals[i].zero_()
        runner = _Runner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, group_id=group_id,
            tensors=[tensors[i] for i in active],
            tensor_infos=[CompressionInfo.from_tensor(tensors[i], key=i) for i in active],
            ordered_peer_ids=group_info.peer_ids, codec=codec, residuals=residuals,
            out_residuals=self._out_residuals if self._error_feedback else None,
            aggregator=self._aggregator, clip_factor=self._clip_factor,
            weight_caps=dict(self._policy.get("weight_caps") or {}),
            max_output_ratio=float(self._policy.get("max_output_ratio") or 0.0), **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        try:
            outputs = [out async for out in runner]
        finally:
            self._rejected.update(runner.rejected)
            if self._wire is not None:
                self._wire[0], self._wire[1] = runner.bytes_sent, runner.bytes_received
        if runner.failed_reducers:
            raise AllreduceException(f"{len(runner.failed_reducers)} owner(s) of averaged parts failed")
        for i, out in zip(active, outputs):
            tensors[i].copy_(out.reshape(tensors[i].shape))
        if self._out_residuals is not None:
            for (key, start), r in runner.staged_out_residuals.items():
                self._out_residuals[key][start:start + r.numel()] = r
        self.last_updated = get_dht_time()
        self._state_updated.set()

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not self._is_member(context.remote_id):
            logger.warning("refused state to non-member %s", context.remote_id.to_base58()[-8:])
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """Non-members and banned peers are not let into a group we lead."""
        if not self._is_welcome(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    # -- state download with donor exclusion (the caller verifies what it got and retries without it)
    def load_state_from(self, exclude: Sequence[str], timeout: float):
        future = MPFuture()
        self._outer_pipe.send(("_load_state_excluding", [], dict(exclude=list(exclude), timeout=timeout,
                                                                 future=future)))
        return future.result(timeout=timeout * 4 + 10)

    async def _load_state_excluding(self, exclude: list[str], timeout: float, future: MPFuture):
        """Like hivemind's _load_state_from_peers (donors by claimed priority), but skips excluded and
        non-member donors and returns the donor's ID with (metadata, tensors). Tensors come as raw
        buffers and metadata as msgpack: nothing from the network is unpickled."""
        from hivemind.compression import deserialize_torch_tensor
        from hivemind.p2p import PeerID
        from hivemind.utils.streaming import combine_from_streaming
        from hivemind.utils.timed_storage import ValueWithExpiration

        try:
            found = self.dht.get(f"{self._matchmaking.group_key_manager.prefix}.all_averagers", latest=True)
            priority = {}
            if found is not None and isinstance(found.value, dict):
                for pid, info in found.value.items():
                    if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int)):
                        with contextlib.suppress(Exception):
                            priority[PeerID(pid)] = float(info.value)
            for peer in sorted(priority, key=priority.get, reverse=True):
                if peer == self.peer_id or peer.to_base58() in exclude or not self._is_member(peer):
                    continue
                try:
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    if metadata:
                        future.set_result((peer.to_base58(), metadata, tensors))
                        return
                except Exception as e:
                    logger.info("state download from %s failed: %r", peer.to_base58()[-8:], e)
        finally:
            if not future.done():
                future.set_result(None)


@contextlib.contextmanager
def _keep_sigint():
    """hivemind's averager sets SIGINT to SIG_IGN in the *calling* process before it forks, which would
    make Ctrl-C do nothing; put the caller's handler back."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        yield
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- what the peer uses


class SwarmAverager:
    """Averages pseudo-gradients of one run in round-matched groups, weighted by samples."""

    def __init__(self, dht, shapes: Sequence[torch.Size], *, prefix: str, cfg: AveragingConfig,
                 state_fn: Callable[[], tuple[dict, list[torch.Tensor]]] | None = None,
                 client_mode: bool | None = None, members: frozenset[str] | None = None):
        self.cfg = cfg
        self.codec = make_codec(cfg.compression)
        self.shapes = [torch.Size(s) for s in shapes]
        self.buffers = [torch.zeros(s, dtype=torch.float32) for s in self.shapes]
        self.numel = sum(b.numel() for b in self.buffers)
        self.error_feedback = cfg.error_feedback and self.codec.lossy
        self._sent_residuals = ([torch.zeros(s.numel()).share_memory_() for s in self.shapes]
                                if self.error_feedback else None)
        self.carried = [torch.zeros(s) for s in self.shapes] if self.error_feedback else None
        self._wire = torch.zeros(2, dtype=torch.int64).share_memory_()
        with _keep_sigint():
            self._averager = _Averager(
                self.buffers, dht, start=True, prefix=prefix, state_fn=state_fn, codec_name=cfg.compression,
                aggregator=cfg.aggregator, clip_factor=cfg.clip_factor, error_feedback=cfg.error_feedback,
                members=members, residuals=self._sent_residuals, wire=self._wire,
                min_group_size=cfg.min_group_size, target_group_size=cfg.target_group_size,
                min_matchmaking_time=cfg.matchmaking_time, request_timeout=min(10.0, cfg.matchmaking_time / 2),
                allreduce_timeout=cfg.allreduce_timeout, next_chunk_timeout=min(30.0, cfg.allreduce_timeout / 2),
                client_mode=client_mode, declare_state_period=10.0, shutdown_timeout=5.0,
            )
        self.peer_id = str(self._averager.peer_id)
        self.dht, self.prefix = dht, prefix
        self.banned: dict[str, str] = {}

    def average(self, deltas: Sequence[torch.Tensor | None], *, round_no: int, weight: float, meta: dict[str, Any],
                active: Sequence[int] | None = None, weight_caps: dict[str, float] | None = None,
                timeout: float | None = None) -> RoundResult:
        """One round: matchmaking in the round's group, then our all-reduce of the active tensors
        (all by default; Δ of the others is ignored); raises AveragingFailed."""
        t0 = time.perf_counter()
        active = list(range(len(self.shapes))) if active is None else sorted(int(i) for i in active)
        self._averager.set_group_bits(format(round_no % (1 << ROUND_BITS), f"0{ROUND_BITS}b"))
        self._averager.set_policy(active=active, weight_caps=dict(weight_caps or {}),
                                  max_output_ratio=self.cfg.max_delta_norm_ratio * self.cfg.clip_factor)
        with self._averager.get_tensors() as tensors:
            for i in active:
                tensors[i].copy_(deltas[i])
                if self.carried is not None:
                    tensors[i].add_(self.carried[i])  # error feedback: what earlier rounds' encoding lost
        self._wire.zero_()
        gathered_meta = dict(meta, round=round_no, active=_digest(active), codec=self.codec.name,
                             nonce=os.urandom(8).hex())
        try:
            gathered = self._averager.step(gather=gathered_meta, weight=float(weight), allow_retries=True,
                                           timeout=timeout or self.cfg.matchmaking_time * 3)
        except Exception as e:  # hivemind raises several types; the caller only needs "it failed, why"
            self._ban_rejected()
            raise AveragingFailed(f"all-reduce failed: {type(e).__name__}: {e}") from None
        if not gathered:
            raise AveragingFailed("no group found for this round")
        peers = {str(k): v for k, v in gathered.items()}
        banned = self._ban_rejected()
        if banned:  # tell the group (a differing hash fails the round for everyone), then fail it here
            self._verify_consensus([], peers, round_no, mine="rejected:" + ",".join(sorted(banned)), wait=False)
            raise AveragingFailed(banned_message(banned))
        self._check_group(peers, round_no, gathered_meta)
        averaged: list[torch.Tensor | None] = [None] * len(self.shapes)
        with self._averager.get_tensors() as tensors:
            for i in active:
                averaged[i] = tensors[i].clone()
        if any(not bool(torch.isfinite(averaged[i]).all()) for i in active):
            raise AveragingFailed("the group's average is not finite")
        self._verify_consensus([averaged[i] for i in active], peers, round_no)
        residual_norm = 0.0
        if self.carried is not None:
            for i in active:
                self.carried[i] = self._sent_residuals[i].view(self.shapes[i]).clone()
            residual_norm = math.sqrt(sum(float(self.carried[i].pow(2).sum()) for i in active))
        return RoundResult(averaged, len(peers), peers, int(self._wire[0]), int(self._wire[1]),
                           time.perf_counter() - t0, residual_norm=residual_norm)

    def _ban_rejected(self) -> dict[str, str]:
        """Peers whose data our reducer refused this round are left out of our all-reduces from now on."""
        try:
            rejected = {p: why for p, why in self._averager.pop_rejected().items() if p != self.peer_id}
        except Exception as e:
            logger.debug("could not read rejections: %s", e)
            return {}
        if rejected:
            self.banned.update(rejected)
            self._averager.set_policy(banned=frozenset(self.banned))
            logger.warning(banned_message(rejected))
        return rejected

    def _verify_consensus(self, averaged: list[torch.Tensor], peers: dict[str, dict], round_no: int,
                          mine: str | None = None, wait: bool = True) -> None:
        """Every member publishes the hash of its average and checks the others' before anything is
        applied: a member whose slice owner died (or lied to some members) must not apply it."""
        mine = mine or theta_hash(averaged)
        group_id = hashlib.sha256("".join(sorted(str(m.get("nonce")) for m in peers.values())).encode()).hexdigest()
        key = f"{self.prefix}_consensus_{round_no}_{group_id[:16]}"  # one key per group formed, not per round
        self.dht.store(key, subkey=self.peer_id, value=mine, expiration_time=get_dht_time() + 120)
        if not wait:
            return
        deadline = time.monotonic() + self.cfg.consensus_timeout
        while True:
            found = self.dht.get(key, latest=True)
            seen = {k: v.value for k, v in found.value.items()} if found is not None and isinstance(found.value, dict) else {}
            theirs = {p: seen.get(p) for p in peers if p != self.peer_id}
            if any(h is not None and h != mine for h in theirs.values()):
                raise AveragingFailed("group members hold different averages (a peer dropped out mid-all-reduce)")
            if all(h is not None for h in theirs.values()):
                return
            if time.monotonic() > deadline:
                missing = [p[-8:] for p, h in theirs.items() if h is None]
                logger.info("no average hash from %s (left the group?); the others agree", ", ".join(missing))
                return
            time.sleep(0.1)

    @staticmethod
    def _check_group(peers: dict[str, dict], round_no: int, meta: dict) -> None:
        for pid, m in peers.items():
            if not isinstance(m, dict):
                raise AveragingFailed(f"peer {pid[-8:]} sent malformed metadata")
            if m.get("round") != round_no:
                raise AveragingFailed(f"peer {pid[-8:]} averaged for round {m.get('round')}, we are in {round_no}")
            for what in ("fingerprint", "active", "codec"):
                if m.get(what) != meta.get(what):
                    raise AveragingFailed(f"peer {pid[-8:]} has {what} {m.get(what)}, ours is {meta.get(what)}")

    def set_priority(self, round_no: int) -> None:
        """Late joiners try the most advanced peers first (hivemind's state-sharing priority; a claim
        anyone can make, so joiners verify what they download)."""
        self._averager.state_sharing_priority = float(round_no)

    def load_state_from_peers(self, timeout: float, exclude: Sequence[str] = ()
                              ) -> tuple[str, dict, list[torch.Tensor]] | None:
        """(donor peer ID, metadata, tensors) from the highest-priority donor not in `exclude`; None if
        nobody answered."""
        try:
            return self._averager.load_state_from(exclude, timeout)
        except Exception as e:
            logger.warning("state download failed: %s: %s", type(e).__name__, e)
            return None

    def shutdown(self) -> None:
        try:
            self._averager.shutdown()
        except Exception as e:  # shutting down must never raise
            logger.debug("averager shutdown: %s", e)
