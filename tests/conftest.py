"""Shared fixtures: one small prepared corpus for every swarm test, and the no-orphan check."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.helpers import SMALL_DATA, no_leaked_p2pd

# LocalSwarm forks its peers from one pre-imported process (p2p_photon/zygote.py): ~9 s of imports less per
# peer, bootstrap and hostile script; tests/test_launch.py also starts them as plain `python -m` processes
os.environ.setdefault("P2P_PHOTON_ZYGOTE", "1")


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true",
                     help="also run the extended end-to-end tests (marked `extended`: several minutes more)")


def pytest_collection_modifyitems(config, items):
    """`extended` tests (long end-to-end runs whose properties the suite also checks in shorter tests)
    run only with --extended, so that the suite stays within its 15 minutes on 2 cores."""
    if config.getoption("--extended"):
        return
    keep = [i for i in items if i.get_closest_marker("extended") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("extended") is not None])
        items[:] = keep


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """Prepare the small stdlib corpus once per session; peers then hit the cache."""
    from p2p_photon import data
    from p2p_photon.config import load_config

    cache = tmp_path_factory.mktemp("data-cache")
    cfg = load_config(None, [*SMALL_DATA, f"data.cache_dir={cache}"])
    data.prepare(cfg.data, cfg.seed, progress=False)
    return cache


@pytest.fixture
def swarm_overrides(data_cache):
    """Settings for a fast nano swarm on 127.0.0.1 (a fresh run_id per test)."""
    return [*SMALL_DATA, f"data.cache_dir={data_cache}", "model.seq_len=64", "inner.batch_size=8",
            "inner.warmup_steps=5", "inner.total_steps=400", "rounds.target_samples_per_round=96",
            "averaging.matchmaking_time=1.5", "averaging.allreduce_timeout=20", "averaging.round_timeout=30",
            "logging.progress_interval=0.5", "logging.progress_bar=false", "logging.eval_batches=4",
            "checkpoint.every_rounds=0", "dht.startup_timeout=60", f"dht.run_id=test-{uuid.uuid4().hex[:8]}"]


@pytest.fixture(autouse=True)
def _no_orphans(request):
    """Every swarm test must leave no p2pd of its own running."""
    if request.node.get_closest_marker("swarm") is None:
        yield
        return
    with no_leaked_p2pd(timeout=15):
        yield
