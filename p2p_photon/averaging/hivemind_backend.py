"""Every use of hivemind's internals, fenced in one module.

Our all-reduce (see the package docstring) runs inside hivemind's averager process, on hivemind's
matchmaking and butterfly all-reduce, so it needs more than hivemind's public API: it subclasses
`DecentralizedAverager`, `AllReduceRunner`, `TensorPartContainer` and `TensorPartReducer`, overrides
some of their private methods and reads some of their private attributes. All of that is here and
nowhere else in the project: every override says what of hivemind's behaviour it relies on, and
tests/test_hivemind_contract.py has a test for each, so an upgrade of hivemind fails there, by name,
instead of as a hung or wrong all-reduce in a swarm. The protocol itself (weights, robust combination,
error feedback, checks) is plain functions in `protocol.py`, called from here.

Version check: this module was written against hivemind 1.1.12 (pinned in pyproject.toml). On any
other version it logs ONE warning naming the contract tests, and carries on. It does not raise:
the contract tests import this module, so an import error would block the very check that tells
whether the new version still works, and a patch release often does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, AsyncIterator  # noqa: UP035 (hivemind reads a handler's hint by typing's _name)

import hivemind
import torch
from hivemind import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.averaging.partition import BannedException, TensorPartContainer, TensorPartReducer
from hivemind.compression import CompressionInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, enter_asynchronously
from hivemind.utils.mpfuture import MPFuture

from ..codecs import Codec, make_codec
from . import protocol
from .state_download import donors_by_priority, read_state

logger = logging.getLogger(__name__)

HIVEMIND_VERSION = "1.1.12"
RESULT_LINGER_S = 1.0  # an owner keeps a sender's stream open this long after its last result (OwnerRunner)
JOIN_RETRY_S = 0.5  # pause between requests to a stage's designated leader that refused us
DESIGNATED_ANSWER_S = 5.0  # how long a stage's member waits for its designated leader to answer its join
CONTRACT_TESTS = "tests/test_hivemind_contract.py"
_version_warned = False


def version_warning(version: str) -> str | None:
    """The warning for running on another hivemind than this module was written against, or None."""
    if version == HIVEMIND_VERSION:
        return None
    return (f"p2p_photon's averaging was written against hivemind {HIVEMIND_VERSION} and relies on its "
            f"internals; this is hivemind {version}. Run `pytest {CONTRACT_TESTS}` before trusting an "
            "all-reduce (a failing test names what changed).")


def check_hivemind_version(version: str = hivemind.__version__) -> None:
    """Log `version_warning` once per process (see the module docstring for why not raise)."""
    global _version_warned
    warning = version_warning(version)
    if warning and not _version_warned:
        _version_warned = True
        logger.warning(warning)


check_hivemind_version()


# ----------------------------------------------------------------------------- the all-reduce


class EncodingContainer(TensorPartContainer):
    """Splits the active tensors into parts like hivemind does, but encodes a sender's parts with our
    codec and writes what the encoding lost into the (shared-memory) error-feedback buffers."""

    # Relies on: TensorPartContainer.__init__ filling `_input_parts_by_peer[peer]` with (flat view of a
    # tensor, CompressionInfo with key = tensor index, part_index, part_size = values per part), so a
    # part starts at part_index * part_size of its tensor; `return_deltas=False` makes a failed reducer's
    # parts our own values (we fail the round on it anyway).
    def __init__(self, tensors: Sequence[torch.Tensor], peer_fractions: Sequence[float], *, codec: Codec,
                 residuals: dict[int, torch.Tensor] | None, tensor_infos: Sequence[CompressionInfo],
                 part_size_bytes: int):
        super().__init__(tensors, peer_fractions, tensor_infos=tensor_infos, part_size_bytes=part_size_bytes,
                         return_deltas=False)
        self.codec, self.residuals = codec, residuals

    def part_location(self, peer_index: int, part_index: int) -> tuple[int, int, int]:
        """(global tensor index, start offset, numel) of a part."""
        part, info = self._input_parts_by_peer[peer_index][part_index]
        return info.key, info.part_index * info.part_size, part.numel()

    # Overrides hivemind's (public) iterate_input_parts_for; relies on the `_inputs_consumed_by_peer`
    # flags it keeps and on `prefetch`.
    async def iterate_input_parts_for(self, peer_index: int) -> AsyncIterator[runtime_pb2.Tensor]:
        assert not self._inputs_consumed_by_peer[peer_index], "input parts of this peer are already gone"
        self._inputs_consumed_by_peer[peer_index] = True
        parts = as_aiter(*self._input_parts_by_peer[peer_index])
        async for msg in amap_in_executor(self.encode_part, parts, max_prefetch=self.prefetch):
            yield msg

    def encode_part(self, item: tuple[torch.Tensor, CompressionInfo]) -> runtime_pb2.Tensor:
        part, info = item
        residual = None
        if self.residuals is not None:
            start = info.part_index * info.part_size
            residual = self.residuals[info.key][start:start + part.numel()]
        return protocol.encode_with_feedback(self.codec, part, residual)


class CollectingReducer(TensorPartReducer):
    """Keeps every sender's contribution to the current part (hivemind keeps a running weighted sum)
    and combines them with `combine(part_index, [(sender, tensor, weight), ...]) -> decoded output`
    once all are in, in sender order, so every owner does the same float ops."""

    # Relies on: TensorPartReducer.__init__ calling reset_accumulators(); its part state machine
    # (current_part_index, current_part_future, finished, num_parts_received, sender_failed_after,
    # current_part_accumulated_from, num_current_senders); on_sender_failed calling
    # check_current_part_finished(). accumulate_part is hivemind's with the running sum replaced.
    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, combine: Callable):
        self.combine = combine
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self.contributions: dict[int, tuple[torch.Tensor, float]] = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.contributions[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            contributions = [(i, *self.contributions[i]) for i in sorted(self.contributions)]
            self.current_part_future.set_result(self.combine(self.current_part_index, contributions))
            self.reset_accumulators()


class OwnerRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, except that each owner sends back ONE identically-encoded result
    per part (hivemind sends each member the delta to its own values), with weight checks, robust
    combination, error feedback and bytes counted on the messages actually sent and received."""

    # Relies on: AllReduceRunner.__init__ building tensor_part_container, parts_for_local_averaging and
    # tensor_part_reducer from `tensors` (we pass none) and run() reading them through self, so they can
    # be replaced right after; run() calling _communicate_with_peer(peer_id) for every owner and
    # rpc_aggregate_part calling _accumulate_parts_streaming(stream, sender_index) and consulting
    # should_delay_results(sender) to hold a sender's results back.
    def __init__(self, *, codec: Codec, residuals: dict[int, torch.Tensor] | None,
                 out_residuals: dict[int, torch.Tensor] | None, aggregator: str, clip_factor: float,
                 weight_caps: dict[str, float], tensor_infos: Sequence[CompressionInfo], part_size_bytes: int,
                 **kwargs):
        tensors = kwargs.pop("tensors")
        super().__init__(tensors=(), **kwargs)
        self.codec, self.aggregator, self.clip_factor = codec, aggregator, clip_factor
        self.weight_caps = weight_caps
        self.out_residuals, self.staged_out_residuals = out_residuals, {}
        self.bytes_sent = self.bytes_received = 0
        self.failed_reducers: set[str] = set()
        self.rejected: dict[str, str] = {}  # peer id -> why its data was refused
        self.outputs: dict[int, Any] = {}  # part index -> the encoded result we send to every member
        me = self.ordered_peer_ids.index(self.peer_id)
        self.tensor_part_container = EncodingContainer(
            tensors, self.peer_fractions, codec=codec, residuals=residuals, tensor_infos=tensor_infos,
            part_size_bytes=part_size_bytes)
        self.parts_for_local_averaging = self.tensor_part_container.get_raw_input_parts(me)
        self.my_locations = [self.tensor_part_container.part_location(me, i)
                             for i in range(len(self.parts_for_local_averaging))]
        self.tensor_part_reducer = CollectingReducer(tuple(p.shape for p in self.parts_for_local_averaging),
                                                     len(self.sender_peer_ids), self.combine)

    # -- owner side
    def combine(self, part_index: int, contributions: list[tuple[int, torch.Tensor, float]]) -> torch.Tensor:
        key, start, n = self.my_locations[part_index]
        carried = self.out_residuals[key][start:start + n] if self.out_residuals is not None else None
        combined = protocol.combine_part([(x, w) for _, x, w in contributions], n, codec=self.codec,
                                         aggregator=self.aggregator, clip_factor=self.clip_factor,
                                         carried=carried)
        for pos in combined.dropped:
            sender = self.sender_peer_ids[contributions[pos][0]].to_base58()
            self.rejected.setdefault(sender, "sent non-finite values")
        if combined.residual is not None:
            self.staged_out_residuals[(key, start)] = combined.residual
        self.outputs[part_index] = combined.message
        return combined.decoded

    # Extends hivemind's rpc_aggregate_part(stream, context) (the owner's handler of one sender's stream; the
    # averager's handler delegates to it): the stream stays open RESULT_LINGER_S after our last result (the
    # sender stops reading once it has every part, see receive_averages, so nobody waits for this). On an
    # emulated 100 Mbit link a client-mode sender (whose results hivemind then held and sent in one burst)
    # sometimes received all but the last part ('sent 20 parts, expected 21') when the handler returned, and
    # so closed the stream, right after writing it; it then failed the round the others completed.
    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for msg in super().rpc_aggregate_part(stream, context):
            yield msg
        await asyncio.sleep(RESULT_LINGER_S)

    # hivemind holds the results of a client-mode sender (one that owns no slice) until it has sent all
    # its parts, so a NAT'd volunteer uploads its whole Δ and only then downloads the average: on a
    # symmetric link about twice an owner's time (measured: 17.8 s for 10.5 MB each way at 10 Mbit, where
    # one direction takes 8.8 s). Our senders read results while they send (_communicate_with_peer), so
    # an owner streams every sender's results as soon as each part is combined.
    def should_delay_results(self, peer_id: PeerID) -> bool:
        return False

    # Overrides hivemind's private _accumulate_parts_streaming(stream, sender_index), called by
    # rpc_aggregate_part; relies on _ban_sender(peer_id) and tensor_part_reducer.num_parts.
    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                          sender_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        part_index = 0
        sender = self.sender_peer_ids[sender_index].to_base58()
        try:
            async for msg in stream:
                self.bytes_received += msg.ByteSize()
                part = await self.decode_contribution(msg, sender, part_index)
                try:
                    await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                   weight=msg.weight)
                except BannedException:
                    break
                out = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                  tensor_part=self.outputs[part_index])
                self.bytes_sent += out.ByteSize()
                part_index += 1
                yield out
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def decode_contribution(self, msg: averaging_pb2.AveragingData, sender: str, part_index: int
                                  ) -> torch.Tensor:
        """A sender's part, decoded and checked (weight within its cap, right size); a refused sender is
        remembered (and banned by the caller) and the all-reduce with it fails."""
        expected = self.parts_for_local_averaging
        try:
            problem = protocol.weight_problem(msg.weight, protocol.weight_cap(self.weight_caps, sender),
                                              zero_ok=self.aggregator == protocol.BROADCAST)
            if problem:
                raise AllreduceException(problem)
            part = await asyncio.get_event_loop().run_in_executor(None, self.codec.decode, msg.tensor_part)
            want = expected[part_index].numel() if part_index < len(expected) else 0
            if part_index >= len(expected) or part.numel() != want:
                raise AllreduceException(f"sent a part of {part.numel()} values where we expect {want}")
        except (AllreduceException, ValueError) as e:
            self.rejected.setdefault(sender, str(e))
            logger.warning("rejected the contribution of peer %s: %s", sender[-8:], e)
            raise AllreduceException(str(e)) from None
        return part.reshape(expected[part_index].shape)

    # -- sender side
    # Overrides hivemind's private _generate_input_for_peer(peer_index) (same messages: the first one
    # carries code and group_id), to count bytes.
    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        first = True
        async for part in self.tensor_part_container.iterate_input_parts_for(peer_index):
            msg = averaging_pb2.AveragingData(tensor_part=part, weight=self.weight)
            if first:
                msg.code, msg.group_id, first = averaging_pb2.PART_FOR_AVERAGING, self.group_id, False
            self.bytes_sent += msg.ByteSize()
            yield msg

    # Overrides hivemind's private _communicate_with_peer(peer_id): owners return averages, not deltas.
    # Relies on _get_peer_stub(peer), reducer_timeout, and the container's register_processed_part /
    # register_failed_reducer / num_parts_by_peer.
    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            await self.average_own_parts(peer_index)
            return
        try:
            inputs = self._generate_input_for_peer(peer_index)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            await self.receive_averages(stream, peer_id, peer_index)
        except BaseException as e:
            self.failed_reducers.add(str(peer_id))
            if isinstance(e, Exception):
                logger.warning("all-reduce with owner %s failed: %r", str(peer_id)[-8:], e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def average_own_parts(self, peer_index: int) -> None:
        sender_index = self.sender_peer_ids.index(self.peer_id)
        for part_index, part in enumerate(self.parts_for_local_averaging):
            averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part,
                                                                      weight=self.weight)
            self.tensor_part_container.register_processed_part(peer_index, part_index,
                                                               averaged.reshape(part.shape))

    async def receive_averages(self, stream: AsyncIterator[averaging_pb2.AveragingData], peer_id: PeerID,
                               peer_index: int) -> None:
        container = self.tensor_part_container
        part_index = 0
        async for msg in aiter_with_timeout(stream, self.reducer_timeout):
            self.bytes_received += msg.ByteSize()
            if msg.code != averaging_pb2.AVERAGED_PART:
                raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
            if part_index >= container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"{peer_id} sent more parts than it owns")
            averaged = await self.decode_average(msg, peer_id, peer_index, part_index)
            container.register_processed_part(peer_index, part_index, averaged)
            part_index += 1
            if part_index == container.num_parts_by_peer[peer_index]:
                break  # all of it: do not wait for the owner to close the stream (it lingers, see above)
        if part_index != container.num_parts_by_peer[peer_index]:
            raise AllreduceException(f"peer {peer_id} sent {part_index} parts, expected "
                                     f"{container.num_parts_by_peer[peer_index]}")

    async def decode_average(self, msg: averaging_pb2.AveragingData, peer_id: PeerID, peer_index: int,
                             part_index: int) -> torch.Tensor:
        """An owner's result for one part of its slice, decoded and checked; a refused owner is remembered."""
        _, _, n = self.tensor_part_container.part_location(peer_index, part_index)
        try:
            loop = asyncio.get_event_loop()
            averaged = await loop.run_in_executor(None, self.codec.decode, msg.tensor_part)
            problem = protocol.average_problem(averaged, n)
            if problem:
                raise AllreduceException(problem)
        except (ValueError, AllreduceException) as e:
            self.rejected.setdefault(peer_id.to_base58(), f"as owner of a slice: {e}")
            raise AllreduceException(str(e)) from None
        return averaged


