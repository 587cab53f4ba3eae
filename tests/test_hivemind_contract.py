"""What p2p_photon/averaging/hivemind_backend.py relies on in hivemind's internals, one test per reliance.

The backend subclasses hivemind's averager, all-reduce runner, part container and reducer, overrides
private methods and reads private attributes. Each test here fails, with the name of what changed,
if hivemind stops doing what an override assumes: run this file first after upgrading hivemind.
Checks run on real hivemind objects where that is cheap (no network: fake p2p objects, and two
runners wired to each other in one event loop) and on hivemind's source otherwise.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing.process
import re
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import hivemind
import pytest
import torch
from hivemind import DecentralizedAverager
from hivemind.averaging import allreduce, averager, key_manager, matchmaking, partition
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, PotentialLeaders
from hivemind.averaging.partition import TensorPartContainer, TensorPartReducer
from hivemind.compression import CompressionInfo
from hivemind.p2p import PeerID, ServicerBase
from hivemind.p2p import servicer as servicer_module
from hivemind.proto import averaging_pb2

from p2p_photon.averaging import hivemind_backend as hb
from p2p_photon.averaging.hivemind_backend import CollectingReducer, EncodingContainer, OwnerRunner, _Averager
from p2p_photon.codecs import make_codec
from tests.helpers import python_env

pytestmark = pytest.mark.timeout(60)

DA = DecentralizedAverager  # a short name for the many checks of its source

ME, OTHER = PeerID(b"peer-me"), PeerID(b"peer-other")
OUR_AVERAGER_KWARGS = dict(  # what SwarmAverager passes to hivemind's constructor
    prefix="contract", min_group_size=2, target_group_size=4, min_matchmaking_time=1.0, request_timeout=0.5,
    allreduce_timeout=30.0, next_chunk_timeout=15.0, client_mode=False, declare_state_period=10.0,
    shutdown_timeout=5.0)


def src(obj) -> str:
    return inspect.getsource(obj)


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def hivemind_self_names() -> set[str]:
    """Every `self.<name>` in the hivemind modules we subclass from (and multiprocessing.Process)."""
    modules = (averager, allreduce, partition, matchmaking, servicer_module, multiprocessing.process)
    return set(re.findall(r"\bself\.(\w+)", "".join(src(m) for m in modules)))


@pytest.fixture(scope="module")
def avg():
    """A real _Averager, not started (no process, no network): what hivemind's __init__ sets up."""
    return _Averager([torch.zeros(5), torch.zeros(3)], SimpleNamespace(client_mode=False), start=False,
                     codec_name="int8", **OUR_AVERAGER_KWARGS)


# ----------------------------------------------------------------------------- version


def test_installed_hivemind_is_the_version_the_backend_was_written_against():
    assert hivemind.__version__ == hb.HIVEMIND_VERSION, "review every test below, then bump HIVEMIND_VERSION"


def test_another_hivemind_version_is_logged_once_naming_the_contract_tests(monkeypatch, caplog):
    monkeypatch.setattr(hb, "_version_warned", False)
    with caplog.at_level(logging.WARNING, logger=hb.__name__):
        hb.check_hivemind_version(hb.HIVEMIND_VERSION)
        assert not caplog.records
        hb.check_hivemind_version("9.9.9")
        hb.check_hivemind_version("9.9.9")
    assert len(caplog.records) == 1
    assert "hivemind 9.9.9" in caplog.text and "tests/test_hivemind_contract.py" in caplog.text


# ----------------------------------------------------------------------------- names we add or override

EXPECTED_OVERRIDES = {
    EncodingContainer: {"__init__", "iterate_input_parts_for"},
    CollectingReducer: {"__init__", "reset_accumulators", "accumulate_part", "check_current_part_finished"},
    OwnerRunner: {"__init__", "_accumulate_parts_streaming", "_generate_input_for_peer",
                  "_communicate_with_peer", "rpc_aggregate_part", "should_delay_results"},
    _Averager: {"__init__", "get_current_state", "_matchmaking", "_aggregate_with_group",
                "_run_allreduce_inplace_", "rpc_download_state", "rpc_join_group"},
}


