#!/usr/bin/env python
"""Tokenizing a private corpus: our streaming path (`corpus.tokenize_corpus`: reading, held-out split,
shards, progress.json for resuming) against the tokenizers library's own batch encoding of the same
texts, in MB/s of input by wall time and by CPU time (user + system, all threads: the fair figure on
shared, busy cores), with the peak RSS of each (every measurement in its own process).

    nice -n 10 python scripts/bench_tokenize.py            # 1 GB synthetic corpus (generated, not committed)
    python scripts/bench_tokenize.py --mb 8 --out /tmp/t.json   # smoke run

The corpus is synthetic text (Zipf-distributed words from a seeded vocabulary, one line per sentence)
in 1 MB files, generated into --workdir and deleted afterwards; the tokenizer is a byte-level BPE
(vocab 8192) trained on its first 4 MB. Writes bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_BYTES = 1_000_000


def generate(root: Path, mb: int, seed: int = 0) -> int:
    """`mb` files of ~1 MB of synthetic sentences; returns the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(20000)]
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    p = (1 / ranks**1.1) / (1 / ranks**1.1).sum()
    words = np.array(vocab, dtype=object)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(mb):
        idx = rng.choice(len(vocab), size=FILE_BYTES // 6, p=p)
        text = " ".join(words[idx])
        lines = "\n".join(text[k : k + 120] for k in range(0, len(text), 120))[:FILE_BYTES] + "\n"
        (root / f"part-{i:05d}.txt").write_text(lines)
        total += len(lines)
    return total


def train_tokenizer(corpus: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(corpus.glob("*.txt"))[:4]
    tok.train_from_iterator((f.read_text() for f in files), trainer)
    tok.save(str(out))


def worker_ours(corpus: Path, tokenizer: Path, cache: Path) -> dict:
    from p2p_photon.corpus import tokenize_corpus

    t0 = time.perf_counter()
    out = tokenize_corpus(corpus, tokenizer, cache, vocab_size=8192, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    return dict(seconds=time.perf_counter() - t0, tokens=sum(meta["tokens"].values()), bytes=meta["bytes"])


def worker_baseline(corpus: Path, tokenizer: Path) -> dict:
    """The library alone: read ~4 MB of files, encode_batch_fast them, take the ids; nothing written."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    t0, tokens, nbytes = time.perf_counter(), 0, 0
    files = sorted(corpus.glob("*.txt"))
    for k in range(0, len(files), 4):
        texts = [f.read_text() for f in files[k : k + 4]]
        nbytes += sum(len(t) for t in texts)
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    return dict(seconds=time.perf_counter() - t0, tokens=tokens, bytes=nbytes)


def measure(kind: str, corpus: Path, tokenizer: Path, cache: Path) -> dict:
    """Run one worker in its own process; its result plus its peak RSS."""
    cmd = [sys.executable, __file__, "--worker", kind, "--corpus", str(corpus), "--tokenizer", str(tokenizer),
           "--cache", str(cache)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    res = json.loads(out)
    res["mb_per_s"] = res["bytes"] / 1e6 / res["seconds"]
    res["mb_per_cpu_s"] = res["bytes"] / 1e6 / max(res.get("cpu_seconds", 0), 1e-9)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1000, help="corpus size in MB (default 1000 = 1 GB)")
    p.add_argument("--workdir", default=None, help="where to generate the corpus (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tokenize.json"))
    p.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_baseline
        extra = [Path(args.cache)] if args.worker == "ours" else []
        res = fn(Path(args.corpus), Path(args.tokenizer), *extra)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        res["peak_rss_mb"] = usage.ru_maxrss / 1024
        res["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # all threads: fair on shared, busy cores
        print(json.dumps(res))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        return run(work, args.mb, Path(args.out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, mb: int, out: Path) -> int:
    corpus, tokenizer = work / "corpus", work / "tokenizer.json"
    t0 = time.perf_counter()
    size = generate(corpus, mb)
    print(f"generated {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f}s; training the tokenizer", flush=True)
    train_tokenizer(corpus, tokenizer)
    base = measure("baseline", corpus, tokenizer, work / "cache")
    ours = measure("ours", corpus, tokenizer, work / "cache")
    ratio = ours["mb_per_s"] / base["mb_per_s"]
    ratio_cpu = ours["mb_per_cpu_s"] / base["mb_per_cpu_s"]
    print(f"{'path':<22}{'MB/s':>8}{'tokens':>14}{'peak RSS MB':>14}")
    for name, r in (("tokenizers batch", base), ("ours (streaming)", ours)):
        print(f"{name:<22}{r['mb_per_s']:>8.2f}{r['tokens']:>14,}{r['peak_rss_mb']:>14.0f}")
    print(f"ratio ours/tokenizers: {ratio:.3f} by wall time, {ratio_cpu:.3f} by CPU time (target >= 0.8); our "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB (target < 1024)")
    result = dict(corpus_mb=size / 1e6, files=mb, tokenizer_vocab=8192, ours=ours, tokenizers_batch=base,
                  ratio=ratio, ratio_cpu=ratio_cpu, targets=dict(ratio=0.8, peak_rss_mb=1024),
                  ok=ratio >= 0.8 and ours["peak_rss_mb"] < 1024,
                  machine="2 shared CPU cores (nice -n 10)", command=" ".join(sys.argv))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