# ----------------------------------------------------------------------------- the averager process


def welcome_joins(avg: _Averager, matchmaking: Matchmaking) -> Callable:
    """Matchmaking's `_request_join_group(leader)` for `avg`: never a non-member or banned leader, only a stage's
    designated leader (asked again while it refuses us for a passing reason), nobody for a cancelled step."""
    request_join_group = matchmaking._request_join_group

    async def request_join_welcome_group(leader: PeerID) -> GroupInfo | None:
        if step_is_over(matchmaking):  # a cancelled step's search, winding down: its metadata is stale
            return None
        if not avg._is_welcome(leader):
            logger.debug("not joining the group of non-member or banned peer %s", leader.to_base58()[-8:])
            return None
        chosen = avg._policy.get("leader")
        if chosen is None:
            return await request_join_group(leader)
        if leader.to_base58() != chosen:  # a stage with a designated leader
            return None
        # hivemind tries each (leader, expiration) once per step; a designated leader that refused us
        # for a passing reason (not declared or not looking yet: the stage's members start it a moment
        # apart) would never be asked again, and with no one else to join we would fail the stage
        while True:
            joined = await join_patiently(matchmaking, request_join_group, leader)
            if joined is not None or matchmaking.assembled_group.done() or not matchmaking.is_looking_for_group \
                    or get_dht_time() > matchmaking.potential_leaders.search_end_time - 2 * JOIN_RETRY_S:
                return joined
            await asyncio.sleep(JOIN_RETRY_S)

    return request_join_welcome_group