@pytest.mark.parametrize("cls", list(EXPECTED_OVERRIDES), ids=lambda c: c.__name__)
def test_we_override_exactly_the_hivemind_names_that_have_a_contract_test_here(cls):
    """A new override (or a name hivemind started using that ours now shadows) needs its own contract test."""
    base = cls.__mro__[1]
    hivemind_names = hivemind_self_names() | set(dir(base)) | set(getattr(base, "__annotations__", {}))
    ours = {n for n in vars(cls) if not (n.startswith("__") and n != "__init__")}
    assert {n for n in ours if n in hivemind_names} == EXPECTED_OVERRIDES[cls]


def test_our_instance_attributes_on_the_averager_do_not_shadow_hiveminds(avg):
    plain = DecentralizedAverager([torch.zeros(5), torch.zeros(3)], SimpleNamespace(client_mode=False),
                                  start=False, **OUR_AVERAGER_KWARGS)
    ours = set(vars(avg)) - set(vars(plain))
    assert ours and ours.isdisjoint(hivemind_self_names()), ours & hivemind_self_names()


def test_our_instance_attributes_on_runner_container_and_reducer_do_not_shadow_hiveminds():
    async def built():
        runner = _runners([1.0, 1.0], wired=False)[0]
        tensors = [torch.zeros(40), torch.zeros(24)]
        plain_runner = AllReduceRunner(p2p=SimpleNamespace(peer_id=ME), servicer_type=_Averager, prefix="c",
                                       group_id=b"group", tensors=tensors, ordered_peer_ids=[ME, OTHER],
                                       peer_fractions=(0.5, 0.5), part_size_bytes=64)
        pairs = [(runner, plain_runner), (runner.tensor_part_container, plain_runner.tensor_part_container),
                 (runner.tensor_part_reducer, plain_runner.tensor_part_reducer)]
        added = {type(ours).__name__: set(vars(ours)) - set(vars(plain)) for ours, plain in pairs}
        runner.finalize()
        plain_runner.finalize()
        return added

    for name, ours in asyncio.run(built()).items():
        assert ours and ours.isdisjoint(hivemind_self_names()), (name, ours & hivemind_self_names())


# ----------------------------------------------------------------------------- the averager


def test_averager_init_takes_our_arguments_and_sets_what_we_read(avg):
    """_outer_pipe, _running_groups, total_size, serializer, prefix: set by DecentralizedAverager.__init__."""
    assert isinstance(avg._running_groups, dict) and avg.total_size == 8 and avg.prefix == "contract"
    assert avg.serializer.loads(avg.serializer.dumps({"a": 1})) == {"a": 1}
    assert set(avg.allreduce_kwargs) == {"compression", "part_size_bytes", "min_vector_size",
                                         "sender_timeout", "reducer_timeout"}  # we drop compression
    assert avg._min_group == 2 and avg.next_chunk_timeout == 15.0


def test_the_control_pipe_runs_a_named_coroutine_with_the_kwargs_we_send(avg):
    """call_in_averager sends (method, [], kwargs) on _outer_pipe; the averager process runs it as a task."""
    while avg._inner_pipe.poll():
        avg._inner_pipe.recv()
    avg._outer_pipe.send(("_pop_rejected", [], {"future": None}))
    assert avg._inner_pipe.recv() == ("_pop_rejected", [], {"future": None})
    loop_src = src(DecentralizedAverager._run_internal)
    assert "method, args, kwargs = self._inner_pipe.recv()" in loop_src
    assert "asyncio.create_task(getattr(self, method)(*args, **kwargs))" in loop_src
    assert all(inspect.iscoroutinefunction(f) for f in (_Averager._set_policy, _Averager._pop_rejected))


