"""Run specs (runspec.py): the run id names the spec's content, a changed file is refused, run-wide keys
cannot be overridden locally, and the spec travels over real DHTs on 127.0.0.1 (served, fetched,
checked against the run id; an unknown run, a lying server and a silent one are one-line errors)."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from p2p_photon import runspec
from p2p_photon.config import ConfigError, load_config
from p2p_photon.runspec import RunSpecError
from tests.helpers import no_leaked_p2pd

RUN_SETS = ["model.seq_len=32", "data.vocab_size=512", "data.max_corpus_mb=0.3", "rounds.target_samples_per_round=64"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("texts")
    for g in range(4):
        (root / f"g{g}").mkdir()
        for i in range(30):
            body = "".join(f"def f_{g}_{i}_{k}(x):\n    return x * {k} + {g}\n\n" for k in range(20))
            (root / f"g{g}" / f"m{i}.py").write_text(body)
    return root


@pytest.fixture(scope="module")
def run(texts, tmp_path_factory) -> runspec.RunSpec:
    cfg = load_config(None, RUN_SETS)
    return runspec.create_run(cfg, tmp_path_factory.mktemp("r") / "run", train_on=str(texts))


def test_the_run_id_is_the_hash_of_the_spec_which_names_its_files(run):
    raw = (run.dir / "spec.json").read_bytes()
    assert run.run_id == hashlib.sha256(raw).hexdigest()[:16]
    spec = json.loads(raw)
    for f in ("tokenizer", "eval"):
        assert spec[f]["sha256"] == hashlib.sha256((run.dir / spec[f]["file"]).read_bytes()).hexdigest()
    assert spec["settings"]["model.seq_len"] == 32 and set(spec["settings"]) == set(runspec.RUN_WIDE)
    assert spec["eval"]["tokens"] >= 33


def test_the_same_inputs_give_the_same_run_id(run, texts, tmp_path):
    again = runspec.create_run(load_config(None, RUN_SETS), tmp_path / "again", train_on=str(texts))
    assert again.run_id == run.run_id
    other = runspec.create_run(load_config(None, [*RUN_SETS, "seed=1"]), tmp_path / "other", train_on=str(texts))
    assert other.run_id != run.run_id


@pytest.mark.parametrize("victim", ["spec.json", "tokenizer.json", "eval.bin"])
def test_a_changed_file_is_refused(run, tmp_path, victim):
    copy = shutil.copytree(run.dir, tmp_path / "copy")
    with open(copy / victim, "ab") as f:
        f.write(b" ")
    with pytest.raises(RunSpecError) as e:
        runspec.load_run(copy, run.run_id)
    assert "\n" not in str(e.value)
    assert ("hashes to" if victim == "spec.json" else "does not match the spec") in str(e.value)


def test_run_new_with_a_bad_tokenizer_writes_nothing(texts, tmp_path):
    (tmp_path / "tok.json").write_text("{}")
    with pytest.raises(runspec.DataError, match="is not a tokenizer file"):
        runspec.create_run(load_config(None, RUN_SETS), tmp_path / "out", tokenizer=str(tmp_path / "tok.json"),
                           eval_path=str(texts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]


def test_run_new_with_an_existing_tokenizer_and_eval_set(run, texts, tmp_path):
    made = runspec.create_run(load_config(None, RUN_SETS), tmp_path / "out", tokenizer=str(run.tokenizer_path),
                              eval_path=str(texts / "g0"))
    assert (made.dir / "tokenizer.json").read_bytes() == run.tokenizer_path.read_bytes()
    with pytest.raises(RunSpecError, match="not an empty directory"):
        runspec.create_run(load_config(None, RUN_SETS), tmp_path / "out", tokenizer=str(run.tokenizer_path),
                           eval_path=str(texts))


def test_a_local_run_wide_key_is_an_error_naming_the_run_wide_keys(run, tmp_path):
    local = tmp_path / "local.toml"
    local.write_text("[inner]\nbatch_size = 4\ndevice = 'cpu'\n[model]\nseq_len = 32\n")  # same value: fine
    cfg = runspec.peer_config(str(local), ["checkpoint.dir=ck"], run, data="/d", text_field="body")
    assert (cfg.inner.batch_size, cfg.model.seq_len, cfg.data.vocab_size) == (4, 32, 512)
    assert (cfg.dht.run_id, cfg.data.corpus, cfg.data.text_field) == (run.run_id, "/d", "body")
    assert cfg.checkpoint.dir == "ck" and cfg.data.run_spec == str(run.dir)
    with pytest.raises(ConfigError) as e:
        runspec.peer_config(str(local), ["model.seq_len=64"], run, data="/d", text_field="text")
    msg = str(e.value)
    assert "\n" not in msg and "model.seq_len is run-wide" in msg and "rounds.target_samples_per_round" in msg
    assert e.value.exit_code == 2


# ----------------------------------------------------------------------------- over the network


@pytest.fixture
def two_dhts():
    from p2p_photon.config import DHTConfig
    from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs

    with no_leaked_p2pd(timeout=15):
        a = start_dht(DHTConfig(run_id="x"), reaper=False)
        b = None
        try:
            b = start_dht(DHTConfig(run_id="x", initial_peers=tuple(visible_maddrs(a))), reaper=False)
            yield a, b
        finally:
            shutdown_dht(b)
            shutdown_dht(a)


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_a_peer_fetches_the_spec_checks_it_and_keeps_a_copy(run, two_dhts, tmp_path):
    server_dht, joiner = two_dhts
    server = runspec.serve(server_dht, run)
    try:
        got = runspec.fetch_run(joiner, None, tmp_path / "runs", timeout=20)  # the swarm's only run
        assert got.run_id == run.run_id and got.dir == tmp_path / "runs" / run.run_id
        for name in ("spec.json", "tokenizer.json", "eval.bin"):
            assert (got.dir / name).read_bytes() == (run.dir / name).read_bytes()
        assert runspec.fetch_run(joiner, run.run_id, tmp_path / "runs", timeout=5).dir == got.dir
        with pytest.raises(RunSpecError) as e:
            runspec.fetch_run(joiner, "0123456789abcdef", tmp_path / "runs", timeout=2)
        assert "unknown run id 0123456789abcdef" in str(e.value) and run.run_id in str(e.value)
    finally:
        server.stop()


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_a_spec_that_does_not_hash_to_its_run_id_is_refused(run, texts, two_dhts, tmp_path):
    liar_dht, joiner = two_dhts
    other = runspec.create_run(load_config(None, [*RUN_SETS, "seed=7"]), tmp_path / "other", train_on=str(texts))
    paths = {n: str(other.dir / n) for n in ("spec.json", "tokenizer.json", "eval.bin")}
    liar_dht.run_coroutine(functools.partial(runspec._register, paths, run.run_id))  # serves another spec as `run`
    _announce(liar_dht, run.run_id)
    with pytest.raises(RunSpecError) as e:
        runspec.fetch_run(joiner, run.run_id, tmp_path / "runs", timeout=6)
    assert "hashes to " + other.run_id in str(e.value) and "refusing it" in str(e.value)
    assert not (tmp_path / "runs" / run.run_id).exists() and not list((tmp_path / "runs").glob(".tmp-*"))


@pytest.mark.swarm
@pytest.mark.timeout(90)
def test_no_peer_serving_the_spec_within_the_timeout_is_an_error(run, two_dhts, tmp_path):
    silent, joiner = two_dhts
    _announce(silent, run.run_id)  # announced, but no handler behind it
    with pytest.raises(RunSpecError) as e:
        runspec.fetch_run(joiner, run.run_id, tmp_path / "runs", timeout=4)
    assert f"no peer served the spec of run {run.run_id} within 4s" in str(e.value)
    with pytest.raises(RunSpecError, match="unknown run id"):
        runspec.fetch_run(joiner, "ffffffffffffffff", tmp_path / "runs", timeout=1)


def _announce(dht, run_id: str) -> None:
    from hivemind.utils import get_dht_time

    peer = dht.peer_id.to_base58()
    dht.store(runspec.RUNS_KEY, run_id, get_dht_time() + 60, subkey=run_id)
    dht.store(f"{run_id}_spec", peer, get_dht_time() + 60, subkey=peer)
