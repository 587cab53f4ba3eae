"""State for late joiners: which donors to ask, in what order, and how to read what one sends.

Tensors come as raw buffers and metadata as msgpack: nothing from the network is unpickled. Only
hivemind's public utilities are used; opening the stream to a donor is the backend's job.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration


def donors_by_priority(found: Any, *, me: PeerID, exclude: Collection[str],
                       is_member: Callable[[PeerID], bool]) -> list[PeerID]:
    """Donors declared under hivemind's `<prefix>.all_averagers` key (subkey: peer ID bytes, value: its
    state-sharing priority), highest priority first. Malformed entries, ourselves, excluded peers and
    non-members are skipped: the priority is a claim anyone can make, the caller verifies the state."""
    priority: dict[PeerID, float] = {}
    if found is not None and isinstance(found.value, dict):
        for pid, info in found.value.items():
            if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int)):
                with contextlib.suppress(Exception):
                    priority[PeerID(pid)] = float(info.value)
    return [peer for peer in sorted(priority, key=priority.get, reverse=True)
            if peer != me and peer.to_base58() not in exclude and is_member(peer)]


async def read_state(stream: AsyncIterator[averaging_pb2.DownloadData], timeout: float,
                     loads: Callable[[bytes], Any]) -> tuple[Any, list[torch.Tensor]]:
    """(metadata, tensors) from a donor's rpc_download_state stream: a message with a dtype starts a new
    tensor, the others continue it; `timeout` bounds the wait for each message."""
    metadata, parts, tensors = None, [], []
    async for message in aiter_with_timeout(stream, timeout=timeout):
        if message.metadata:
            metadata = loads(message.metadata)
        if message.tensor_part.dtype and parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            parts = []
        parts.append(message.tensor_part)
    if parts:
        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
    return metadata, tensors