def test_matchmaking_is_an_instance_attribute_assigned_in_the_averager_process():
    """Our `_matchmaking` property setter sees hivemind's `self._matchmaking = Matchmaking(...)`."""
    assert all("_matchmaking" not in vars(c) for c in DecentralizedAverager.__mro__)
    assert "self._matchmaking = Matchmaking(" in src(DecentralizedAverager._run_internal)
    assert "self._matchmaking.group_key_manager.group_bits = group_bits" in src(DA._set_group_bits)


def test_our_matchmaking_never_asks_an_unwelcome_leader(avg, monkeypatch):
    asked = []

    async def request_join_group(leader):
        asked.append(leader)
        return "group"

    mm = SimpleNamespace(_request_join_group=request_join_group, group_key_manager=SimpleNamespace(),
                         step_control=None)
    monkeypatch.setattr(avg, "_members", frozenset({ME.to_base58()}))
    avg._matchmaking = mm
    assert avg._matchmaking is mm
    assert asyncio.run(mm._request_join_group(OTHER)) is None
    assert asyncio.run(mm._request_join_group(ME)) == "group" and asked == [ME]
    mm.step_control = SimpleNamespace(done=lambda: True)  # a cancelled step's search asks nobody
    assert asyncio.run(mm._request_join_group(ME)) is None and asked == [ME]


def test_a_designated_leader_that_refused_us_is_asked_again_until_the_search_ends(avg, monkeypatch):
    """Stages 2 and 3 designate their leader; hivemind asks each (leader, expiration) once per step, so a
    passing refusal (not declared yet) would leave the member without a group: we ask again."""
    from hivemind.utils import get_dht_time

    from p2p_photon.averaging import hivemind_backend

    answers = [None, None, "group"]
    asked = []

    async def request_join_group(leader):
        asked.append(leader)
        waits.append(mm.request_timeout)
        return answers.pop(0)

    monkeypatch.setattr(hivemind_backend, "JOIN_RETRY_S", 0.01)
    search = SimpleNamespace(search_end_time=get_dht_time() + 30)
    mm = SimpleNamespace(_request_join_group=request_join_group, assembled_group=SimpleNamespace(done=lambda: False),
                         is_looking_for_group=True, potential_leaders=search, group_key_manager=SimpleNamespace(),
                         step_control=None, request_timeout=0.5)
    waits = []
    avg._matchmaking = mm
    avg._policy["leader"] = ME.to_base58()
    try:
        assert asyncio.run(mm._request_join_group(ME)) == "group" and asked == [ME] * 3
        # the one leader to ask gets DESIGNATED_ANSWER_S to answer (hivemind's request_timeout is restored after)
        assert waits == [hivemind_backend.DESIGNATED_ANSWER_S] * 3 and mm.request_timeout == 0.5
        assert asyncio.run(mm._request_join_group(OTHER)) is None and len(asked) == 3  # only the designated one
        answers[:] = [None] * 100
        search.search_end_time = get_dht_time()  # the step's search is over: no more asking
        assert asyncio.run(mm._request_join_group(ME)) is None and len(asked) == 4
    finally:
        avg._policy["leader"] = None
    # what the retry reads from hivemind's Matchmaking
    assert "self.assembled_group = asyncio.Future()" in src(Matchmaking.__init__)
    assert isinstance(Matchmaking.is_looking_for_group, property)
    assert "self.search_end_time = step.deadline" in src(PotentialLeaders.begin_search)


def test_the_key_manager_sizes_its_buckets_by_the_group_when_it_has_no_target(avg):
    """A stage-2 group may hold more peers than averaging.target_group_size; with that target the key
    manager's bucket sampling raised inside the leader (the extra member got INTERNAL_ERROR)."""
    from hivemind.averaging.key_manager import GroupKeyManager

    upd = src(GroupKeyManager.update_key_on_group_assembled)
    assert "num_buckets = self.target_group_size" in upd and "next_power_of_two(group_info.group_size)" in upd
    mm = SimpleNamespace(_request_join_group=None, group_key_manager=SimpleNamespace(target_group_size=2))
    avg._matchmaking = mm
    assert mm.group_key_manager.target_group_size is None


