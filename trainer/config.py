"""Typed configuration of the trainer: one dataclass per component, defaults from PAPER.md.

A run is described by one `Config` (data, model, pretrain, finetune, eval, runtime). It is loaded
at the entry point from an optional YAML file plus flags, passed down, and saved with every
checkpoint and every `runs` row (`asdict(cfg)` as JSON).
"""

from __future__ import annotations

import copy
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SAMPLE_MODES = ("windows", "every_prefix", "all_positions")
MODALITIES = ("both", "text", "image")
# "m2se": the multimodal encoder; "sasrec": the item-ID SASRec baseline (no features).
ARCHS = ("m2se", "sasrec")
AMP_MODES = ("auto", "bf16", "off")
POOL_ACTS = ("relu", "tanh")
# The model fields that define the network's shape: fine-tuning from a pre-trained run takes
# these from that run; the others (dropouts, the ID embedding's init) from the fine-tuning config.
ARCHITECTURE_FIELDS = (
    "arch",
    "hidden_size",
    "n_layers",
    "n_heads",
    "inner_size",
    "layer_norm_eps",
    "initializer_range",
    "pool_hidden",
    "pool_act",
    "n_experts",
    "modalities",
)


@dataclass
class DataConfig:
    """Which data a run reads."""

    # Dataset name in the warehouse (`items.dataset`).
    dataset: str = "ml-1m"
    # encoder_version of the text (and keyword) vectors; None = the latest present for the
    # dataset (model_versions.created_at).
    encoder_version: str | None = None
    # tagger_version of the image keywords; None = the latest present for the dataset.
    tagger_version: str | None = None
    # Warehouse snapshot to read; None = the latest at the start of the run (then recorded).
    snapshot: int | None = None
    # Items per user sequence fed to the encoder (the last [50]).
    max_len: int = 50
    # Vectors kept per item and modality (sentences / images) [10].
    max_slots: int = 10
    # Cold-start setting: this fraction of items (drawn with holdout_seed) is removed from every
    # train part, so the model never sees them; they stay candidates and valid / test targets
    # (subset "unseen"). 0 = off.
    holdout_items: float = 0.0
    # Seed of the held-out item draw (fixed across model seeds: every model sees the same split).
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_items < 1.0:
            raise ValueError(f"holdout_items={self.holdout_items} must be in [0, 1)")
        for name in ("max_len", "max_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.snapshot is not None and self.snapshot < 0:
            raise ValueError(f"data.snapshot={self.snapshot} must be >= 0")


@dataclass
class M2SEConfig:
    """The Multimodal Mixup Sequence Encoder (PAPER.md section 2)."""

    # "m2se", or "sasrec" (item-ID baseline: ID + position embeddings, the same Transformer,
    # dot-product softmax over all items; fine-tuning stage only).
    arch: str = "m2se"
    # Hidden size h of the adaptor outputs and the Transformer [64].
    hidden_size: int = 64
    # Transformer layers [2].
    n_layers: int = 2
    # Attention heads [2].
    n_heads: int = 2
    # Feed-forward inner size [256].
    inner_size: int = 256
    # Dropout on embeddings, attention outputs and feed-forward outputs [0.2]; None = by the
    # data's density (`data_dropout`, SASRec's default), resolved when a run starts.
    hidden_dropout: float | None = 0.2
    # Dropout on attention probabilities [0.2]; None as hidden_dropout.
    attn_dropout: float | None = 0.2
    # LayerNorm epsilon (RecBole / the original code use 1e-12).
    layer_norm_eps: float = 1e-12
    # Std of the normal init of linear and embedding weights (RecBole: 0.02).
    initializer_range: float = 0.02
    # M2SE only: std of the normal init of the fine-tuning item-ID embedding; None = the
    # initializer_range.
    id_init_std: float | None = None
    # Hidden units of the per-item attention pooler Linear(d, 64) -> act -> Linear(64, 1).
    pool_hidden: int = 64
    # Activation of the pooler: "relu" (the original's VanillaAttention) or "tanh".
    pool_act: str = "relu"
    # Experts of the MoE adaptor per modality [8].
    n_experts: int = 8
    # Dropout inside each expert, Linear -> Dropout -> LayerNorm [0.2].
    adaptor_dropout: float = 0.2
    # Item drop (pre-training only): p ~ U(0, item_drop_max) per batch; 0 switches it off [0.2].
    item_drop_max: float = 0.2
    # Complementary sequence mixup (pre-training only): p ~ U(0, mixup_max) per batch [0.5].
    mixup_max: float = 0.5
    # Mixup on/off (ablation "mixup off").
    mixup: bool = True
    # "both", or a single modality for the ablations "text only" / "image only".
    modalities: str = "both"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not one of {ARCHS}")
        if self.modalities not in MODALITIES:
            raise ValueError(f"modalities={self.modalities!r} is not one of {MODALITIES}")
        if self.pool_act not in POOL_ACTS:
            raise ValueError(f"pool_act={self.pool_act!r} is not one of {POOL_ACTS}")
        for name in (
            "hidden_size",
            "n_layers",
            "n_heads",
            "inner_size",
            "pool_hidden",
            "n_experts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}"
            )
        for name in (
            "item_drop_max",
            "mixup_max",
            "hidden_dropout",
            "attn_dropout",
            "adaptor_dropout",
        ):
            v = getattr(self, name)
            if v is None and name in ("hidden_dropout", "attn_dropout"):
                continue  # by the data (data_dropout)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1)")


@dataclass
class TrainConfig:
    """One training stage (pre-training or fine-tuning); `Config` holds one of each."""

    # Adam learning rate [pre-training 1e-3; M2SE fine-tuning None; SASRec 2e-3]. None = by the
    # batch (`batch_lr`: 1e-3 on Office, 4e-3 on ML-1M), resolved when the run sees its data.
    lr: float | None = 1e-3
    # Adam weight decay (L2, as RecBole's Adam) [0 in every stage of both architectures].
    weight_decay: float = 0.0
    # Targets (predicted next items) per optimizer step, in every sample mode: windows are
    # grouped until their targets reach it. None = by the dataset and stage (`auto_batch`):
    # 256 on a small dataset (Amazon Office: 150 steps an epoch), 2048 on a large one (ML-1M,
    # as RecBole there); M2SE's pre-training up to 8192.
    batch_size: int | None = None
    # Maximum epochs [300]: a safety cap; runs end by early stopping.
    max_epochs: int = 300
    # Time budget in seconds of training + validation (None = no limit): an epoch starts only
    # if, at the mean epoch time so far, it ends within the budget (the first always runs). The
    # best epoch is still chosen by validation.
    max_seconds: float | None = None
    # Early stopping: epochs without a better validation `valid_metric` before stopping
    # [fine-tuning 5; M2SE pre-training 3] (PAPER.md: 20; RecBole's SASRec: 10).
    patience: int = 10
    # Early stopping only: an epoch resets the patience only if its `valid_metric` beats the last
    # epoch that did by more than this fraction of it (Keras' min_delta, relative) [0: any better
    # score]. It never stops a run later; the best checkpoint is still the best epoch, and the lr
    # schedule still follows every better score. 0.001 measured (bench/stop_rule.py): the ML-1M
    # report's two runs stop after 83 epochs instead of 103, best validation NDCG@10 -0.5% at
    # most (docs/trainer.md, README Budget).
    min_delta: float = 0.0
    # Learning-rate decay on a plateau: after every `decay_patience` epochs in a row without a
    # better validation `valid_metric`, the lr is multiplied by `lr_decay` [1.0 = constant lr, as
    # PAPER.md, RecBole and M2SE pre-training; fine-tuning 0.5 after 2].
    lr_decay: float = 1.0
    decay_patience: int = 3
    # Metric watched for early stopping and best-checkpoint selection (the field's NDCG@10;
    # PAPER.md: Recall@20).
    valid_metric: str = "NDCG@10"
    # Gradient-norm clip [5].
    clip_norm: float = 5.0
    # Seed of every random draw (init, order, dropout, drop / mixup) [2020].
    seed: int = 2020
    # InfoNCE / softmax temperature tau [0.07].
    tau: float = 0.07
    # How train sequences become samples (trainer/data.py): "windows" = windows of max_len
    # items that predict their last `window_stride` positions, cut points re-drawn every epoch
    # (every target once per epoch, with >= max_len - window_stride + 1 items of context, and
    # a different context every epoch); "every_prefix" = one target per window (the paper's
    # samples, window_stride 1); "all_positions" = fixed non-overlapping windows (stride max_len).
    sample_mode: str = "windows"
    # Targets per window in "windows" mode (1..max_len) [50: one pass per max_len targets; on
    # ML-1M 2.8x cheaper epochs than 10 at the same validation NDCG@10 per epoch; a history
    # shorter than max_len + 1 is one window whatever the stride].
    window_stride: int = 50
    # Pre-training only: weight lambda of CMCL [0.01].
    cmcl_weight: float = 0.01
    # Pre-training only: CMCL on/off (ablation "CMCL off").
    cmcl: bool = True
    # Pre-training only: the image NIP term on/off (ablation "NIP-image off"; the image tower
    # then learns through CMCL only).
    nip_image: bool = True
    # Pre-training, all_positions only: rows of the CMCL similarity matrix per batch (random
    # target positions; the paper's batch has 1024 rows).
    cmcl_rows: int = 1024
    # Fine-tuning only: True = transductive (trainable item-ID embedding), False = inductive.
    transductive: bool = True
    # Logits of a softmax computed per block (bounded memory: rows per block = this // items).
    loss_block: int = 1 << 22

    def __post_init__(self) -> None:
        if self.sample_mode not in SAMPLE_MODES:
            raise ValueError(f"sample_mode={self.sample_mode!r} is not one of {SAMPLE_MODES}")
        for name in (
            "lr",
            "tau",
            "batch_size",
            "max_epochs",
            "loss_block",
            "cmcl_rows",
            "window_stride",
            "max_seconds",
            "decay_patience",
        ):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be > 0")
        if self.min_delta < 0:
            raise ValueError(f"min_delta={self.min_delta} must be >= 0")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay={self.lr_decay} must be in (0, 1]")


def auto_batch(n_targets: int, arch: str = "sasrec", stage: str = "finetune") -> int:
    """The default batch of a dataset with `n_targets` train targets per epoch.

    Fine-tuning (SASRec and M2SE): the power of two nearest to n_targets / 512, within
    [256, 2048] (Office 38.5k -> 256, ML-1M 982k -> 2048). An M2SE fine-tuning step computes
    every item's adapted features (~0.26 s of a 0.45 s step on ML-1M at 2048), yet 2048 beats
    8192 per second there (validation NDCG@10 0.081 after 442 s against 0.066 after 410 s,
    docs/trainer.md). M2SE pre-training, which adapts only a batch's own items: nearest to
    n_targets / 128 within [256, 8192] (ML-1M 8192)."""
    steps, cap = (128, 8192) if (arch, stage) == ("m2se", "pretrain") else (512, 2048)
    want = max(1, n_targets) / steps
    return int(min(cap, max(256, 2 ** round(math.log2(want)))))


BASE_LR, BASE_BATCH = 1e-3, 512


def batch_lr(batch: int) -> float:
    """M2SE's fine-tuning lr for a batch of `batch` targets: 1e-3 up to 512, then the linear
    scaling rule (lr in proportion to the batch): 4e-3 at 2048. Chosen on validation NDCG@10
    (docs/trainer.md): Office at 256, 1e-3 beat 2e-3 (0.0733 against 0.0715); ML-1M at 2048,
    4e-3 beat 2e-3 and 8e-3 after each of the first two epochs (0.077 / 0.101 against 0.067 /
    0.090 and 0.072 / 0.097)."""
    return BASE_LR * max(1.0, batch / BASE_BATCH)


def pretrain_defaults() -> TrainConfig:
    """PAPER.md section 3: Adam lr 1e-3, no weight decay. Pre-training stops when the
    validation ranking of the content-only model stops improving for 3 epochs: fine-tuning
    gains little from more (docs/trainer.md)."""
    return TrainConfig(lr=1e-3, weight_decay=0.0, patience=3)


def finetune_defaults() -> TrainConfig:
    """Adam with the lr of the batch (`batch_lr`: 1e-3 on Office, 4e-3 on ML-1M), no weight decay
    (PAPER.md: 1e-4 and 1e-3, whose ID embeddings barely move from their 0.02-std start within a
    CPU budget). The lr halves after every 2 epochs without a better validation score and a run
    stops after 5: against a constant lr with patience 10, the same or a better best validation
    NDCG@10 for both architectures on both datasets; SASRec stops 18% (Office) / 36% (ML-1M)
    sooner, M2SE gains 1.3% on Office and 2.3% on ML-1M, there for 5 more epochs (docs/trainer.md,
    bench/results/stop-rule.json)."""
    return TrainConfig(lr=None, weight_decay=0.0, lr_decay=0.5, decay_patience=2, patience=5)


@dataclass
class EvalConfig:
    """Full-ranking evaluation (PAPER.md section 5)."""

    # Cut-offs of Recall / NDCG / MRR.
    ks: tuple[int, ...] = (5, 10, 20, 50)
    # Remove the user's history items from the ranking (the paper does not; recorded).
    exclude_history: bool = False
    # Cold-start subset: test cases whose target has at most this many train interactions.
    cold_threshold: int = 5
    # Users scored per matrix product.
    user_batch: int = 512
    # Items scored per matrix product (bounded memory for millions of items).
    item_chunk: int = 65536

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks={self.ks} must be cut-offs >= 1")
        if self.cold_threshold < 0:
            raise ValueError(f"eval.cold_threshold={self.cold_threshold} must be >= 0")
        for name in ("user_batch", "item_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 1")


@dataclass
class RuntimeConfig:
    """Where and how a run executes; nothing here changes the numbers on one device."""

    # "auto" (cuda when available), "cpu", "cuda", "cuda:1"...
    device: str = "auto"
    # Mixed precision: "auto" = bf16 autocast on cuda only, "bf16" = also on CPU, "off".
    amp: str = "auto"
    # torch CPU threads; 0 keeps torch's default.
    threads: int = 0
    # Progress bars on stderr.
    progress: bool = True
    # Checkpoint root; None = <warehouse root>/checkpoints.
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp={self.amp!r} is not one of {AMP_MODES}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(
                f"runtime.device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps"
            )
        if self.threads < 0:
            raise ValueError(f"runtime.threads={self.threads} must be >= 0")


@dataclass
class Config:
    """Everything a run needs; saved with every checkpoint and `runs` row."""

    data: DataConfig = field(default_factory=DataConfig)
    model: M2SEConfig = field(default_factory=M2SEConfig)
    pretrain: TrainConfig = field(default_factory=pretrain_defaults)
    finetune: TrainConfig = field(default_factory=finetune_defaults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from nested dicts (YAML / JSON) on the defaults of the architecture they name
        (`model.arch`); an unknown section or key raises naming it."""
        return resolve([d])


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the field type `hint` (int, float, bool, str, X | None,
    tuple[X, ...]); a ValueError names the key, the value and the type. Other types pass."""

    def bad(expected: str) -> ValueError:
        return ValueError(f"config value {key}={value!r} is not {expected}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
            if len(inner) < len(args):
                return None
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad("a list")
        elem = args[0] if args else Any
        return tuple(_coerce(key, v.strip() if isinstance(v, str) else v, elem) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad("a bool (true / false)")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(value.strip()) if isinstance(value, str) else value
            if isinstance(number, float) and number.is_integer():
                return int(number)
        except (ValueError, OverflowError):
            pass
        raise bad("an int")
    if hint is float:
        try:
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                number = float(value)
                if math.isfinite(number):
                    return number
        except ValueError:
            pass
        raise bad("a finite float")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    return value


def _build(section_cls: type, current: Any, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in fields(section_cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section {where!r}; known: {sorted(names)}"
        )
    hints = typing.get_type_hints(section_cls)
    kw = asdict(current)
    for k, v in values.items():
        kw[k] = _coerce(f"{where}.{k}", v, hints.get(k, Any))
    try:
        return section_cls(**kw)
    except TypeError as e:  # a value of a type the checks cannot compare
        raise ValueError(f"config section {where!r}: {e}") from None
    except ValueError as e:  # "lr=0 must be > 0" -> "finetune.lr=0 must be > 0"
        msg = str(e)
        if msg.partition("=")[0] in names:
            raise ValueError(f"{where}.{msg}") from None
        raise


def merge(cfg: Config, d: dict[str, Any]) -> Config:
    """A copy of `cfg` with the nested values of `d` applied (validated by the dataclasses)."""
    sections = {f.name: f for f in fields(Config)}
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; known: {sorted(sections)}")
    out = copy.deepcopy(cfg)
    for name, values in d.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
        current = getattr(cfg, name)
        setattr(out, name, _build(type(current), current, values, name))
    return out


def parse_override(item: str) -> dict[str, Any]:
    """`section.key=value` (value parsed as YAML: numbers, true/false, null) -> nested dict."""
    import yaml

    key, eq, raw = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not eq or not dot or not section or not name.strip():
        raise ValueError(
            f"override {item!r} is not of the form section.key=value (e.g. pretrain.lr=0.001)"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    return {section: {name.strip(): value}}


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def config_from_json(text: str) -> Config:
    return Config.from_dict(json.loads(text))


# The SASRec paper's dropout (Kang & McAuley 2018, section 4.3): 0.2 on MovieLens-1M "due to
# its density", 0.5 on the sparse datasets. Measured here on ML-1M (validation NDCG@10 after 2
# epochs: 0.092 at 0.2, 0.075 at 0.5) and on Office (docs/trainer.md).
DENSE_DROPOUT, SPARSE_DROPOUT = 0.2, 0.5


def data_dropout(mean_train_length: float, max_len: int) -> float:
    """Dropout by density: users' train sequences fill the model's window on average (dense,
    ML-1M: 163 items for a window of 50) or not (sparse, Amazon Office: 9)."""
    return DENSE_DROPOUT if mean_train_length >= max_len else SPARSE_DROPOUT


# Each architecture's own defaults, applied over the dataclass defaults (which are M2SE's);
# docs/trainer.md gives the measurements behind them.
ARCH_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "m2se": {},
    "sasrec": {
        "model": {"hidden_dropout": None, "attn_dropout": None},  # data_dropout
        # lr 2e-3: best of {1e-3, 2e-3, 4e-3} on validation on both datasets (docs/trainer.md).
        "finetune": {"lr": 2e-3},
    },
}


def defaults(arch: str = "m2se") -> Config:
    """The default Config of architecture `arch`."""
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"model.arch={arch!r} is not one of {sorted(ARCH_DEFAULTS)}")
    return merge(merge(Config(), ARCH_DEFAULTS[arch]), {"model": {"arch": arch}})


def resolve(overrides: list[dict[str, Any]]) -> Config:
    """Overrides (YAML, --set, flags; later ones win) applied to the defaults of the
    architecture they select, so `model.arch=sasrec` alone gives SASRec's own defaults."""
    arch = "m2se"
    for d in overrides:
        model = (d or {}).get("model") or {}
        if isinstance(model, dict) and model.get("arch") is not None:
            arch = str(model["arch"])
    cfg = defaults(arch)
    for d in overrides:
        cfg = merge(cfg, d or {})
    return cfg
