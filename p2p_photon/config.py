"""Run configuration: frozen dataclasses, TOML loading, dotted overrides, validation, fingerprint.

Every section is a frozen, keyword-only dataclass with a docstring per field. Unknown keys,
wrong types and out-of-range values raise `ConfigError`, whose message is one line naming the
key and the fix; the command line turns it into exit code 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError


class ConfigError(UsageError, ValueError):
    """A one-line, user-facing configuration error (exit code 2)."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key}: {msg}")


def _check_choice(value: str, registry: dict, key: str) -> None:
    """Choices that name a registry entry (model presets, codecs) are checked against the registry
    itself, so the two never disagree."""
    _check(value in registry, key, f"must be one of {', '.join(map(repr, registry))} (got {value!r})")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = "nano"
    """Model size preset: a key of p2p_photon.model.PRESETS (nano, tiny, small, 125m … 7b)."""
    seq_len: int = 128
    """Tokens per training sequence (context length)."""

    def validate(self) -> None:
        from .model import PRESETS

        _check_choice(self.preset, PRESETS, "model.preset")
        _check(8 <= self.seq_len <= 32768, "model.seq_len", "must be between 8 and 32768")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    corpus: str = "stdlib"
    """'stdlib' (the running Python's standard-library source) or a path: a text file, a
    directory of files, or a .jsonl file with a 'text' field."""
    vocab_size: int = 8192
    """Byte-level BPE vocabulary size."""
    num_silos: int = 3
    """Number of per-peer data silos the corpus is split into."""
    silo: int = 0
    """Which silo this peer trains on (its peer index)."""
    split: Literal["noniid", "iid"] = "noniid"
    """'noniid': silos by top-level module/file group; 'iid': documents dealt at random."""
    heldout_fraction: float = 0.02
    """Fraction of documents kept aside (fixed, seeded) for held-out evaluation."""
    max_corpus_mb: float = 8.0
    """Read at most this many MB of the corpus (0 = all); keeps preparation quick."""
    cache_dir: str = ".cache/p2p_photon"
    """Where prepared tokenizers and token shards are stored (relative to the working dir)."""
    text_field: str = "text"
    """The field (JSONL) or column (Parquet, datasets) that holds a document's text (`peer --text-field`)."""
    run_spec: str = ""
    """The verified copy of the run's spec (`runspec`) a peer joined with `peer --data`: its tokenizer and
    public eval set are used, data.corpus is this peer's private corpus; '' = the shared-corpus path."""

    def validate(self) -> None:
        _check(256 < self.vocab_size <= 65536, "data.vocab_size", "must be in (256, 65536]")
        _check(1 <= self.num_silos <= 1024, "data.num_silos", "must be between 1 and 1024")
        _check(0 <= self.silo < self.num_silos, "data.silo", f"must be in [0, num_silos={self.num_silos})")
        _check(0.0 < self.heldout_fraction < 0.5, "data.heldout_fraction", "must be in (0, 0.5)")
        _check(self.max_corpus_mb >= 0, "data.max_corpus_mb", "must be >= 0 (0 = all)")
        _check(bool(self.corpus), "data.corpus", "must be 'stdlib' or a path")
        _check(bool(self.text_field), "data.text_field", "must be a field name")


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    """Local optimizer: bitsandbytes AdamW8bit (default) or torch AdamW."""
    lr: float = 3e-3
    """Peak learning rate (Photon: small batches, high learning rates)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 50
    """Linear warmup, in global steps."""
    total_steps: int = 5000
    """Length of the cosine schedule, in global steps (the swarm's summed steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' = bf16 autocast on CUDA, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train."""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """How the ranks of a multi-process peer (torchrun, `peer --nproc N`) share the work; inner.batch_size is
    per rank. 'ddp' = a replica per rank, gradients all-reduced (8-bit optimizer states work);
    'fsdp2' = parameters, gradients and optimizer state sharded with fully_shard (torch AdamW only)."""
    simulate_slowdown: float = 0.0
    """Sleep this many seconds after every local step: simulates slower hardware (experiments, tests)."""

    def validate(self) -> None:
        _check(0 < self.lr <= 1.0, "inner.lr", "must be in (0, 1]")
        _check(0 <= self.min_lr_ratio <= 1, "inner.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "inner.warmup_steps", "must be >= 0")
        _check(self.total_steps >= 1, "inner.total_steps", "must be >= 1")
        _check(self.weight_decay >= 0, "inner.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "inner.beta1/beta2", "must be in [0, 1)")
        _check(1 <= self.batch_size <= 4096, "inner.batch_size", "must be between 1 and 4096")
        _check(1 <= self.grad_accum <= 1024, "inner.grad_accum", "must be between 1 and 1024")
        _check(self.grad_clip >= 0, "inner.grad_clip", "must be >= 0")
        _check(0 <= self.simulate_slowdown <= 60, "inner.simulate_slowdown", "must be in [0, 60] seconds")


OUTER_PRESETS = {
    "photon": dict(lr=1.0, momentum=0.0, nesterov=False),
    "diloco": dict(lr=0.7, momentum=0.9, nesterov=True),
}


@dataclass(frozen=True, kw_only=True)
class OuterConfig:
    preset: Literal["photon", "diloco", "custom"] = "photon"
    """'photon' = FedAvg (lr 1.0, momentum 0); 'diloco' = Nesterov (lr 0.7, momentum 0.9);
    'custom' = use lr/momentum/nesterov below."""
    lr: float = 1.0
    """Outer learning rate (only for preset 'custom')."""
    momentum: float = 0.0
    """Outer momentum (only for preset 'custom')."""
    nesterov: bool = False
    """Nesterov momentum (only for preset 'custom')."""
    block_cycle: int = 0
    """FedCyBGD: split the model into this many parameter groups and train and average only one group
    per round (0 = off: every parameter every round). At least 3: the token embeddings are group 0,
    the final norm + LM head the last group, the transformer blocks split evenly in between."""
    block_order: Literal["cyclic", "random", "descending"] = "cyclic"
    """Order in which groups are visited: 'cyclic' 0,1,..,B-1; 'descending' B-1,..,0 (head first);
    'random' a seeded permutation per cycle (the same on every peer)."""

    def resolved(self) -> dict[str, Any]:
        if self.preset == "custom":
            return dict(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        return dict(OUTER_PRESETS[self.preset])

    def validate(self) -> None:
        _check(0 < self.lr <= 10, "outer.lr", "must be in (0, 10]")
        _check(0 <= self.momentum < 1, "outer.momentum", "must be in [0, 1)")
        _check(self.block_cycle == 0 or 3 <= self.block_cycle <= 66, "outer.block_cycle",
               "must be 0 (off) or 3..66 (embeddings, block groups, head)")
        _check(not (self.nesterov and self.momentum == 0 and self.preset == "custom"),
               "outer.nesterov", "needs outer.momentum > 0")


@dataclass(frozen=True, kw_only=True)
class RoundsConfig:
    target_samples_per_round: int = 256
    """A round ends when the swarm's samples for it reach this many sequences."""
    max_local_steps: int = 0
    """Optionally end this peer's round after this many local steps (0 = no limit)."""
    max_round_seconds: float = 0.0
    """Optionally end this peer's round after this many seconds of training (0 = no limit)."""
    num_rounds: int = 0
    """Stop after this many rounds (0 = run until interrupted)."""
    start_peers: int = 1
    """A fresh run's first round starts once this many of its peers (this one included) are on the DHT: a
    cohort launched together trains round 0 together, not the first few to finish importing. A peer
    joining a run already past round 0 never waits (1 = start at once)."""
    max_rounds_ahead: int = 2
    """Progress records claiming a round more than this far ahead of ours are ignored (a peer
    cannot drag the swarm forward); a majority of the peers must be ahead before we move on."""
    sample_cap_vs_others: float = 1.0
    """When deciding that a round is over, another peer's samples count at most this many times the
    largest count among the rest of the swarm (this peer included): one peer cannot end rounds
    early by claiming samples it did not train. A lone much faster peer is undercounted, which
    only makes rounds longer."""

    linger_seconds: float = 20.0
    """A peer that finished a bounded run (rounds.num_rounds) keeps serving its final state for up to this
    many seconds while a live peer of the run is still behind it, so a straggler downloads the final
    model instead of ending on an older one; never less than one averaging attempt (averaging.attempt_s)
    unless 0 (leave at once)."""

    def validate(self) -> None:
        _check(self.target_samples_per_round >= 1, "rounds.target_samples_per_round", "must be >= 1")
        _check(self.max_local_steps >= 0, "rounds.max_local_steps", "must be >= 0 (0 = no limit)")
        _check(self.max_round_seconds >= 0, "rounds.max_round_seconds", "must be >= 0 (0 = no limit)")
        _check(self.num_rounds >= 0, "rounds.num_rounds", "must be >= 0 (0 = forever)")
        _check(self.start_peers >= 1, "rounds.start_peers", "must be >= 1 (1 = start at once)")
        _check(self.max_rounds_ahead >= 1, "rounds.max_rounds_ahead", "must be >= 1")
        _check(self.sample_cap_vs_others >= 1, "rounds.sample_cap_vs_others", "must be >= 1")
        _check(self.linger_seconds >= 0, "rounds.linger_seconds", "must be >= 0 (0 = leave at once)")


@dataclass(frozen=True, kw_only=True)
class AveragingConfig:
    compression: str = "int8"
    """Pseudo-gradient compression on the wire, a key of p2p_photon.codecs.CODECS: 'int8' = bitsandbytes blockwise 8-bit, 'int4' =
    blockwise 4-bit absmax, 'fp16', 'none' = fp32. Lossy modes keep what quantization cut off and add
    it to the next round's pseudo-gradient (error feedback)."""
    overlap: bool = False
    """Overlapped ("eager") rounds: round r's all-reduce runs in the background while round r+1
    already trains, and its update is applied one round late (the local model keeps its progress).
    Training never waits for matchmaking; the price is a one-round-stale global update."""
    error_feedback: bool = True
    """Carry the quantization error of this peer's pseudo-gradient into its next round."""
    aggregator: Literal["mean", "clip", "centered_clip"] = "clip"
    """How a reducer combines the group's contributions to its part: 'mean' = weighted mean;
    'clip' = each contribution's norm clipped to clip_factor x the median norm first;
    'centered_clip' = CenteredClip (BTARD) around the running estimate. Non-finite contributions
    and weights not backed by the sender's progress record are always rejected."""
    clip_factor: float = 2.0
    """Clipping radius for 'clip'/'centered_clip', in multiples of the median contribution norm."""
    max_delta_norm_ratio: float = 10.0
    """Self-check before sending: skip contributing (and say why) if this peer's pseudo-gradient norm
    exceeds this many times the median of its recent rounds, or is not finite."""
    min_group_size: int = 2
    """Smallest group that counts as an all-reduce."""
    target_group_size: int = 64
    """Largest group formed for one round."""
    matchmaking_time: float = 5.0
    """Seconds to wait for peers to join this round's group."""
    allreduce_timeout: float = 60.0
    """Seconds before an all-reduce is abandoned (the round then counts as failed)."""
    round_timeout: float = 120.0
    """Upper bound on the seconds one averaging attempt may spend finding its group (at most
    4 x matchmaking_time is used); the all-reduce itself is bounded by allreduce_timeout."""
    consensus_timeout: float = 5.0
    """Seconds to wait for every group member's hash of the average before trusting those that answered."""

    # -- timeouts derived from the ones above (one place, used by the peer and the averager)
    @property
    def request_timeout(self) -> float:
        """Seconds a matchmaking request to another peer may take."""
        return min(10.0, self.matchmaking_time / 2)

    @property
    def next_chunk_timeout(self) -> float:
        """Seconds to wait for the next chunk of a tensor stream in the all-reduce."""
        return min(30.0, self.allreduce_timeout / 2)

    @property
    def step_timeout(self) -> float:
        """Seconds one averaging attempt may spend finding its group."""
        return min(self.round_timeout, 4 * self.matchmaking_time)

    @property
    def attempt_s(self) -> float:
        """About one averaging attempt of a lagging peer, all stages included: how long a tie of θ hashes
        waits for it to publish, and the least a finished peer lingers for it."""
        return 3 * self.step_timeout + self.allreduce_timeout

    @property
    def landing_timeout(self) -> float:
        """Seconds an overlapped round waits for its background all-reduce before it counts as failed."""
        return self.round_timeout + self.allreduce_timeout + 30.0

    @property
    def state_download_timeout(self) -> float:
        """Seconds a state download from one donor may take."""
        return max(10.0, self.allreduce_timeout)

    def validate(self) -> None:
        from .codecs import CODECS

        _check_choice(self.compression, CODECS, "averaging.compression")
        _check(self.min_group_size >= 1, "averaging.min_group_size", "must be >= 1")
        _check(self.target_group_size >= self.min_group_size, "averaging.target_group_size",
               "must be >= averaging.min_group_size")
        _check(self.matchmaking_time > 0, "averaging.matchmaking_time", "must be > 0")
        _check(self.allreduce_timeout > 0, "averaging.allreduce_timeout", "must be > 0")
        _check(self.round_timeout > 0, "averaging.round_timeout", "must be > 0")
        _check(self.consensus_timeout > 0, "averaging.consensus_timeout", "must be > 0")
        _check(self.clip_factor >= 1, "averaging.clip_factor", "must be >= 1")
        _check(self.max_delta_norm_ratio > 1, "averaging.max_delta_norm_ratio", "must be > 1")


@dataclass(frozen=True, kw_only=True)
class DHTConfig:
    run_id: str = "p2p-photon"
    """Name of the run; peers of one run share it (DHT key prefix)."""
    initial_peers: tuple[str, ...] = ()
    """Multiaddrs of known peers (e.g. the bootstrap node's)."""
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    """Addresses to listen on (loopback by default: open it up explicitly)."""
    announce_maddrs: tuple[str, ...] = ()
    """Public addresses to announce (behind NAT / port forwarding)."""
    identity_path: str = ""
    """Private key file for a persistent peer ID (created if missing); '' = ephemeral."""
    client_mode: bool = False
    """Accept no incoming connections (behind NAT without port forwarding): the peer still trains and
    averages as a full member (it sends its parts of Δ and receives the averages, owning no slice),
    downloads state and publishes progress, but serves no state and leads no group."""
    reachability: str = "auto"
    """'auto': libp2p's AutoNAT finds out whether others can connect to us; 'public': they can (a peer
    with a public address or a forwarded port: it then also relays for peers behind NAT; the bootstrap
    node is public unless told otherwise); 'private': they cannot (implied by dht.auto_relay)."""
    auto_relay: bool = False
    """Behind NAT without port forwarding: become reachable through a public peer's libp2p circuit relay
    (the relays are dht.relays, or the initial peers if that is empty; public peers relay for others).
    The peer then averages like a public one, owning a slice, with its traffic through the relay; that
    is not measured yet: prefer dht.client_mode for training behind NAT."""
    relays: tuple[str, ...] = ()
    """Multiaddrs (with /p2p/<id>) of public peers to reserve a relay slot with when dht.auto_relay is
    on; empty = the initial peers."""
    startup_timeout: float = 60.0
    """Seconds to wait for the DHT daemon (p2pd) to start."""
    bootstrap_timeout: float = 30.0
    """Seconds to keep retrying unreachable initial peers before giving up."""
    members: str = ""
    """Closed swarm: a file of allowed peer IDs, one per line ('#' comments). Only members may
    publish accepted progress records, join averaging groups or serve state; requires identity_path
    (create one with `p2p-photon identity new`). '' = open swarm."""

    def validate(self) -> None:
        _check(bool(self.run_id) and self.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum(),
               "dht.run_id", "must be non-empty letters, digits, '-', '_' or '.'")
        _check(self.startup_timeout > 0, "dht.startup_timeout", "must be > 0")
        _check(self.bootstrap_timeout > 0, "dht.bootstrap_timeout", "must be > 0")
        _check(self.reachability in ("auto", "public", "private"), "dht.reachability",
               "must be 'auto', 'public' or 'private'")
        _check(not (self.auto_relay and self.reachability == "public"), "dht.auto_relay",
               "a peer behind NAT is not publicly reachable: leave dht.reachability at 'auto'")
        _check(not (self.auto_relay and self.client_mode), "dht.auto_relay",
               "a relayed peer accepts connections through its relay: turn dht.client_mode off")
        _check(not self.auto_relay or bool(self.relays or self.initial_peers), "dht.auto_relay",
               "needs a relay: set dht.relays or --initial-peers")
        _check(not self.members or bool(self.identity_path), "dht.members",
               "a closed swarm needs dht.identity_path (create one with `p2p-photon identity new PATH`)")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    """Directory for this peer's checkpoints."""
    every_rounds: int = 5
    """Write a checkpoint every K rounds (and always at shutdown); 0 = only at shutdown."""
    keep: int = 2
    """How many most recent checkpoints to keep."""
    export_hf: bool = False
    """Also write the global model in Hugging Face format to `<dir>/hf` after every checkpoint (what
    `p2p-photon export` writes; replaced atomically each time, so it is always one complete model)."""

    def validate(self) -> None:
        _check(self.every_rounds >= 0, "checkpoint.every_rounds", "must be >= 0")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level."""
    progress_interval: float = 2.0
    """Seconds between progress records published to the DHT."""
    eval_batches: int = 16
    """Held-out batches per evaluation."""
    eval_every_rounds: int = 5
    """Evaluate the global model on the held-out split (the run's public eval set) every K rounds, and
    at start and end (0 = only at start and end); the progress records carry the newest result to the
    monitor's `held-out ppl`."""
    record_steps: bool = False
    """Keep every local step's (round, global step, loss, lr) in the peer's --summary-out JSON."""
    progress_bar: bool = True
    """Show a progress bar for long local work (disabled automatically when not a TTY)."""

    def validate(self) -> None:
        _check(self.progress_interval > 0, "logging.progress_interval", "must be > 0")
        _check(self.eval_batches >= 1, "logging.eval_batches", "must be >= 1")
        _check(self.eval_every_rounds >= 0, "logging.eval_every_rounds", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    seed: int = 0
    """Seed of the model init (and of data order, combined with the silo)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    dht: DHTConfig = field(default_factory=DHTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**31, "seed", "must be in [0, 2**31)")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        _check(not (self.averaging.overlap and self.outer.block_cycle), "averaging.overlap",
               "overlapped rounds do not combine with outer.block_cycle yet; turn one of them off")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        """Shallow helper: Config.replace(inner=dict(lr=1e-3)) merges into sections."""
        return from_dict(_merge(self.to_dict(), sections))


# ----------------------------------------------------------------------------- loading


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only what is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"must be one of {', '.join(map(repr, choices))} (got {value!r})")
        return value
    if origin in (tuple, list):
        _check(isinstance(value, (list, tuple)), key, f"must be a list (got {type(value).__name__})")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"config: {key}: wrong type {type(value).__name__}")
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false (got {value!r})")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer (got {value!r})")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"must be a number (got {value!r})")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string (got {value!r})")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    _check(isinstance(data, dict), prefix or "config", "must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"config: unknown key '{where}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name in data:
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'inner.lr=3e-3' -> (['inner', 'lr'], 0.003). Values are parsed as TOML, else taken as strings."""
    if "=" not in text:
        raise ConfigError(f"config: override '{text}' must look like section.key=value (e.g. inner.lr=3e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config: override '{text}' has an empty key; use section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config: override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p} (check the path given to --config)")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {p} is not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML file (or defaults when path is None) and apply dotted overrides."""
    data = read_toml(path) if path else {}
    return from_dict(apply_overrides(data, list(overrides)))


def to_toml(cfg: Config) -> str:
    """Serialize a config back to TOML (the resolved config saved beside checkpoints)."""
    lines = [f"seed = {cfg.seed}"]
    for name, section in cfg.to_dict().items():
        if not isinstance(section, dict):
            continue
        lines.append(f"\n[{name}]")
        for k, v in section.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def fingerprint(cfg: Config, tokenizer_hash: str = "") -> str:
    """Hash of everything that must match across the peers of one run: the model, the
    tokenizer, the seed, the sequence length, the outer optimizer, the compression, the round
    target (peers that end rounds at different sample counts would disagree on when a round is
    over) and the run id."""
    must_match = {
        "run_id": cfg.dht.run_id,
        "seed": cfg.seed,
        "model": dataclasses.asdict(cfg.model),
        "vocab_size": cfg.data.vocab_size,
        "tokenizer": tokenizer_hash,
        "outer": {**cfg.outer.resolved(), "block_cycle": cfg.outer.block_cycle,
                  "block_order": cfg.outer.block_order},
        "compression": cfg.averaging.compression,
        "target_samples_per_round": cfg.rounds.target_samples_per_round,
    }
    blob = json.dumps(must_match, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