def test_matchmaking_asks_every_leader_through_its_request_join_group_attribute():
    """Leaders from the queue and leaders a disbanding leader redirects to both go through
    `self._request_join_group(leader)`, which returns None when not joined."""
    assert params(Matchmaking._request_join_group) == ["self", "leader"]
    assert inspect.iscoroutinefunction(Matchmaking._request_join_group)
    assert "await self._request_join_group(next_leader)" in src(Matchmaking._request_join_potential_leaders)
    join_src = src(Matchmaking._request_join_group)
    assert "return await self._request_join_group(suggested_leader)" in join_src and "return None" in join_src


def test_aggregate_with_group_is_called_by_step_with_the_arguments_we_take():
    assert params(DA._aggregate_with_group) == ["self", "group_info", "min_vector_size", "kwargs"]
    step_src = src(DecentralizedAverager._step)
    call = step_src.index("self._aggregate_with_group(")
    assert step_src.index("with self._register_allreduce_group(group_info):") < call
    for arg in ("group_info,", "tensor_infos=self.tensor_infos,", "weight=step.weight,",
                "**self.allreduce_kwargs,"):
        assert arg in step_src[call:call + 300], arg
    assert "MatchmakingException," in step_src  # our failure is retried like hivemind's own


def test_gathered_data_is_bandwidth_mode_and_user_bytes_and_modes_are_what_we_map():
    assert "self.serializer.dumps([self.bandwidth, self.mode.value, user_data_for_gather])" in src(
        DecentralizedAverager.step)
    assert (AveragingMode.NODE.value, AveragingMode.CLIENT.value, AveragingMode.AUX.value) == (0, 1, 2)
    group = GroupInfo(b"id", (ME,), (b"x",))
    assert (group.group_id, group.peer_ids, group.gathered) == (b"id", (ME,), (b"x",))
    assert params(load_balance_peers) == ["vector_size", "bandwidths", "min_size"]
    assert load_balance_peers(10, [None, 0.0], 0) == (10, 0)  # a client (bandwidth 0) owns nothing


def test_run_allreduce_inplace_is_replaceable_and_we_update_the_same_state():
    """rpc_aggregate_part awaits the runner from `_running_groups[group_id]`, which _step registered;
    hivemind's version sets last_updated and `_state_updated` as ours does."""
    assert params(DA._run_allreduce_inplace_) == ["self", "tensors", "group_info", "group_id", "kwargs"]
    base_src = src(DecentralizedAverager._run_allreduce_inplace_)
    for line in ("p2p=self._p2p,", "self._running_groups[group_id].set_result(runner)",
                 "self.last_updated = get_dht_time()", "self._state_updated.set()"):
        assert line in base_src, line
    assert "self._running_groups[group_info.group_id] = asyncio.Future()" in src(
        DecentralizedAverager._register_allreduce_group)
    rpc_src = src(DecentralizedAverager.rpc_aggregate_part)
    assert "future = self._running_groups.get(request.group_id)" in rpc_src
    assert "group = await future" in rpc_src


def test_p2p_and_state_updated_are_set_in_the_averager_process_before_it_serves():
    run_src = src(DecentralizedAverager._run_internal)
    assert "self._p2p = await self.dht.replicate_p2p()" in run_src
    assert "self._state_updated = asyncio.Event()" in run_src
    assert run_src.index("self._state_updated = asyncio.Event()") < run_src.index("self._ready.set_result(")


def test_rpc_handlers_are_registered_under_our_class_name_from_our_type_hints():
    """ServicerBase reads rpc_* hints (typing.AsyncIterator, by its _name); handles are named by class."""
    _Averager._collect_rpc_handlers()
    assert "_rpc_handlers" in vars(_Averager) and "_stub_type" in vars(_Averager)
    handlers = {h.method_name: h for h in _Averager._rpc_handlers}
    join, download = handlers["rpc_join_group"], handlers["rpc_download_state"]
    assert (join.request_type, join.response_type, join.stream_output) == (
        averaging_pb2.JoinRequest, averaging_pb2.MessageFromLeader, True)
    assert (download.request_type, download.response_type, download.stream_output) == (
        averaging_pb2.DownloadRequest, averaging_pb2.DownloadData, True)
    assert handlers["rpc_aggregate_part"].stream_input
    assert _Averager._get_handle_name("p", "rpc_join_group") == "p::_Averager.rpc_join_group"
    assert params(ServicerBase.get_stub) == ["p2p", "peer", "namespace"]


