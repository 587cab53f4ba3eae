#!/usr/bin/env python
"""How long `data prepare` takes: a cold build of the embedded corpus, then a cache hit.

Every peer calls `data.prepare` when it starts; after the first build it must find the prepared
directory in its cache at once (a cache hit only describes the corpus files and hashes that
description, it reads no text). This script builds into a fresh cache directory, then prepares the
same config again `--hits` times and reports the median.

    python scripts/bench_data.py                                # 8 MB of stdlib; bench/results/data.json
    python scripts/bench_data.py --max-corpus-mb 1 --out /tmp/data.json
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402

from p2p_photon import data  # noqa: E402
from p2p_photon.config import load_config  # noqa: E402
from p2p_photon.files import write_json_atomic  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-corpus-mb", type=float, default=8.0, help="data.max_corpus_mb")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--hits", type=int, default=5, help="cache hits timed after the cold build")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    return ap.parse_args(argv)


def timed_prepare(cfg) -> tuple[float, Path]:
    t0 = time.perf_counter()
    out = data.prepare(cfg.data, cfg.seed, progress=False)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as cache:
        sets = [f"data.max_corpus_mb={args.max_corpus_mb}", f"data.vocab_size={args.vocab_size}",
                f"data.cache_dir={cache}"]
        cfg = load_config(None, sets)
        cold, out = timed_prepare(cfg)
        hits = [timed_prepare(cfg) for _ in range(args.hits)]
        assert all(path == out for _, path in hits), "a cache hit returned another directory"
        meta = data.load_prepared(out).meta
        tokens = sum(meta["silo_tokens"]) + meta["heldout_tokens"]
    hit = statistics.median(s for s, _ in hits)
    print(f"{'corpus MB':>10} {'vocab':>6} {'tokens':>10} {'cold s':>8} {'cache hit s':>12}")
    print(f"{args.max_corpus_mb:>10g} {args.vocab_size:>6d} {tokens:>10,d} {cold:>8.2f} {hit:>12.4f}")
    result = dict(max_corpus_mb=args.max_corpus_mb, vocab_size=args.vocab_size, tokens=tokens, cold_s=cold,
                  cache_hit_s=hit, cache_hits_s=[s for s, _ in hits],
                  command=shlex.join([sys.executable, *sys.argv]), machine=benchlib.machine_info())
    write_json_atomic(args.out, result)
    print(f"[data] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
