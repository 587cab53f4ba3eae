import pytest
import torch

from p2p_photon.hashing import theta_hash
from p2p_photon.model import PRESETS, build_model, count_params


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_within_ten_percent(name):
    p = PRESETS[name]
    model = build_model(name, p.reference_vocab, 128, seed=0, device="meta")
    n = count_params(model)
    assert abs(n - p.nominal_params) / p.nominal_params <= 0.10, (name, n)


def test_seeded_init_is_reproducible_and_seed_dependent():
    a, b, c = (build_model("nano", 512, 64, seed=s) for s in (7, 7, 8))
    assert theta_hash(a) == theta_hash(b)
    assert theta_hash(a) != theta_hash(c)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_theta_hash_sees_a_single_bit():
    model = build_model("nano", 512, 64, seed=0)
    h = theta_hash(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.view(torch.int32).view(-1)[0] ^= 1
    assert theta_hash(model) != h