def test_no_one_joins_a_group_of_a_step_that_is_over(avg, monkeypatch):
    async def hivemind_join(self, request, context):
        yield averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED)

    async def answers(step):
        avg._matchmaking = SimpleNamespace(_request_join_group=None, group_key_manager=SimpleNamespace(),
                                           step_control=step)
        return [m.code async for m in avg.rpc_join_group(averaging_pb2.JoinRequest(),
                                                           SimpleNamespace(remote_id=OTHER))]

    monkeypatch.setattr(DecentralizedAverager, "rpc_join_group", hivemind_join)
    monkeypatch.setattr(avg, "_members", None)
    running, over = SimpleNamespace(done=lambda: False), SimpleNamespace(done=lambda: True)
    assert asyncio.run(answers(running)) == [averaging_pb2.ACCEPTED]  # hivemind's handler decides
    assert asyncio.run(answers(over)) == [averaging_pb2.NOT_LOOKING_FOR_GROUP]
    monkeypatch.setattr(avg, "_members", frozenset({ME.to_base58()}))
    assert asyncio.run(answers(running)) == [averaging_pb2.PROTOCOL_VIOLATION]  # not a member


def test_a_step_that_is_over_is_seen_by_our_join_handler_and_hivemind_does_not_wait_for_its_matchmaking():
    """rpc_join_group refuses joiners once `_matchmaking.step_control` (set for the whole look_for_group)
    is done; hivemind's _step cancels the matchmaking task on a cancelled step without awaiting it, which
    is the window the refusal closes."""
    assert "self.step_control = step_control" in src(matchmaking.Matchmaking.looking_for_group)
    step_src = src(DecentralizedAverager._step)
    assert "if step.cancelled():\n" in step_src and "matchmaking_task.cancel()\n" in step_src
    assert "await matchmaking_task" not in step_src[step_src.index("matchmaking_task.cancel()"):][:80]
    assert "leader_assemble_group" in src(matchmaking.Matchmaking.rpc_join_group)
    assert "self.step_control.data_for_gather" in src(matchmaking.Matchmaking.leader_assemble_group)


def test_state_donors_are_declared_where_we_look_for_them():
    """_load_state_excluding reads f"{_matchmaking.group_key_manager.prefix}.all_averagers" (subkey: peer ID
    bytes, value: priority) like _load_state_from_peers, and asks get_stub(_p2p, peer, namespace=prefix)."""
    declare_src = src(DecentralizedAverager._declare_for_download_periodically)
    assert 'download_key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"' in declare_src
    assert "subkey=self.peer_id.to_bytes()," in declare_src
    assert "value=self.state_sharing_priority if self.allow_state_sharing else None," in declare_src
    assert key_manager.GroupKeyManager(SimpleNamespace(peer_id=ME), "run-fp", "", 4).prefix == "run-fp"
    load_src = src(DecentralizedAverager._load_state_from_peers)
    assert "stub = self.get_stub(self._p2p, peer, namespace=self.prefix)" in load_src
    assert "stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())" in load_src


def test_state_is_streamed_as_read_state_expects_and_get_current_state_may_return_three_values():
    download_src = src(DecentralizedAverager.rpc_download_state)
    assert "metadata, tensors, infos = await self._get_current_state_from_host_process()" in download_src
    assert "if infos is None:" in download_src and "split_for_streaming(" in download_src
    fetch_src = src(averager._background_thread_fetch_current_state)
    assert "state_metadata, state_tensors, tensor_infos = state" in fetch_src


