"""Real hivemind DHTs and averagers on 127.0.0.1: the sample-weighted mean, bit-identical on every peer."""

import concurrent.futures as cf

import pytest
import torch
from hivemind import DHT

from p2p_photon.averaging import CLAMP, SwarmAverager, decode, encode, scale_for
from p2p_photon.config import AveragingConfig
from p2p_photon.model import theta_hash

pytestmark = pytest.mark.swarm


@pytest.fixture
def dhts():
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=60)
    others = [DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                  startup_timeout=60) for _ in range(2)]
    yield [first, *others]
    for d in (first, *others):
        d.shutdown()


def test_encoding_is_exact_within_range_and_reports_clamping():
    d = torch.tensor([0.0, 1e-3, -0.2, 0.29, 5.0, -7.0])
    buf = torch.empty_like(d)
    residual, clamped = encode(d, 1.0, buf)
    assert clamped == 2
    assert torch.all((buf >= 1 - CLAMP) & (buf <= 1 + CLAMP))
    assert torch.allclose(decode(buf, 1.0) + residual, d, atol=0, rtol=0)
    assert scale_for(1e-3) == 2.0 ** 6  # 0.3 / (4e-3) = 75 -> 64


def test_all_reduce_gives_the_weighted_mean_bit_identically(dhts):
    g = torch.Generator().manual_seed(0)
    shapes = [torch.Size([300, 7]), torch.Size([1000])]
    deltas = [[torch.randn(s, generator=g) * 1e-2 for s in shapes] for _ in range(3)]
    weights = [8.0, 24.0, 40.0]
    cfg = AveragingConfig(matchmaking_time=2.0, allreduce_timeout=30.0, min_group_size=3, target_group_size=3)
    avgs = [SwarmAverager(d, shapes, prefix="test_run-fp", cfg=cfg) for d in dhts]
    scales = [scale_for(0.05)] * len(shapes)
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(a.average, deltas[i], round_no=4, weight=weights[i],
                              meta=dict(fingerprint="fp", samples=int(weights[i])), scales=scales, timeout=30)
                    for i, a in enumerate(avgs)]
            results = [f.result(timeout=90) for f in futs]
    finally:
        for a in avgs:
            a.shutdown()
    expected = [sum(w * d[t] for w, d in zip(weights, deltas)) / sum(weights) for t in range(len(shapes))]
    for r in results:
        assert r.group_size == 3 and len(r.gathered) == 3
        assert {m["samples"] for m in r.gathered.values()} == {8, 24, 40}
        for got, want in zip(r.deltas, expected):
            assert torch.allclose(got, want, atol=2e-6, rtol=0)  # resolution 2^-23 / s
    hashes = {theta_hash(r.deltas) for r in results}
    assert len(hashes) == 1, "peers must hold bit-identical averages"
    assert results[0].bytes_sent == int(2 * 2 / 3 * (300 * 7 + 1000) * 4)
