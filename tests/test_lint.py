import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "p2p_photon", "tests", "scripts"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_nothing_is_unpickled():
    """Issue 8: no pickle of data from the network (or anywhere): checkpoints are safetensors + JSON,
    state downloads are raw tensor buffers + msgpack. A source scan that fails on any unpickling call."""
    import re

    pattern = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|\bnp\.load\(.*allow_pickle=True"
                         r"|\bcloudpickle\b|\bdill\b")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "p2p_photon").glob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