def test_state_sharing_priority_is_a_public_settable_property(avg):
    assert isinstance(inspect.getattr_static(DecentralizedAverager, "state_sharing_priority"), property)
    avg.state_sharing_priority = 7.0
    assert avg.state_sharing_priority == 7.0


def test_run_in_background_ignores_sigint_in_the_caller_and_keep_sigint_puts_it_back():
    assert "signal.signal(signal.SIGINT, signal.SIG_IGN)" in src(DecentralizedAverager.run_in_background)

    def handler(*_):
        pass

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with hb.keep_sigint():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- container and reducer


def test_container_parts_are_flat_views_whose_info_locates_them():
    """part_location reads `_input_parts_by_peer` as (view, CompressionInfo(key, part_index,
    part_size)); iterate_input_parts_for keeps hivemind's `_inputs_consumed_by_peer` flag."""
    tensors = [torch.arange(40.0), torch.arange(100.0, 124.0)]
    infos = [CompressionInfo.from_tensor(t, key=k) for k, t in zip((3, 5), tensors)]
    residuals = {3: torch.zeros(40), 5: torch.zeros(24)}
    container = EncodingContainer(tensors, (0.5, 0.5), codec=make_codec("int4"), residuals=residuals,
                                  tensor_infos=infos, part_size_bytes=64)  # 16 float32 values per part
    flat = {3: tensors[0], 5: tensors[1]}
    seen = 0
    for peer in range(2):
        for i in range(container.num_parts_by_peer[peer]):
            key, start, n = container.part_location(peer, i)
            assert torch.equal(container._input_parts_by_peer[peer][i][0], flat[key][start:start + n])
            seen += n
    assert seen == 64 and len(container._inputs_consumed_by_peer) == 2

    async def encoded(peer):
        return [m async for m in container.iterate_input_parts_for(peer)]

    msgs = asyncio.run(encoded(1))
    assert container._inputs_consumed_by_peer[1]
    codec = make_codec("int4")
    for i, msg in enumerate(msgs):  # what the encoding lost is in the residual buffer, where the part is
        key, start, n = container.part_location(1, i)
        assert torch.equal(residuals[key][start:start + n], flat[key][start:start + n] - codec.decode(msg))
    container.finalize()


def test_reducer_init_resets_and_a_failed_sender_finishes_the_part_without_it():
    """CollectingReducer relies on TensorPartReducer.__init__ calling reset_accumulators and on
    on_sender_failed calling check_current_part_finished."""
    assert "self.reset_accumulators()" in src(TensorPartReducer.__init__)
    assert "self.check_current_part_finished()" in src(TensorPartReducer.on_sender_failed)
    calls = []

    def combine(part_index, contributions):
        calls.append((part_index, [(i, x.tolist(), w) for i, x, w in contributions]))
        return torch.full((2,), float(part_index))

    async def scenario():
        reducer = CollectingReducer([torch.Size([2]), torch.Size([2])], 3, combine)
        assert reducer.contributions == {} and reducer.current_part_index == 0
        part0 = [asyncio.create_task(reducer.accumulate_part(s, 0, torch.full((2,), s + 0.0), weight=s + 1.0))
                 for s in (2, 0)]
        await asyncio.sleep(0)
        reducer.on_sender_failed(1)  # sender 1 sent nothing: part 0 is done with senders 0 and 2
        out = await asyncio.gather(*part0)
        reducer.finalize()
        return out

    out = asyncio.run(scenario())
    assert calls == [(0, [(0, [0.0, 0.0], 1.0), (2, [2.0, 2.0], 3.0)])]  # sender order, not arrival order
    assert all(torch.equal(o, torch.zeros(2)) for o in out)


# ----------------------------------------------------------------------------- the runner


