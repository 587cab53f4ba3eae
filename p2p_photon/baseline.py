"""The centralized baseline: one process, the union of all silos, the same model/optimizer/schedule.

Every federated result is compared against this. It is also what the single-machine demo runs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data
from .config import Config, to_toml
from .inner import InnerTrainer, evaluate, perplexity, resolve_device
from .model import build_model, count_params
from .ui import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    initial_loss: float
    final_loss: float
    steps: int
    tokens: int
    wall_s: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, held-out ppl)

    @property
    def initial_ppl(self) -> float:
        return perplexity(self.initial_loss)

    @property
    def final_ppl(self) -> float:
        return perplexity(self.final_loss)


def setup(cfg: Config):
    """Prepare data and build the model: (prepared data, model, held-out batches, device)."""
    prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=cfg.logging.progress_bar))
    device = resolve_device(cfg.inner)
    model = build_model(cfg.model.preset, prep.vocab_size, cfg.model.seq_len, cfg.seed, device)
    heldout = data.heldout_batches(prep, seq_len=cfg.model.seq_len, batch_size=cfg.inner.batch_size,
                                   n_batches=cfg.logging.eval_batches)
    return prep, model, heldout, device


def train_centralized(cfg: Config, *, steps: int = 0, seconds: float = 0.0, eval_every: int = 0,
                      save_dir: str | None = None, metrics_out: str | None = None) -> TrainResult:
    """Train on the union of the silos for `steps` optimizer steps or `seconds` of wall time."""
    if steps <= 0 and seconds <= 0:
        raise ValueError("give steps > 0 or seconds > 0")
    prep, model, heldout, device = setup(cfg)
    stream = data.open_silo_stream(prep, list(range(prep.meta["num_silos"])), seq_len=cfg.model.seq_len,
                                   batch_size=cfg.inner.batch_size, seed=cfg.seed, stream_id=10_000)
    trainer = InnerTrainer(model, cfg.inner, device)
    logger.info("model %s: %.2fM parameters, vocab %d, device %s, optimizer %s", cfg.model.preset,
                count_params(model) / 1e6, prep.vocab_size, device, cfg.inner.optimizer)
    first = evaluate(model, heldout, cfg.inner, device)
    result = TrainResult(first, first, 0, 0, 0.0, curve=[(0, perplexity(first))])
    logger.info("held-out perplexity before training: %.2f", perplexity(first))
    _loop(cfg, trainer, stream, heldout, result, steps=steps, seconds=seconds, eval_every=eval_every)
    result.final_loss = evaluate(model, heldout, cfg.inner, device)
    if not result.curve or result.curve[-1][0] != result.tokens:
        result.curve.append((result.tokens, perplexity(result.final_loss)))
    logger.info("held-out perplexity after %d steps (%.1fs): %.2f (was %.2f)", result.steps, result.wall_s,
                result.final_ppl, result.initial_ppl)
    if save_dir:
        save_pretrained(model, prep, cfg, save_dir)
    if metrics_out:
        _write_metrics(result, metrics_out)
    return result


def _loop(cfg, trainer, stream, heldout, result: TrainResult, *, steps, seconds, eval_every) -> None:
    t0 = time.perf_counter()
    total = steps if steps > 0 else None
    with progress_bar("training", total=total, enabled=cfg.logging.progress_bar) as bar:
        while True:
            elapsed = time.perf_counter() - t0
            if (steps > 0 and result.steps >= steps) or (seconds > 0 and elapsed >= seconds):
                break
            st = trainer.step(stream.next_batch, result.steps)
            result.steps += 1
            result.tokens += st.tokens
            bar.update(loss=st.loss, tok_s=st.tokens / max(st.seconds, 1e-9), lr=st.lr)
            if eval_every and result.steps % eval_every == 0:
                loss = evaluate(trainer.model, heldout, cfg.inner, trainer.device)
                result.curve.append((result.tokens, perplexity(loss)))
        result.wall_s = time.perf_counter() - t0


def _write_metrics(result: TrainResult, path: str) -> None:
    out = dict(initial_ppl=result.initial_ppl, final_ppl=result.final_ppl, steps=result.steps,
               tokens=result.tokens, wall_s=result.wall_s, curve=result.curve)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def save_pretrained(model: torch.nn.Module, prep, cfg: Config, out_dir: str | Path) -> Path:
    """The baseline's `--save`: the model with the prepared data's tokenizer (see `write_hf_model`)."""
    return write_hf_model(model, prep.tokenizer(), cfg, out_dir)


def write_hf_model(model: torch.nn.Module, tokenizer, cfg: Config, out_dir: str | Path) -> Path:
    """A Hugging Face-loadable directory: safetensors weights, config.json, generation_config.json, the
    tokenizer files, and the resolved run config (p2p_photon.toml). Shared by `train --save` and
    `export`, so both write the same layout that `AutoModelForCausalLM`/`AutoTokenizer` load offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "p2p_photon.toml").write_text(to_toml(cfg))
    return out