def step_is_over(matchmaking: Matchmaking) -> bool:
    """The step whose matchmaking runs is done (cancelled: hivemind's _step returned without awaiting it)."""
    return matchmaking.step_control is not None and matchmaking.step_control.done()


async def join_patiently(matchmaking: Matchmaking, request_join_group: Callable, leader: PeerID
                         ) -> GroupInfo | None:
    """Ask a stage's designated leader, waiting up to DESIGNATED_ANSWER_S for its answer. hivemind waits
    request_timeout (matchmaking_time / 2), so that a follower does not sit on one unresponsive leader while
    others wait on it; with one leader to ask there is nobody else, and a follower that gave up on a slow
    ACCEPTED was still counted into the leader's group, which then waited for its part and failed
    (test_averaging, a loaded machine: 'could not find a group' on one side, 50 % of the parts on the other)."""
    usual = matchmaking.request_timeout
    matchmaking.request_timeout = max(usual, DESIGNATED_ANSWER_S)
    try:
        return await request_join_group(leader)
    finally:
        matchmaking.request_timeout = usual


class _Averager(DecentralizedAverager):
    """DecentralizedAverager running our all-reduce; closed-swarm membership and bans at matchmaking,
    all-reduce and state sharing; state for late joiners from the peer's `state_fn`.

    The class name is on the wire: hivemind names RPC handles after the servicer class
    ("<prefix>::_Averager.rpc_join_group"), so renaming it cuts peers off from earlier versions."""

    def __init__(self, averaged_tensors: Sequence[torch.Tensor], dht, *, state_fn: Callable | None = None,
                 codec_name: str = "none", aggregator: str = "mean", clip_factor: float = 2.0,
                 error_feedback: bool = True, members: frozenset[str] | None = None,
                 residuals: list[torch.Tensor] | None = None, wire: torch.Tensor | None = None, **kwargs):
        self._state_fn, self._codec_name = state_fn, codec_name
        self._aggregator, self._clip_factor = aggregator, clip_factor
        self._error_feedback, self._members = error_feedback, members
        self._min_group = int(kwargs.get("min_group_size") or 1)
        self._target_group = kwargs.get("target_group_size")
        self._residuals, self._wire = residuals, wire  # shared memory: written here, read by SwarmAverager
        self._policy: dict[str, Any] = dict(active=None, weight_caps={}, banned=frozenset())
        self._rejected: dict[str, str] = {}
        self._out_residuals: dict[int, torch.Tensor] | None = None
        super().__init__(averaged_tensors, dht, **kwargs)

    # hivemind's documented extension point: (metadata, tensors, compression infos or None).
    def get_current_state(self) -> tuple[dict, Sequence[torch.Tensor], None]:
        if self._state_fn is None:
            return dict(), [], None
        metadata, tensors = self._state_fn()
        return metadata, tensors, None

    # -- calls into the averager process
    # Relies on hivemind's control pipe: `_outer_pipe` (host side), and the averager process running
    # `getattr(self, method)(*args, **kwargs)` as a task for each (method, args, kwargs) it receives.
    def call_in_averager(self, method: str, wait_s: float, /, **kwargs) -> Any:
        """Run one of our coroutine methods in the averager process and wait up to `wait_s` for what it
        sets (positional: the method's own keyword arguments may include a `timeout`)."""
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(kwargs, future=future)))
        return future.result(timeout=wait_s)

    def set_policy(self, **policy) -> None:
        """Per-round settings before step(): active tensors, weight caps, bans; per stage of a round
        (None: the configured value / anyone) codec, aggregator, error_feedback, target_group_size, and
        the leader whose group alone we join (so a stage forms one group, never two halves)."""
        self.call_in_averager("_set_policy", 30, policy=policy)

    async def _set_policy(self, policy: dict, future: MPFuture) -> None:
        self._policy.update(policy)
        if "target_group_size" in policy:  # a stage's group size (see stages.py); hivemind reads both
            target = policy["target_group_size"] or self._target_group
            self._matchmaking.target_group_size = target
            self._matchmaking.potential_leaders.target_group_size = target
        future.set_result(None)

    def pop_rejected(self) -> dict[str, str]:
        """Peers whose data this averager refused since the last call (peer id -> why)."""
        return self.call_in_averager("_pop_rejected", 30)

    async def _pop_rejected(self, future: MPFuture) -> None:
        rejected, self._rejected = self._rejected, {}
        future.set_result(rejected)

    def _is_member(self, peer_id: PeerID) -> bool:
        return self._members is None or peer_id.to_base58() in self._members

    def _is_welcome(self, peer_id: PeerID) -> bool:
        return self._is_member(peer_id) and peer_id.to_base58() not in self._policy["banned"]

    # -- matchmaking: never ask a non-member or banned peer to lead our group
    # Relies on: hivemind assigning `self._matchmaking = Matchmaking(...)` in the averager process (so
    # this setter sees it before any matchmaking), DecentralizedAverager not defining `_matchmaking` as
    # a class attribute, and Matchmaking calling `self._request_join_group(leader)` (an instance lookup,
    # so the wrapper sees every leader, redirects included) and returning None for "not joined".
    @property
    def _matchmaking(self) -> Matchmaking:
        return self.__dict__["_matchmaking_"]

    @_matchmaking.setter
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        """Followers of an outsider's group would be left alone in it once we drop the outsider."""
        matchmaking._request_join_group = welcome_joins(self, matchmaking)
        # hivemind moves a peer's group bits after each all-reduce by sampling target_group_size buckets
        # for the group's members; a stage whose group is larger than the configured target (stage 2 with
        # more groups than averaging.target_group_size) made that raise inside the leader, which then
        # refused the extra member (INTERNAL_ERROR). We set the group bits before every stage ourselves,
        # so the key manager may size its buckets by the group it got (None: the next power of two).
        matchmaking.group_key_manager.target_group_size = None
        self.__dict__["_matchmaking_"] = matchmaking

    # Overrides hivemind's private _aggregate_with_group(group_info, min_vector_size, **kwargs), called by
    # _step with tensor_infos, weight and allreduce_kwargs; relies on each gathered entry being
    # serializer.dumps([bandwidth, mode.value, user bytes]), on load_balance_peers and on _step retrying
    # on MatchmakingException. Differs from hivemind: unwelcome peers are dropped first.
    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs
                                    ) -> dict[PeerID, Any]:
        try:
            group_info, decoded = self._drop_unwelcome(group_info)
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

    def _drop_unwelcome(self, group_info: GroupInfo) -> tuple[GroupInfo, list]:
        decoded = [self.serializer.loads(g) for g in group_info.gathered]
        keep = [i for i, p in enumerate(group_info.peer_ids) if self._is_welcome(p)]
        if len(keep) == len(group_info.peer_ids):
            return group_info, decoded
        outsiders = [group_info.peer_ids[i].to_base58()[-8:] for i in range(len(decoded)) if i not in keep]
        logger.info("leaving non-member or banned peer(s) %s out of the all-reduce", ", ".join(outsiders))
        group_info = GroupInfo(group_info.group_id, tuple(group_info.peer_ids[i] for i in keep),
                               tuple(group_info.gathered[i] for i in keep))
        return group_info, [decoded[i] for i in keep]

    # Overrides hivemind's private _run_allreduce_inplace_(tensors, group_info, group_id=None, **kwargs);
    # relies on `_p2p`, on `_running_groups[group_id]` being a Future registered by _step (rpc_aggregate_part
    # awaits the runner from it) and on `_state_updated` / `last_updated` as hivemind's own version sets them.
    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: bytes | None = None, **kwargs) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        kwargs.pop("compression", None)
        kwargs.pop("tensor_infos", None)
        active = self._policy["active"] if self._policy["active"] is not None else list(range(len(tensors)))
        runner = self._make_runner(tensors, group_info, group_id, active, **kwargs)
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

    def _make_runner(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes,
                     active: list[int], **kwargs) -> OwnerRunner:
        """Our runner for the active tensors, with this round's policy; sender residuals of the active
        tensors start from zero, the owner's output residuals persist across rounds."""
        codec = make_codec(self._policy.get("codec") or self._codec_name)
        feedback = self._error_feedback and self._policy.get("error_feedback", True)
        if feedback and codec.lossy and self._out_residuals is None:
            self._out_residuals = {i: torch.zeros(t.numel()) for i, t in enumerate(tensors)}
        residuals = dict(enumerate(self._residuals)) if self._residuals is not None and feedback else None
        if residuals is not None:
            for i in active:
                residuals[i].zero_()
        return OwnerRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, group_id=group_id,
            tensors=[tensors[i] for i in active],
            tensor_infos=[CompressionInfo.from_tensor(tensors[i], key=i) for i in active],
            ordered_peer_ids=group_info.peer_ids, codec=codec, residuals=residuals,
            out_residuals=self._out_residuals if feedback else None,
            aggregator=self._policy.get("aggregator") or self._aggregator, clip_factor=self._clip_factor,
            weight_caps=dict(self._policy.get("weight_caps") or {}), **kwargs)

    # -- RPC handlers: hivemind registers every rpc_* method from its type hints (ServicerBase)
    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Non-members get no state."""
        if not self._is_member(context.remote_id):
            logger.warning("refused state to non-member %s", context.remote_id.to_base58()[-8:])
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """Non-members and banned peers are not let into a group we lead; nobody into a cancelled step's group
        (hivemind's _step returns while its matchmaking winds down; a group assembled then carries the stale
        step's metadata, and no step of ours runs it: 'averaged for round 3, we are in 4')."""
        if not self._is_welcome(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if step_is_over(self._matchmaking):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    # -- state download with donor exclusion (the caller verifies what it got and retries without it)
    def load_state_from(self, exclude: Sequence[str], timeout: float
                        ) -> tuple[str, Any, list[torch.Tensor]] | None:
        """(donor, metadata, tensors) from the first donor that answers, or None."""
        return self.call_in_averager("_load_state_excluding", timeout * 4 + 10, exclude=list(exclude),
                                     timeout=timeout)

    # Like hivemind's _load_state_from_peers: relies on donors being declared under
    # f"{_matchmaking.group_key_manager.prefix}.all_averagers" and on get_stub(_p2p, peer, namespace=prefix).
    async def _load_state_excluding(self, exclude: list[str], timeout: float, future: MPFuture) -> None:
        try:
            found = self.dht.get(f"{self._matchmaking.group_key_manager.prefix}.all_averagers", latest=True)
            donors = donors_by_priority(found, me=self.peer_id, exclude=exclude, is_member=self._is_member)
            for peer in donors:
                try:
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, tensors = await read_state(stream, timeout, self.serializer.loads)
                    if metadata:
                        future.set_result((peer.to_base58(), metadata, tensors))
                        return
                except Exception as e:
                    logger.info("state download from %s failed: %r", peer.to_base58()[-8:], e)
        finally:
            if not future.done():
                future.set_result(None)


@contextlib.contextmanager
def keep_sigint() -> Iterator[None]:
    """hivemind's run_in_background sets SIGINT to SIG_IGN in the *calling* process before it forks,
    which would make Ctrl-C do nothing; put the caller's handler back."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        yield
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def start_averager(averaged_tensors: Sequence[torch.Tensor], dht, **kwargs) -> _Averager:
    """A started _Averager (its process forked and ready), Ctrl-C still working in the caller."""
    with keep_sigint():
        return _Averager(averaged_tensors, dht, start=True, **kwargs)


def own_interprocess_locks() -> None:
    """In a process forked from one that imported hivemind (the zygote's children): its own copies of the
    multiprocessing locks hivemind creates at import. Each is one semaphore shared by every process forked
    from the importer; MPFuture takes two of them for every DHT call and state transfer (SharedBytes._lock,
    MPFuture._update_lock). A zygote child SIGKILLed while it held one froze every other child for good, at
    its next DHT call (soak smoke: the three survivors in their stage waits, SIGTERM unanswered, and the new
    peer in its DHT start-up, all in SharedBytes.next). A peer started by `python -m` imports hivemind itself
    and shares them only with its own DHT and averager children, which die with it."""
    from hivemind.utils import asyncio as hm_asyncio
    from hivemind.utils.mpfuture import MPFuture

    MPFuture.reset_backend()  # new _initialization_lock, _update_lock and SharedBytes._lock; no future exists yet
    hm_asyncio._AsyncContextWrapper.EXECUTOR_LOCK = mp.Lock()
