"""`p2p-photon export`: a real peer checkpoint (nano model, the small test corpus, no swarm) out to a
Hugging Face directory that transformers loads offline with θ bit-identical, and every bad input as one
line on stderr with its exit code and OUT left as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import SMALL_DATA, python_env

pytestmark = pytest.mark.timeout(300)

SEQ_LEN, BATCH = 64, 4


def cli(*args: str) -> subprocess.CompletedProcess:
    env = python_env() | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # nothing from a hub
    return subprocess.run([sys.executable, "-m", "p2p_photon.cli", *args], capture_output=True, text=True,
                          env=env, timeout=240)


@pytest.fixture(scope="module")
def run(data_cache, tmp_path_factory):
    """Two checkpoints (rounds 1 and 2) written the way a peer writes them: GlobalState after a
    one-peer FedAvg round of one inner step each, saved by state.save_checkpoint with the config."""
    import torch

    from p2p_photon import data, state
    from p2p_photon.averaging.protocol import RoundResult
    from p2p_photon.config import fingerprint, load_config
    from p2p_photon.inner import InnerTrainer
    from p2p_photon.model import build_model
    from p2p_photon.peer.global_state import GlobalState

    root = tmp_path_factory.mktemp("export-run")
    cfg = load_config(None, [*SMALL_DATA, f"data.cache_dir={data_cache}", f"model.seq_len={SEQ_LEN}",
                             f"inner.batch_size={BATCH}", "inner.warmup_steps=0", "logging.eval_batches=2",
                             "logging.progress_bar=false", f"checkpoint.dir={root / 'ckpts'}",
                             f"dht.run_id=export-{uuid.uuid4().hex[:8]}"])
    prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=False))
    model = build_model(cfg.model.preset, prep.vocab_size, SEQ_LEN, cfg.seed)
    gs = GlobalState(model, cfg.outer, fingerprint(cfg, prep.tokenizer_hash))
    trainer = InnerTrainer(model, cfg.inner, torch.device("cpu"))
    stream = data.open_silo_stream(prep, [0], seq_len=SEQ_LEN, batch_size=BATCH, seed=cfg.seed, stream_id=0)
    hashes = {}
    for r in (1, 2):
        trainer.step(stream.next_batch, r - 1)
        res = RoundResult(deltas=gs.pseudo_gradient(model), group_size=1, bytes_sent=0, bytes_received=0,
                          gathered={"me": dict(steps=1, samples=BATCH)}, seconds=0.0)
        gs.apply(res, model)  # photon: θ ← θ − Δ, the local model
        state.save_checkpoint(cfg.checkpoint.dir, gs.checkpoint(trainer.optimizer.state_dict(),
                                                                stream.state_dict(), cfg))
        hashes[r] = gs.hash
    assert hashes[1] != hashes[2]
    return SimpleNamespace(cfg=cfg, prep=prep, dir=Path(cfg.checkpoint.dir), hashes=hashes)


def _load_hf(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    return model, tok


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_export_of_a_checkpoint_dir_loads_in_transformers_with_the_rounds_theta(run, tmp_path):
    from p2p_photon.hashing import theta_hash

    out = tmp_path / "hf"
    r = cli("export", str(run.dir), "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exporting" in r.stderr and f"wrote {out}" in r.stdout
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    model, tok = _load_hf(out)
    assert theta_hash(model) == run.hashes[2]  # the newest checkpoint, bit for bit
    ids = tok("import os\ndef ", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5 and isinstance(tok.decode(gen[0]), str)
    card = (out / "README.md").read_text()
    assert run.cfg.dht.run_id in card and run.hashes[2] in card
    assert f"{2 * BATCH * SEQ_LEN:,} ({2 * BATCH:,} samples" in card  # tokens = total_samples × seq_len
    assert "| contributing peers | unknown" in card and "| held-out perplexity | unknown" not in card
    assert _leftovers(tmp_path) == []


def test_export_api_one_checkpoint_with_an_explicit_tokenizer(run, tmp_path):
    from p2p_photon.export import export_checkpoint
    from p2p_photon.hashing import theta_hash

    out = export_checkpoint(run.dir / "ckpt-00000001", tmp_path / "hf", tokenizer=run.prep.dir / "tokenizer.json")
    model, tok = _load_hf(out)
    assert theta_hash(model) == run.hashes[1]
    assert tok.eos_token == "<|endoftext|>" and tok("def f():").input_ids
    assert "| held-out perplexity | unknown (not measured: --tokenizer" in (out / "README.md").read_text()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, tmp_path):
    from p2p_photon.export import export_checkpoint
    from p2p_photon.hashing import theta_hash

    shutil.copytree(run.dir, tmp_path / "ckpts")
    _corrupt(run, tmp_path)  # ckpt-00000002 of the copy
    out = export_checkpoint(tmp_path / "ckpts", tmp_path / "hf", eval_ppl=False)
    assert theta_hash(_load_hf(out)[0]) == run.hashes[1]


def test_out_that_holds_the_checkpoint_is_refused_even_with_force(run):
    from p2p_photon.export import OutputNotEmpty, export_checkpoint

    with pytest.raises(OutputNotEmpty, match="holds the checkpoint"):
        export_checkpoint(run.dir / "ckpt-00000002", run.dir, force=True)
    assert sorted(p.name for p in run.dir.iterdir()) == ["ckpt-00000001", "ckpt-00000002"]


def test_force_replaces_a_non_empty_out(run, tmp_path):
    from p2p_photon.hashing import theta_hash

    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    r = cli("export", str(run.dir), "-o", str(out), "--force", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "stale.txt").exists() and theta_hash(_load_hf(out)[0]) == run.hashes[2]
    assert "not measured: --no-eval" in (out / "README.md").read_text()
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- bad input


def _rewrite(ckpt: Path, name: str, text: str) -> None:
    """Change one file of a checkpoint and re-sign its manifest: the checkpoint still verifies."""
    (ckpt / name).write_text(text)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest[name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def _copy(run, tmp: Path) -> Path:
    dst = tmp / "ckpts" / "ckpt-00000002"
    shutil.copytree(run.dir / "ckpt-00000002", dst)
    return dst


def _corrupt(run, tmp: Path) -> list[str]:
    ckpt = tmp / "ckpts" / "ckpt-00000002"
    f = (ckpt if ckpt.exists() else _copy(run, tmp)) / "theta.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF
    f.write_bytes(bytes(blob))
    return [str(tmp / "ckpts")]


def _wrong_theta(run, tmp: Path) -> list[str]:
    ckpt = _copy(run, tmp)
    meta = json.loads((ckpt / "meta.json").read_text())
    _rewrite(ckpt, "meta.json", json.dumps(dict(meta, theta="0123456789abcdef")))
    return [str(ckpt)]


def _no_prepared_data(run, tmp: Path) -> list[str]:
    ckpt = _copy(run, tmp)
    text = (ckpt / "config.toml").read_text().replace(str(run.cfg.data.cache_dir), str(tmp / "empty-cache"))
    _rewrite(ckpt, "config.toml", text)
    return [str(ckpt)]


def _foreign_tokenizer(run, tmp: Path) -> list[str]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["some other corpus"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp / "other.json"))
    return [str(run.dir), "--tokenizer", str(tmp / "other.json")]


def _not_a_tokenizer(run, tmp: Path) -> list[str]:
    (tmp / "tok.json").write_text("this is no tokenizer")
    return [str(run.dir), "--tokenizer", str(tmp / "tok.json")]


BAD = {  # case: (arguments before -o, exit code, what the line says)
    "missing path": (lambda run, tmp: [str(tmp / "nope")], 1, "no checkpoint found"),
    "no checkpoint in dir": (lambda run, tmp: (tmp / "e").mkdir() or [str(tmp / "e")], 1, "no checkpoint found"),
    "corrupt checkpoint": (_corrupt, 1, "corrupt"),
    "theta hash mismatch": (_wrong_theta, 1, "refusing to export"),
    "no prepared data": (_no_prepared_data, 1, "no prepared data"),
    "tokenizer not found": (lambda run, tmp: [str(run.dir), "--tokenizer", str(tmp / "t.json")], 1, "not found"),
    "not a tokenizer": (_not_a_tokenizer, 1, "not a tokenizer file"),
    "foreign tokenizer": (_foreign_tokenizer, 1, "not this run's tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, case):
    make, code, needle = BAD[case]
    out = tmp_path / "out" / "hf"
    r = cli("export", *make(run, tmp_path), "-o", str(out))
    line = _one_line_error(r, code)
    assert needle in line, line
    assert not (tmp_path / "out").exists()  # not even OUT's parent: nothing half-written


@pytest.mark.parametrize("case", ["not empty", "not writable"])
def test_unusable_out_is_refused_before_any_work(run, tmp_path, case):
    if case == "not empty":
        out, code, needle = tmp_path / "hf", 2, "not empty"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        (tmp_path / "a-file").write_text("mine")
        out, code, needle = tmp_path / "a-file" / "hf", 1, "cannot write"
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line_error(cli("export", str(run.dir), "-o", str(out)), code)
    assert needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    kept = out / "keep.txt" if case == "not empty" else tmp_path / "a-file"
    assert kept.read_text() == "mine"


def _one_line_error(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_relative_cache_dir_is_also_found_from_the_peers_working_dir(tmp_path):
    """A peer run in /runs/a with checkpoint.dir=ckpts and data.cache_dir=.cache: exporting
    /runs/a/ckpts/ckpt-1 from elsewhere looks in /runs/a/.cache too."""
    from p2p_photon.config import load_config
    from p2p_photon.export import _cache_dirs

    cfg = load_config(None, ["checkpoint.dir=out/ckpts", "data.cache_dir=.cache/p2p"])
    dirs = _cache_dirs(cfg, tmp_path / "runs" / "a" / "out" / "ckpts" / "ckpt-00000001")
    assert dirs == [Path(".cache/p2p").resolve(), (tmp_path / "runs" / "a" / ".cache" / "p2p").resolve()]
    absolute = load_config(None, [f"data.cache_dir={tmp_path / 'c'}"])
    assert _cache_dirs(absolute, tmp_path / "x" / "ckpt-00000001") == [tmp_path / "c"]


def test_a_peer_with_export_hf_writes_the_model_after_each_checkpoint_and_a_failure_only_warns(run, tmp_path,
                                                                                               caplog):
    """checkpoint.export_hf: what the peer calls after writing a checkpoint (peer.parts.export_hf)."""
    from p2p_photon import state
    from p2p_photon.hashing import theta_hash
    from p2p_photon.peer.parts import export_hf

    out = tmp_path / "hf"
    older, newest = sorted(state.list_checkpoints(run.dir))
    export_hf(older, out)
    assert theta_hash(_load_hf(out)[0]) == run.hashes[1]
    export_hf(newest, out)  # replaced by the next checkpoint's model
    assert theta_hash(_load_hf(out)[0]) == run.hashes[2] and _leftovers(tmp_path) == []
    export_hf(tmp_path / "no-such-ckpt", out)  # a warning; the earlier export stays whole
    assert "checkpoint.export_hf: could not write" in caplog.text
    assert theta_hash(_load_hf(out)[0]) == run.hashes[2]
