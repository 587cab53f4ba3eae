"""The command line end to end: the centralized baseline, Hugging Face round trip, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL_DATA

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "p2p_photon.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def _one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_train_lowers_perplexity_and_saves_a_loadable_hf_model(tmp_path, data_cache):
    sets = [*SMALL_DATA, f"data.cache_dir={data_cache}", "model.seq_len=64", "inner.warmup_steps=5",
            "inner.total_steps=60", "logging.progress_bar=false", "logging.eval_batches=4"]
    args = ["train", "--steps", "60", "--save", str(tmp_path / "hf"),
            "--metrics-out", str(tmp_path / "m.json")]
    for s in sets:
        args += ["--set", s]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["final_ppl"] < 0.8 * m["initial_ppl"]
    assert m["steps"] == 60 and m["tokens"] == 60 * 8 * 64

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    ids = tok("import os\ndef ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert isinstance(tok.decode(out[0]), str)


def test_train_needs_a_length():
    r = cli("train")
    assert r.returncode == 2 and "--steps" in r.stderr and "Traceback" not in r.stderr


def _binary_dir(path: Path) -> str:
    path.mkdir()
    (path / "x.bin").write_bytes(b"\x00\xff" * 500)
    return str(path)


@pytest.mark.parametrize("setup,needle", [
    (lambda p: str(p / "missing"), "not found"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "empty"),
    (lambda p: _binary_dir(p / "bin"), "binary"),
])
def test_data_prepare_bad_corpora_are_one_line_errors(tmp_path, setup, needle):
    corpus = setup(tmp_path)
    r = cli("data", "prepare", "--corpus", corpus, "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "logging.progress_bar=false")
    line = _one_line_error(r, 1)
    assert needle in line.lower(), line


def test_peer_with_malformed_initial_peer_is_a_one_line_error(tmp_path):
    r = cli("peer", "--initial-peers", "/ip4/1.2.3/tcp/x", "--set", "data.max_corpus_mb=0.3",
            "--set", "data.vocab_size=512", "--set", f"data.cache_dir={tmp_path}",
            "--set", "logging.progress_bar=false")
    line = _one_line_error(r, 1)
    assert "not a valid multiaddr" in line


def test_bootstrap_with_malformed_host_maddr_is_a_one_line_error():
    line = _one_line_error(cli("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/notaport"), 1)
    assert "--host-maddrs" in line


def test_run_peer_script_without_arguments_prints_usage():
    r = subprocess.run(["bash", str(ROOT / "peers" / "run_peer.sh")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "BOOTSTRAP_MADDR" in r.stderr


def test_the_configs_log_level_applies_unless_the_command_line_chose_one():
    """logging.level = 'DEBUG' in the config (or --set) turns on debug lines; --log-level wins over it
    (the soak's `--set logging.level=DEBUG` once produced no debug line at all)."""
    import argparse
    import logging

    from p2p_photon import cli
    from p2p_photon.config import load_config

    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        cli._log_level_from(argparse.Namespace(log_level="WARNING"), load_config(None, ["logging.level='DEBUG'"]))
        assert root.level == logging.INFO
        cli._log_level_from(argparse.Namespace(log_level=None), load_config(None, ["logging.level='DEBUG'"]))
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)
