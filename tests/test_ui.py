"""ui.py: the progress bar's log lines where there is no terminal (CI logs, background peers)."""

from __future__ import annotations

import logging

from p2p_photon.ui import progress_bar


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "p2p_photon.ui"]


def test_training_line_without_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="p2p_photon.ui"):
        with progress_bar("training", 10, log_every=0) as bar:
            bar.update(loss=3.25, lr=6e-4)
            bar.update(2, loss=3.0)
    assert _lines(caplog) == ["step 1 | loss 3.25 lr 0.0006", "step 3 | loss 3"]


def test_labelled_stage_lines_count_against_the_total(caplog):
    with caplog.at_level(logging.INFO, logger="p2p_photon.ui"):
        with progress_bar("tokenizing", 10, label="tokenizing", log_every=0) as bar:
            bar.update(4)
        with progress_bar("training tokenizer", None, label="training tokenizer", log_every=0) as bar:
            bar.update(mb_s=12.5)
            bar.complete()
    assert _lines(caplog) == ["tokenizing 4/10", "training tokenizer 1 | mb_s 12.5"]


def test_no_lines_when_log_every_is_none(caplog):
    with caplog.at_level(logging.INFO, logger="p2p_photon.ui"), progress_bar("x", 5, log_every=None) as bar:
        bar.update(5)
    assert _lines(caplog) == []