def _runners(weights, caps=None, values=None, wired=True):
    """Runners for ME and OTHER (in a running event loop), each one's stub calling the other's
    rpc_aggregate_part in-process: hivemind's run() and rpc_aggregate_part with no network."""
    values = values or [[torch.randn(40, generator=torch.Generator().manual_seed(s)),
                         torch.arange(24.0) * (s + 1)] for s in range(2)]
    runners = []
    for peer, weight, tensors in zip((ME, OTHER), weights, values):
        infos = [CompressionInfo.from_tensor(t, key=k) for k, t in enumerate(tensors)]
        runners.append(OwnerRunner(
            p2p=SimpleNamespace(peer_id=peer), servicer_type=_Averager, prefix="contract", group_id=b"group",
            tensors=tensors, tensor_infos=infos, ordered_peer_ids=[ME, OTHER], peer_fractions=(0.5, 0.5),
            weight=weight, codec=make_codec("none"), residuals=None, out_residuals=None, aggregator="mean",
            clip_factor=2.0, weight_caps=caps or {}, part_size_bytes=64))
    for runner, other, peer in zip(runners, reversed(runners), (ME, OTHER)):
        if wired:
            runner._get_peer_stub = _stub_to(other, peer)
    return runners


def _stub_to(target: AllReduceRunner, caller: PeerID):
    async def rpc_aggregate_part(inputs):
        return target.rpc_aggregate_part(inputs, SimpleNamespace(remote_id=caller))

    return lambda peer: SimpleNamespace(rpc_aggregate_part=rpc_aggregate_part)


async def _run_all(runners):
    async def outputs(runner):
        return [out.clone() async for out in runner]

    return await asyncio.gather(*(outputs(r) for r in runners), return_exceptions=True)


def test_runner_init_builds_the_parts_we_replace_and_run_reads_them_through_self():
    init_src = src(AllReduceRunner.__init__)
    for attr in ("self.tensor_part_container = TensorPartContainer(", "self.parts_for_local_averaging = ",
                 "self.tensor_part_reducer = TensorPartReducer(", "self.sender_peer_ids.append(peer_id)"):
        assert attr in init_src, attr
    run_src = src(AllReduceRunner.run)
    assert "self._communicate_with_peer(peer_id)" in run_src
    assert "self.tensor_part_container.iterate_output_tensors()" in run_src
    assert params(AllReduceRunner._communicate_with_peer) == ["self", "peer_id"]
    assert params(AllReduceRunner._generate_input_for_peer) == ["self", "peer_index"]
    assert "self._servicer_type.get_stub(self._p2p, peer, namespace=self._prefix)" in src(
        AllReduceRunner._get_peer_stub)
    assert params(TensorPartContainer.__init__)[:3] == ["self", "tensors", "peer_fractions"]


def test_two_runners_average_through_hiveminds_run_and_rpc_aggregate_part():
    """Our _communicate_with_peer/_generate_input_for_peer on one side, hivemind's rpc_aggregate_part
    calling our _accumulate_parts_streaming on the other: the weighted mean, bit-identical on both."""
    assert params(AllReduceRunner._accumulate_parts_streaming) == ["self", "stream", "sender_index"]
    assert "self._accumulate_parts_streaming(stream, sender_index)" in src(AllReduceRunner.rpc_aggregate_part)

    inputs = [[torch.randn(40), torch.randn(24)] for _ in range(2)]

    async def scenario():
        runners = _runners([1.0, 3.0], values=[[t.clone() for t in x] for x in inputs])
        return runners, await _run_all(runners)

    runners, results = asyncio.run(scenario())
    assert not any(isinstance(r, BaseException) for r in results), results
    for t in range(2):
        want = (1.0 * inputs[0][t] + 3.0 * inputs[1][t]) / 4.0
        assert torch.allclose(results[0][t], want, atol=1e-6) and torch.equal(results[0][t], results[1][t])
    assert all(r.bytes_sent > 0 and r.bytes_received > 0 and not r.failed_reducers for r in runners)


