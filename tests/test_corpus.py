"""Private corpora (corpus.py): every format read with its library gives the tokens of its documents,
records without the text field are skipped and counted, bad input is a one-line DataError, and the
streaming tokenization resumes after an interruption to the same bytes, cached by fingerprint."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from p2p_photon import corpus
from p2p_photon.corpus import EOS, DataError

DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _reference(tokenizer: Path, docs: list[str]) -> dict[str, list[int]]:
    """Hand-computed split and tokens: document k is held out when k % 50 == 0 (fraction 0.02, seed 0)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    out = {"train": [], "heldout": []}
    for k, d in enumerate(docs):
        out["heldout" if k % 50 == 0 else "train"] += tok.encode(d, add_special_tokens=False).ids + [0]
    return out


def _tokens(out: Path) -> dict[str, list[int]]:
    return {s: np.fromfile(out / f"{s}.bin", dtype="<u2").tolist() for s in ("train", "heldout")}


def _write(kind: str, path: Path, docs: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    if kind == "jsonl":
        path = path / "c.jsonl"
        path.write_bytes(lines)
    elif kind == "jsonl.gz":
        path = path / "c.jsonl.gz"
        path.write_bytes(gzip.compress(lines))
    elif kind == "jsonl.zst":
        import zstandard

        path = path / "c.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path / "c.parquet"
        pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=17)
    elif kind == "dataset":
        import datasets

        path = path / "ds"
        datasets.Dataset.from_dict({field: docs}).save_to_disk(str(path))
    elif kind == "dir":
        path = path / "texts"
        for i, d in enumerate(docs):
            (path / f"g{i % 3}").mkdir(parents=True, exist_ok=True)
            (path / f"g{i % 3}" / f"{i:04d}.txt").write_text(d)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "dataset"])
