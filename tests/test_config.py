import subprocess
import sys
from pathlib import Path

import pytest

from p2p_photon.config import Config, ConfigError, fingerprint, from_dict, load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "peers").glob("*.toml")) + sorted((ROOT / "bootstrap").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist():
    assert len(list((ROOT / "peers").glob("*.toml"))) >= 2


def test_overrides_apply_and_parse_types():
    cfg = load_config(None, ["inner.lr=1e-3", "rounds.num_rounds=4", "dht.initial_peers=['/ip4/127.0.0.1/tcp/1/p2p/x']",
                             "data.corpus=/tmp/some dir"])
    assert cfg.inner.lr == 1e-3 and cfg.rounds.num_rounds == 4
    assert cfg.dht.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/x",)
    assert cfg.data.corpus == "/tmp/some dir"  # not valid TOML -> taken as a string


@pytest.mark.parametrize("override,needle", [
    ("inner.lr=-1", "inner.lr"),
    ("inner.bogus=1", "unknown key 'inner.bogus'"),
    ("bogus.x=1", "unknown key 'bogus'"),
    ("inner.batch_size='eight'", "inner.batch_size: must be an integer"),
    ("inner.batch_size=2.5", "inner.batch_size: must be an integer"),
    ("outer.preset='sgd'", "outer.preset: must be one of"),
    ("data.silo=5", "data.silo"),
    ("averaging.target_group_size=1", "averaging.target_group_size"),
    ("dht.run_id='a b'", "dht.run_id"),
    ("inner=3", "inner: must be a table"),
    ("noequals", "must look like section.key=value"),
    ("averaging.compression='int3'", "averaging.compression"),
    ("outer.block_cycle=2", "outer.block_cycle: must be 0 (off) or 3..66"),
    ("averaging.clip_factor=0.5", "averaging.clip_factor: must be >= 1"),
    ("rounds.sample_cap_vs_others=0.5", "rounds.sample_cap_vs_others: must be >= 1"),
    ("dht.members='m.txt'", "dht.members: a closed swarm needs dht.identity_path"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_fingerprint_covers_what_must_match():
    base = Config()
    fp = fingerprint(base, "tok")
    assert fp == fingerprint(Config(), "tok")
    assert fp != fingerprint(base, "other-tokenizer")
    for change in (dict(seed=1), dict(model=dict(preset="tiny")), dict(outer=dict(preset="diloco"))):
        assert fingerprint(from_dict({**base.to_dict(), **{k: ({**base.to_dict()[k], **v} if isinstance(v, dict) else v)
                                                           for k, v in change.items()}}), "tok") != fp
    # the local optimizer and batch size may differ between peers
    assert fingerprint(base.replace(inner=dict(lr=1e-4, batch_size=2)), "tok") == fp


def test_toml_round_trip(tmp_path):
    cfg = load_config(None, ["inner.lr=1e-3", "dht.host_maddrs=['/ip4/127.0.0.1/tcp/5']"])
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "p2p_photon.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_config_check_ok_and_errors(tmp_path):
    good = _cli("config", "check", str(ROOT / "peers" / "cpu_peer.toml"))
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[inner]\nlr = 'fast'\n")
    r = _cli("config", "check", str(bad))
    assert r.returncode == 2
    assert "inner.lr" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    broken = tmp_path / "broken.toml"
    broken.write_text("[inner\nlr = 1\n")
    r = _cli("config", "check", str(broken))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr

    r = _cli("config", "check", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
