"""Tests for p2p_photon.data: corpus reading, splits, tokenizer, shards, streams, errors.

Corpora are small and written into tmp dirs (vocab 512); the stdlib corpus is capped at 0.5 MB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from p2p_photon import data
from p2p_photon.config import DataConfig
from p2p_photon.data import (
    MIN_TOKENS,
    DataError,
    TokenStream,
    _budgets,
    heldout_batches,
    load_prepared,
    open_silo_stream,
    prepare,
    stdlib_root,
)

pytestmark = pytest.mark.timeout(120)

VOCAB = 512
GROUPS = {  # group -> words that only this group uses (so the silos really differ)
    "alpha": ["apple", "anchor", "arrow", "amber"],
    "beta": ["bison", "barrel", "beacon", "bramble"],
    "gamma": ["garnet", "glacier", "goblet", "gull"],
    "delta": ["dune", "dagger", "dolphin", "drift"],
    "epsilon": ["ember", "easel", "echo", "elm"],
    "zeta.txt": ["zinc", "zephyr", "zero", "zigzag"],
}


def _pyish(name: str, words: list[str], n_funcs: int, seed: int) -> str:
    """Deterministic Python-looking text, unique per file (its name is in every function)."""
    rng = random.Random(seed)
    lines = [f'"""Module {name}."""\n']
    for i in range(n_funcs):
        a, b = rng.sample(words, 2)
        lines.append(
            f"def {a}_{i}({b}, count={rng.randint(0, 99)}):\n"
            f"    # {name}: {a} then {b}\n    return [{b} * k for k in range(count)]\n\n"
        )
    return "".join(lines)


def _write_corpus_dir(root: Path) -> Path:
    for g, (group, words) in enumerate(GROUPS.items()):
        if group.endswith(".txt"):  # a top-level file is a group of its own
            (root / group).write_text(_pyish(group, words, 60, g), encoding="utf-8")
            continue
        for f in range(4):
            path = root / group / ("sub" if f == 3 else "") / f"mod_{f}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_pyish(f"{group}/mod_{f}", words, 60, 10 * g + f), encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.py").write_text("hidden = True\n" * 500)
    (root / "alpha" / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    return root


def _cfg(corpus: Path | str, cache: Path, **kw) -> DataConfig:
    base = dict(vocab_size=VOCAB, num_silos=3, heldout_fraction=0.1, max_corpus_mb=0.0)
    return DataConfig(corpus=str(corpus), cache_dir=str(cache), **(base | kw))


def _manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "manifest.jsonl").read_text().splitlines()]


def _decode_docs(prep, shard: Path) -> list[str]:
    ids = np.fromfile(shard, dtype="<u2").tolist()
    tok, docs, cur = prep.tokenizer(), [], []
    for t in ids:
        if t == 0:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return _write_corpus_dir(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache_a(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache_a")


@pytest.fixture(scope="module")
def noniid_dir(corpus_dir, cache_a) -> Path:
    return prepare(_cfg(corpus_dir, cache_a), seed=0, progress=False)


@pytest.fixture(scope="module")
def iid_dir(corpus_dir, cache_a) -> Path:
    return prepare(_cfg(corpus_dir, cache_a, split="iid"), seed=0, progress=False)


# ----------------------------------------------------------------------------- prepare


def test_prepare_dir_writes_complete_dataset(noniid_dir):
    prep = load_prepared(noniid_dir)
    names = {p.name for p in prep.dir.iterdir()}
    expected = {"tokenizer.json", "tokenizer_config.json", "meta.json", "manifest.jsonl", "heldout.bin"}
    assert expected | {f"silo_{i}.bin" for i in range(3)} <= names
    assert prep.dir.name.startswith("data-") and prep.vocab_size == VOCAB and prep.meta["dtype"] == "uint16"
    assert prep.tokenizer_hash == hashlib.sha256((prep.dir / "tokenizer.json").read_bytes()).hexdigest()
    for i in range(3):
        ids = np.fromfile(prep.silo_path(i), dtype="<u2")
        assert len(ids) == prep.tokens(i) >= MIN_TOKENS
        assert ids.max() < VOCAB and ids[-1] == 0  # every document ends with <|endoftext|>
    assert prep.meta["corpus"]["groups"] == len(GROUPS)  # .hidden skipped
    assert prep.meta["skipped_files"]["binary"] == 1  # alpha/blob.bin
    assert prep.meta["docs"]["total"] == 5 * 4 + 1


def test_prepare_jsonl_skips_and_counts_bad_lines(tmp_path):
    lines = [json.dumps({"text": _pyish(f"doc{i}", GROUPS["beta"], 6, i), "id": i}) for i in range(150)]
    lines[10:10] = ["{not json", json.dumps({"title": "no text"}), "[1, 2]", ""]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prep = load_prepared(prepare(_cfg(corpus, tmp_path / "cache"), seed=1, progress=True))
    assert prep.meta["skipped_files"]["bad_jsonl_lines"] == 3
    assert prep.meta["docs"]["total"] == 150
    groups = [g for gs in prep.meta["silo_groups"].values() for g in gs]
    assert len(groups) == 3 and all(g.startswith("corpus.jsonl[") for g in groups)  # contiguous line ranges
    assert {d["name"].split(":")[0] for d in _manifest(prep.dir)} == {"corpus.jsonl"}


def test_single_text_file_is_cut_into_documents_and_sections(tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text(_pyish("book", GROUPS["gamma"], 700, 3), encoding="utf-8")
    prep = load_prepared(
        prepare(_cfg(corpus, tmp_path / "cache", heldout_fraction=0.2), seed=0, progress=False)
    )
    docs = _manifest(prep.dir)
    assert len(docs) >= 10 and all(d["name"].startswith("book.txt#") for d in docs)
    assert all(len(g) == 1 and g[0].startswith("book.txt[") for g in prep.meta["silo_groups"].values())


def test_prepare_is_deterministic_and_built_once_when_concurrent(corpus_dir, noniid_dir, tmp_path, caplog):
    cfg = _cfg(corpus_dir, tmp_path / "cache_b")
    results: list[Path] = []
    with caplog.at_level(logging.INFO, logger="p2p_photon.data"):
        threads = [
            threading.Thread(target=lambda: results.append(prepare(cfg, 0, progress=False))) for _ in "ab"
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert sum(r.getMessage().startswith("preparing data") for r in caplog.records) == 1
    other = results[0]
    assert other != noniid_dir and other.name == noniid_dir.name
    for name in [
        "tokenizer.json",
        "heldout.bin",
        "manifest.jsonl",
        "meta.json",
        *(f"silo_{i}.bin" for i in range(3)),
    ]:
        assert (other / name).read_bytes() == (noniid_dir / name).read_bytes(), name
    assert not list(other.parent.glob(".tmp-*"))


def test_cache_hit_returns_same_dir_without_rebuilding(corpus_dir, cache_a, noniid_dir, monkeypatch):
    """A cache hit reads nothing and builds nothing (how long it takes: scripts/bench_data.py)."""
    meta_mtime = (noniid_dir / "meta.json").stat().st_mtime_ns

    def no_build(*_args, **_kwargs):
        raise AssertionError("a cache hit must not rebuild the dataset")

    with monkeypatch.context() as m:
        m.setattr(data, "_build_atomically", no_build)
        m.setattr(data, "_read_corpus", no_build)
        assert prepare(_cfg(corpus_dir, cache_a), seed=0, progress=False) == noniid_dir
    assert (noniid_dir / "meta.json").stat().st_mtime_ns == meta_mtime
    assert prepare(_cfg(corpus_dir, cache_a), seed=1, progress=False) != noniid_dir  # seed is in the key


def test_noniid_silos_have_disjoint_groups(noniid_dir):
    prep = load_prepared(noniid_dir)
    groups = [set(prep.meta["silo_groups"][str(i)]) for i in range(3)]
    assert all(groups) and set.union(*groups) == set(GROUPS)
    assert sum(map(len, groups)) == len(GROUPS)  # pairwise disjoint
    for doc in _manifest(noniid_dir):
        if doc["split"] != "heldout":
            assert doc["group"] in groups[int(doc["split"].removeprefix("silo_"))]


def test_iid_differs_from_noniid_but_shares_heldout_and_tokenizer(noniid_dir, iid_dir):
    noniid, iid = load_prepared(noniid_dir), load_prepared(iid_dir)
    assert iid.dir != noniid.dir
    assert iid.tokenizer_hash == noniid.tokenizer_hash
    assert iid.heldout_path.read_bytes() == noniid.heldout_path.read_bytes()
    assert iid.silo_path(0).read_bytes() != noniid.silo_path(0).read_bytes()
    iid_groups = [set(g) for g in iid.meta["silo_groups"].values()]
    assert all(len(g) >= 3 for g in iid_groups)
    assert sum(map(len, iid_groups)) > len(set.union(*iid_groups))  # groups are shared between silos


def test_heldout_documents_are_disjoint_from_silos(noniid_dir):
    docs = _manifest(noniid_dir)
    held = {d["name"] for d in docs if d["split"] == "heldout"}
    train = {d["name"] for d in docs if d["split"] != "heldout"}
    assert held and train and not held & train and len(held) + len(train) == len(docs)
    prep = load_prepared(noniid_dir)
    silo_text = "".join("".join(_decode_docs(prep, prep.silo_path(i))) for i in range(3))
    held_texts = _decode_docs(prep, prep.heldout_path)
    assert len(held_texts) == len(held) and all(t and t not in silo_text for t in held_texts)


def test_max_corpus_mb_keeps_every_group():
    sizes = {"big": 10_000, "mid": 3_000, "small": 100, "tiny": 1}
    budgets = _budgets(sizes, 6_000)
    assert budgets["small"] == 100 and budgets["tiny"] == 1  # small groups are kept whole
    assert {budgets["big"], budgets["mid"]} == {2949, 2950} and sum(budgets.values()) == 6_000
    assert _budgets(sizes, 0) == sizes


def test_stdlib_corpus_small_cap_splits_by_module(tmp_path):
    cfg = DataConfig(
        corpus="stdlib", cache_dir=str(tmp_path), vocab_size=VOCAB, num_silos=3, max_corpus_mb=0.5
    )
    prep = load_prepared(prepare(cfg, seed=0, progress=False))
    assert prep.meta["corpus"]["kind"] == "stdlib" and prep.meta["corpus"]["chars"] <= 500_000
    groups = [set(prep.meta["silo_groups"][str(i)]) for i in range(3)]
    assert all(len(g) > 10 for g in groups) and sum(map(len, groups)) == len(set.union(*groups))
    assert {"json", "email", "asyncio", "os"} <= set.union(*groups)
    names = [d["name"] for d in _manifest(prep.dir)]
    assert all(".py" in n for n in names)
    assert not any(
        part in {"test", "tests", "idlelib", "site-packages"} for n in names for part in n.split("/")
    )
    assert (stdlib_root() / "json" / "__init__.py").is_file()


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_source_and_loads_with_transformers(noniid_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = (stdlib_root() / "json" / "decoder.py").read_text()
    assert source.isascii()
    prep = load_prepared(noniid_dir)
    for tok in (
        prep.tokenizer(),
        AutoTokenizer.from_pretrained(str(noniid_dir), local_files_only=True),
        PreTrainedTokenizerFast(tokenizer_file=str(noniid_dir / "tokenizer.json")),
    ):
        ids = tok.encode(source)
        assert max(ids) < VOCAB and tok.decode(ids) == source
    tok = prep.tokenizer()
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
    tok.save_pretrained(noniid_dir.parent / "resaved")
    assert AutoTokenizer.from_pretrained(str(noniid_dir.parent / "resaved")).decode(ids) == source


# ----------------------------------------------------------------------------- streams


def _stream(prep, silos=(0,), seed=0, stream_id=0, seq_len=32, batch_size=4) -> TokenStream:
    return open_silo_stream(
        prep, list(silos), seq_len=seq_len, batch_size=batch_size, seed=seed, stream_id=stream_id
    )


def test_token_stream_is_deterministic(noniid_dir):
    prep = load_prepared(noniid_dir)
    a, b, c = _stream(prep), _stream(prep), _stream(prep, stream_id=1)
    batches = [a.next_batch() for _ in range(5)]
    assert batches[0].shape == (4, 33) and batches[0].dtype == torch.int64
    assert all(torch.equal(x, b.next_batch()) for x in batches)
    assert not all(torch.equal(x, c.next_batch()) for x in batches)


def test_token_stream_epoch_visits_every_window_once(noniid_dir):
    prep = load_prepared(noniid_dir)
    s = _stream(prep, silos=(1, 2), seq_len=32, batch_size=1)
    tokens = np.concatenate([np.fromfile(prep.silo_path(i), dtype="<u2") for i in (1, 2)]).astype(np.int64)
    assert s.n_windows == len(tokens) // 33
    expected = tokens[: s.n_windows * 33].reshape(-1, 33)
    seen = np.concatenate([s.next_batch().numpy() for _ in range(s.n_windows)])
    assert s.state_dict()["epoch"] == 0
    order = np.lexsort(seen.T[::-1])
    assert np.array_equal(seen[order], expected[np.lexsort(expected.T[::-1])])
    s.next_batch()
    assert s.state_dict()["epoch"] == 1


@pytest.mark.parametrize("skip", [3, "near_epoch_end"])
def test_token_stream_resumes_exactly_from_state_dict(noniid_dir, skip):
    prep = load_prepared(noniid_dir)
    s = _stream(prep)
    n = 3 if skip == 3 else s.n_windows // 4 - 2  # the next 5 batches then cross into epoch 1
    for _ in range(n):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))
    assert all(isinstance(v, int) for v in state.values())
    resumed = _stream(prep)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(s.next_batch(), resumed.next_batch())
    assert skip == 3 or s.state_dict()["epoch"] == 1


def test_token_stream_rejects_foreign_state_and_short_shards(noniid_dir):
    prep = load_prepared(noniid_dir)
    state = _stream(prep, seed=0).state_dict()
    with pytest.raises(DataError, match="seed"):
        _stream(prep, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match=r"silo_0\.bin.*model\.seq_len"):
        _stream(prep, seq_len=prep.tokens(0))
    with pytest.raises(DataError, match="data.silo"):
        _stream(prep, silos=(3,))


def test_heldout_batches_are_fixed_and_wrap(noniid_dir):
    prep = load_prepared(noniid_dir)
    first = heldout_batches(prep, seq_len=32, batch_size=4, n_batches=3)
    again = heldout_batches(prep, seq_len=32, batch_size=4, n_batches=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    held = np.fromfile(prep.heldout_path, dtype="<u2").astype(np.int64)
    assert first[0].shape == (4, 33) and np.array_equal(first[0][1].numpy(), held[33:66])
    n_windows = len(held) // 33
    many = torch.cat(heldout_batches(prep, seq_len=32, batch_size=1, n_batches=n_windows + 1))
    assert torch.equal(many[n_windows], many[0])


# ----------------------------------------------------------------------------- errors


def _write_tiny_dir(root: Path) -> Path:
    for i in range(4):
        (root / f"f{i}.py").write_text(f"x_{i} = {i}\n" * 5)
    return root


def _write_binary_dir(root: Path) -> Path:
    (root / "a.bin").write_bytes(b"abc\x00def" * 50)
    (root / "b.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 50)  # not UTF-8
    return root


def _write_jsonl_without_text(root: Path) -> Path:
    (root / "c.jsonl").write_text('{"title": "x"}\n{"text": 3}\nnot json\n')
    return root / "c.jsonl"


def _write_broken_links(root: Path) -> Path:
    for i in range(2):
        (root / f"gone{i}.txt").symlink_to(root / f"missing{i}.txt")
    return root


@pytest.mark.parametrize(
    ("make", "kw", "pattern"),
    [
        (lambda d: d / "nope", {}, "corpus path not found"),
        (lambda d: d, {}, "no readable text"),
        (lambda d: (d / "empty.txt").touch() or d / "empty.txt", {}, "no readable text"),
        (_write_binary_dir, {}, "2 binary/non-UTF-8"),
        (_write_jsonl_without_text, {}, "'text' field"),
        (_write_broken_links, {}, "none of the files .* could be read"),
        (_write_tiny_dir, {"num_silos": 8}, "fewer data.num_silos"),
        (_write_tiny_dir, {"num_silos": 2, "heldout_fraction": 0.25}, "fewer data.num_silos"),
    ],
    ids=[
        "missing",
        "empty-dir",
        "empty-file",
        "binary-only",
        "jsonl-no-text",
        "unreadable",
        "too-many-silos",
        "too-few-tokens",
    ],
)
def test_bad_corpora_raise_one_line_data_error(tmp_path, make, kw, pattern):
    (tmp_path / "c").mkdir()
    corpus = make(tmp_path / "c")
    with pytest.raises(DataError, match=pattern) as err:
        prepare(_cfg(corpus, tmp_path / "cache", **kw), seed=0, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "c") in msg
    assert not list(tmp_path.glob("cache/data-*")) and not list(tmp_path.glob("cache/.tmp-*"))


def test_load_prepared_detects_missing_and_modified_data(noniid_dir, tmp_path):
    with pytest.raises(DataError, match="data prepare"):
        load_prepared(tmp_path / "nothing")
    copy = Path(shutil.copytree(noniid_dir, tmp_path / "copy"))
    with open(copy / "silo_1.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"silo_1\.bin"):
        load_prepared(copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_prepared(copy)


def test_truncated_text_is_cut_at_a_line_break_without_splitting_characters():
    from p2p_photon.corpus import chunk_text as _chunk
    from p2p_photon.data import _decode

    raw = "caf\u00e9 ol\u00e9\n\u00e9t\u00e9\n".encode()
    assert _decode(raw[:-2], truncated=True) == "caf\u00e9 ol\u00e9\n"
    assert _decode(raw[:3], truncated=True) == "caf"
    assert _chunk("ab\ncd\nef\n", 4) == ["ab\n", "cd\n", "ef\n"]
    assert "".join(_chunk("x" * 10, 4)) == "x" * 10


def test_write_silo_dirs_writes_the_split_of_prepare_as_text_files(corpus_dir, tmp_path):
    """The demo's stand-in for private data: the silos and held-out split of `prepare`, as directories."""
    cfg = DataConfig(corpus=str(corpus_dir), vocab_size=300, num_silos=2, cache_dir=str(tmp_path / "c"),
                     heldout_fraction=0.1)
    silos, heldout = data.write_silo_dirs(cfg, 0, tmp_path / "out")
    texts = [sorted(p.read_text() for p in d.rglob("*") if p.is_file()) for d in [*silos, heldout]]
    assert len(silos) == 2 and all(texts)
    prep = load_prepared(prepare(cfg, 0, progress=False))
    manifest = [json.loads(line) for line in (prep.dir / "manifest.jsonl").read_text().splitlines()]
    for i, d in enumerate([*silos, heldout]):
        split = "heldout" if d == heldout else f"silo_{i}"
        assert len(texts[i]) == sum(1 for m in manifest if m["split"] == split)
    assert not set(texts[0]) & set(texts[1])