def test_an_owner_keeps_a_senders_stream_open_a_moment_after_its_last_result(monkeypatch):
    """OwnerRunner.rpc_aggregate_part wraps hivemind's (the averager's handler delegates every sender's
    stream to the runner's): every result of hivemind's, in order, then RESULT_LINGER_S before the
    handler returns (and the stream closes)."""
    assert params(AllReduceRunner.rpc_aggregate_part) == ["self", "stream", "context"]
    assert "group.rpc_aggregate_part(achain(as_aiter(request), stream), context)" in src(
        DecentralizedAverager.rpc_aggregate_part)
    sent = [averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, weight=float(i)) for i in range(3)]

    async def theirs(self, stream, context):
        for msg in sent:
            yield msg

    monkeypatch.setattr(AllReduceRunner, "rpc_aggregate_part", theirs)
    monkeypatch.setattr(hb, "RESULT_LINGER_S", 0.3)

    async def scenario():
        gen, got = OwnerRunner.__new__(OwnerRunner).rpc_aggregate_part(None, None), []
        async for msg in gen:
            got.append(msg)
            t_last = asyncio.get_running_loop().time()
        return got, asyncio.get_running_loop().time() - t_last

    got, linger = asyncio.run(scenario())
    assert got == sent and 0.3 <= linger < 1.0


def test_owners_stream_a_client_mode_senders_results_without_holding_them_back():
    """hivemind's handler asks should_delay_results(sender) whether to hold a sender's results until it
    has sent everything (by default: yes for a client-mode sender); ours never does."""
    assert "self.should_delay_results(context.remote_id)" in src(AllReduceRunner.rpc_aggregate_part)
    assert params(AllReduceRunner.should_delay_results) == ["self", "peer_id"]
    runner = OwnerRunner.__new__(OwnerRunner)
    runner.peer_fractions, runner.ordered_peer_ids = (0.0, 1.0), [OTHER, ME]
    assert AllReduceRunner.should_delay_results(runner, OTHER)  # hivemind's: a client's results wait
    assert not runner.should_delay_results(OTHER) and not runner.should_delay_results(ME)


def test_a_refused_sender_is_banned_through_ban_sender_and_its_owner_side_fails():
    caps = {OTHER.to_base58(): 10.0}

    async def scenario():
        runners = _runners([1.0, 1e6], caps=caps)
        results = await _run_all(runners)
        return runners, results

    (mine, theirs), results = asyncio.run(scenario())
    assert "more than the 10 samples" in mine.rejected[OTHER.to_base58()]
    sender = mine.sender_peer_ids.index(OTHER)
    assert OTHER in mine.banned_senders and mine.tensor_part_reducer.sender_failed_after[sender] == 0
    assert theirs.failed_reducers == {str(ME)}  # our averager then fails the round for the refused peer


def test_the_interprocess_locks_a_zygote_child_replaces_are_hivemind_s_import_time_ones():
    """hivemind_backend.own_interprocess_locks: MPFuture.reset_backend replaces the locks MPFuture takes for every
    future (SharedBytes._lock: each future's shared state byte; _update_lock: the result pipe), and
    _AsyncContextWrapper's executor lock is the other one created at import. If hivemind moves them, a
    zygote child killed inside a DHT call freezes its siblings again. (In a child process: a reset breaks the
    futures of the process that does it.)"""
    from hivemind.utils.mpfuture import MPFuture, SharedBytes

    assert "with cls._lock:" in src(SharedBytes.next) and "MPFuture._update_lock" in src(MPFuture)
    code = textwrap.dedent("""
        import multiprocessing as mp
        from hivemind.utils import asyncio as hm_asyncio
        from hivemind.utils.mpfuture import MPFuture, SharedBytes
        from p2p_photon.averaging.hivemind_backend import own_interprocess_locks

        def locks():
            return (SharedBytes._lock, MPFuture._update_lock, MPFuture._initialization_lock,
                    hm_asyncio._AsyncContextWrapper.EXECUTOR_LOCK)

        before = locks()
        assert all(isinstance(lock, type(mp.Lock())) for lock in before)
        own_interprocess_locks()
        assert all(a is not b for a, b in zip(before, locks(), strict=True))
        future = MPFuture()  # the backend starts again for this process
        future.set_result(3)
        print("result", future.result(timeout=5))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "result 3", out.stderr[-2000:]