def test_each_format_gives_the_tokens_of_its_documents(tmp_path, tokenizer, kind):
    src = _write(kind, tmp_path, DOCS)
    out = corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    assert _tokens(out) == _reference(tokenizer, DOCS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["docs"] == {"train": 117, "heldout": 3} and meta["skipped"]["missing_field"] == 0


def test_a_directory_of_text_files_reads_them_in_sorted_order(tmp_path, tokenizer):
    src = _write("dir", tmp_path, DOCS)
    order = sorted(range(len(DOCS)), key=lambda i: (f"g{i % 3}", f"{i:04d}"))
    out = corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    assert _tokens(out) == _reference(tokenizer, [DOCS[i] for i in order])


def test_a_datasets_dict_reads_every_split_and_text_field_names_the_column(tmp_path, tokenizer):
    import datasets

    dd = datasets.DatasetDict({"b": datasets.Dataset.from_dict({"body": DOCS[60:]}),
                               "a": datasets.Dataset.from_dict({"body": DOCS[:60]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    out = corpus.tokenize_corpus(tmp_path / "dd", tokenizer, tmp_path / "cache", vocab_size=400, text_field="body",
                                 progress=False)
    assert _tokens(out) == _reference(tokenizer, DOCS)


def test_a_long_text_file_is_one_document_read_in_pieces(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 1000)
    text = "".join(f"line {i} of a long file\n" for i in range(3000))  # ~70 kB, one document
    (tmp_path / "big.txt").write_text(text)
    out = corpus.tokenize_corpus(tmp_path / "big.txt", tokenizer, tmp_path / "cache", vocab_size=400,
                                 progress=False)
    toks = _tokens(out)
    assert toks["train"] == [] and toks["heldout"].count(0) == 1 and toks["heldout"][-1] == 0  # document 0: held out
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tokenizer)).decode(toks["heldout"][:-1]) == text


def test_jsonl_lines_without_the_field_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    lines = [json.dumps({"text": d}) for d in DOCS[:10]] + ['{"body": "x"}', "not json", '{"text": 3}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    out = corpus.tokenize_corpus(tmp_path / "c.jsonl", tokenizer, tmp_path / "cache", vocab_size=400,
                                 progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"]["missing_field"] == 2 and meta["skipped"]["bad_lines"] == 1
    assert sum(meta["docs"].values()) == 10
    assert "skipped 3 records without a string 'text'" in caplog.text


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data: ")
    return msg


@pytest.mark.parametrize("kind", ["parquet", "dataset"])
def test_a_table_without_the_text_column_is_a_one_line_error_naming_the_columns(tmp_path, tokenizer, kind):
    src = _write(kind, tmp_path, DOCS, field="body")
    with pytest.raises(DataError) as e:
        corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    assert "no column 'text'" in _one_line(e) and "body" in str(e.value) and "--text-field" in str(e.value)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".lock")] == []


# ids by name: gzip.compress embeds the time, so a bytes id differed between two xdist workers collecting
# in different seconds ("Different tests were collected between gw0 and gw1": the whole suite errored)
@pytest.mark.parametrize("name,content", [("data.csv.gz", gzip.compress(b"a,b\n", mtime=0)),
                                          ("blob", b"\x00\x01\x02" * 50), ("x.zip", b"PK\x03\x04")],
                         ids=["csv.gz", "blob", "zip"])
def test_an_unknown_corpus_format_is_a_one_line_error(tmp_path, tokenizer, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        corpus.tokenize_corpus(tmp_path / name, tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    assert "unknown corpus format" in _one_line(e) and ".parquet" in str(e.value)


def test_a_directory_with_no_text_is_an_error_and_binary_files_are_skipped(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError) as e:
        corpus.tokenize_corpus(tmp_path / "d", tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    assert "no text in" in _one_line(e) and "1 files of unknown format" in str(e.value)


@pytest.mark.parametrize("content", [b"{not a tokenizer", b"\x89PNG\r\n", json.dumps({"version": "1.0"}).encode()])
def test_a_tokenizer_file_that_is_not_one_is_a_one_line_error(tmp_path, content):
    (tmp_path / "tok.json").write_bytes(content)
    with pytest.raises(DataError) as e:
        corpus.load_tokenizer(tmp_path / "tok.json")
    assert "is not a tokenizer file" in _one_line(e)


def test_an_interrupted_tokenization_resumes_to_the_same_bytes(tmp_path, tokenizer, monkeypatch):
    src = _write("jsonl.zst", tmp_path, DOCS * 5)
    whole = corpus.tokenize_corpus(src, tokenizer, tmp_path / "a", vocab_size=400, progress=False)
    monkeypatch.setattr(corpus, "BATCH_BYTES", 2000)
    real, calls = corpus._Job._encode, []

    def dies_on_the_fourth_batch(self, batch, files):
        calls.append(len(batch))
        if len(calls) == 4:
            files["train"].write(b"\x07\x07\x07")  # a half-written batch, as a kill would leave it
            files["train"].flush()
            raise KeyboardInterrupt
        real(self, batch, files)

    monkeypatch.setattr(corpus._Job, "_encode", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        corpus.tokenize_corpus(src, tokenizer, tmp_path / "b", vocab_size=400, progress=False)
    assert not list((tmp_path / "b").glob("corpus-*")), "an interrupted run left a cache entry that looks complete"
    progress = json.loads(next((tmp_path / "b").glob(".partial-corpus-*/progress.json")).read_text())
    assert progress["units"] == sum(calls[:3])
    monkeypatch.setattr(corpus._Job, "_encode", real)
    resumed = corpus.tokenize_corpus(src, tokenizer, tmp_path / "b", vocab_size=400, progress=False)
    for split in ("train", "heldout"):
        assert (resumed / f"{split}.bin").read_bytes() == (whole / f"{split}.bin").read_bytes()
    assert not list((tmp_path / "b").glob(".partial-corpus-*"))


def test_the_cache_is_keyed_by_the_corpus_fingerprint(tmp_path, tokenizer, monkeypatch):
    src = _write("jsonl", tmp_path, DOCS)
    first = corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    monkeypatch.setattr(corpus._Job, "run", lambda *a: pytest.fail("re-tokenized a cached corpus"))
    assert corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=False) == first
    monkeypatch.undo()
    src.write_text(src.read_text() + json.dumps({"text": "one more document"}) + "\n")
    second = corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=False)
    assert second != first and len(_tokens(second)["train"]) > len(_tokens(first)["train"])


def test_progress_is_reported_in_megabytes_per_second_with_an_eta(tmp_path, tokenizer, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(corpus, "BATCH_BYTES", 500)
    src = _write("jsonl", tmp_path, DOCS)
    from p2p_photon import ui

    monkeypatch.setattr(corpus, "progress_bar", lambda *a, **k: ui.progress_bar(*a, **{**k, "log_every": 0.0}))
    with caplog.at_level(logging.INFO):
        corpus.tokenize_corpus(src, tokenizer, tmp_path / "cache", vocab_size=400, progress=True)
    lines = [r.getMessage() for r in caplog.records if "MB/s" in r.getMessage()]
    assert lines and "ETA s" in lines[-1] and "(bytes)" in lines[-1]
