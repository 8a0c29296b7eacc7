"""One trial's configuration: a frozen dataclass tree built once from a dict or YAML file.

Unknown keys and bad values raise ConfigError naming the field's dotted path
(e.g. ``optim.lr``); nothing downstream mutates the tree. The builder (``build``,
``coerce``) also builds the typed sections of a sweep spec, so both reject the same way.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainers.process.side_files import STORE_DIR
from trainers.errors import UserError, first_line

# The study's six expressions, in its table order.
DEFAULT_CLASSES = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
SOURCES = ("synthetic", "imagefolder", "fer2013", "rafdb", "affectnet")
SOURCES_WITH_SPLITS = ("fer2013", "rafdb", "affectnet")   # ship their own train/test partition
SOURCES_WITH_FACE_BOXES = ("affectnet",)                 # annotate a face box per image, cropped to first
SYNTHETIC_ATTRIBUTES = ("group", "occluded")   # the synthetic source's metadata.csv columns besides path, subject
METADATA_FILE = "metadata.csv"                 # an image folder's per-image subject and attributes
CLASS_COLUMN = "class"          # data.balance_by's pseudo-column: the image's class, not a metadata column
ALIGNERS = ("none", "mtcnn")
BEST_K = "best_k"               # tracking.log_model: log the models of the best k configurations per model
KEPT_MODELS_DIR = "kept-models"     # under train.checkpoint_dir: weights waiting for the sweep's decision
MODEL_NAMES = ("vit", "resnet50")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
DEVICES = ("auto", "cpu", "cuda")
# train.precision: auto (the default's choice: trainers/precision.py resolve_precision), autocast (fp32 weights,
# bf16 autocast on CUDA), bf16 (bf16 weights, fp32 master weights in the optimizer), fp32 (no autocast).
PRECISIONS = ("auto", "autocast", "bf16", "fp32")
# The train.precision values that compute as every trial did before the option: config_hash leaves them out and
# the report counts runs logged with them as replicates of runs logged before it.
PRECISIONS_AS_BEFORE = ("auto", "autocast")
# Seeds (train.seed, data.split_seed, data.synthetic.seed and a spec's seeds) are 0 ... 2^64 - 1: numpy's
# generators refuse a negative seed and torch.manual_seed one past 2^64 - 1, each only once a trial runs.
MAX_SEED = 2**64 - 1
# Input size bounds: one image at 1024 px is 1024^2 x 3 bytes = 3 MB in the prepared cache and 12 MB as
# a float32 tensor (a batch of 256: 3.2 GB before the model's activations); 16 px is the smallest patch.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or impossible: ``field`` names it, ``why`` says what to do."""

    def __init__(self, source: str, field: str, why: str, text: str | None = None):
        # field: the dotted field (optim.lr, data.classes[2]); '' when the whole file is at fault.
        # text: the message when it is not '<source>: <field> <why>'.
        self.source, self.field, self.why = source, field, why
        super().__init__(text or (f"{source}: {field} {why}" if field else f"{source}: {why}"))


@dataclass(frozen=True)
class SyntheticConfig:
    n_images: int = 2400          # total images drawn, split by the study's Table 1 proportions
    seed: int = 0                 # the drawing seed (identities, poses, expressions)
    variant: str = "train"        # "train" or "production" (shifted group mix, more occlusion)
    draw_size: int = 64           # pixels of the stored PNGs; the cache resizes to the model's input


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    root: str | None = None       # dataset folder; ignored by the synthetic source
    classes: tuple[str, ...] = DEFAULT_CLASSES
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)   # train / val / test
    split_seed: int = 0
    align: str = "none"
    # mtcnn: face-box fraction added on each side of the landmark template (0: the tight
    # ArcFace crop, eyebrows to lower lip; 0.1 also shows the forehead and chin).
    align_margin: float = 0.1
    use_dataset_split: bool = False   # fer2013 / rafdb / affectnet: keep the dataset's own split
    duplicate_distance: int = 16      # near-duplicate: 256-bit perceptual hashes differ in <= 16 bits
    dedupe: bool = False              # remove val/test images that near-duplicate an earlier split's
    cache_dir: str = str(STORE_DIR / "cache")
    balance: bool = True          # augment the training split per cell (balance_by) towards the largest cell
    balance_max_factor: float = 3.0   # a cell grows to at most 3x its own size, so some imbalance stays
    # The columns whose value combinations are balanced: "class" and/or metadata.csv attributes
    # (e.g. [class, group]: every class x group cell grows towards the largest cell).
    balance_by: tuple[str, ...] = ("class",)
    synthetic: SyntheticConfig = SyntheticConfig()


@dataclass(frozen=True)
class ViTArchConfig:
    """An explicit (small) ViT shape, used when no pretrained checkpoint is named."""
    patch_size: int = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit"
    # vit: a hub id or a local folder; resnet50: a torchvision weights name
    # (e.g. IMAGENET1K_V2) or a local state-dict file. None: random init.
    pretrained: str | None = None
    image_size: int = 224
    vit: ViTArchConfig = ViTArchConfig()
    # true: torch.compile of the whole model; blocks: each repeated block compiled once and reused (a ViT's
    # encoder layer; ResNet-50 compiles whole: trainers/models.py compile_model).
    compile: typing.Literal[False, True, "blocks"] = False


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    # The study's rule: if validation macro F1 fell by more than 10% relative to
    # the previous epoch, multiply the learning rate by 0.8.
    lr_drop_threshold: float = 0.10
    lr_drop_factor: float = 0.8


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 256
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str = str(STORE_DIR / "checkpoints")
    num_threads: int = 0          # CPU threads for torch; 0 leaves torch's default
    deterministic: bool = False   # torch deterministic algorithms: bit-exact on CUDA too, somewhat slower
    precision: str = "auto"       # one of PRECISIONS


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of the training rows beyond the balance copies' flips, crops and colour jitter."""
    # Probability that a training image gets one occluder (a hand, a caption bar or an erased box over
    # 10-35% of the face, trainers/augment.py), drawn anew each epoch; 0 draws nothing.
    occlusion: float = 0.0


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None        # None: $MLFLOW_TRACKING_URI, else sqlite under mlruns/
    experiment: str = "fer-trials"
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # true: every finished trial logs its model; false: none does; best_k (in a sweep): a finished trial keeps
    # its weights (kept_models_dir) and the sweep, once complete, logs the models of the best_k best
    # configurations per model (a ViT-B/16 model is ~330 MB: the study's 15 trials would write ~5 GB). A lone
    # trial (no parent run) has no sweep to wait for: best_k logs its model at once.
    log_model: typing.Literal[True, False, "best_k"] = True
    best_k: int = 1

    @property
    def defers_model(self) -> bool:
        """log_model: best_k in a sweep: the sweep decides at its end whether this trial's model is logged."""
        return self.log_model == BEST_K and self.parent_run_id is not None

    @property
    def logs_model_now(self) -> bool:
        """Whether a finished trial logs its model when it ends (log_model true, or best_k outside a sweep)."""
        return self.log_model is True or (self.log_model == BEST_K and self.parent_run_id is None)


@dataclass(frozen=True)
class TrialConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    tracking: TrackingConfig = TrackingConfig()


# --- reading YAML ---------------------------------------------------------------------

# An alias (*a) stands for its anchor's whole value, so nine lines of nine aliases each stand for
# 9^9 ~ 3.9e8 values: a file under 1 KB (an "alias bomb") that takes gigabytes and minutes once anything
# walks or prints it. A spec or config as written holds hundreds of values (a 10^4-point grid written
# out: ~10^4), so a document holding more than 10^6 once its aliases are expanded is refused unbuilt.
MAX_YAML_VALUES = 1_000_000
# The composer recurses once per level, so a few hundred levels overflow Python's stack (a RecursionError,
# not a YAML error); configs nest ~4 levels.
MAX_YAML_DEPTH = 100


class YAMLLimitError(yaml.MarkedYAMLError):
    """A document past one of LimitedLoader's limits; ``problem`` says which and what to do."""


class LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only) that refuses, naming the line, an alias bomb, nesting past
    MAX_YAML_DEPTH and a value Python cannot read (a 5,000-digit integer, the date 2024-13-45)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(problem=f"nests more than {MAX_YAML_DEPTH} levels deep",
                                     problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node):
        past = _node_past(node, MAX_YAML_VALUES)
        if past is not None:
            raise YAMLLimitError(problem=f"this value holds more than {MAX_YAML_VALUES:,} values once its "
                                         "aliases (*name) are expanded, as a YAML alias bomb does; use aliases "
                                         "for small repeated parts only", problem_mark=past.start_mark)
        return super().construct_document(node)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except ValueError as err:    # int() past 4,300 digits, datetime() of a 13th month: not YAML errors
            kind = node.tag.rpartition(":")[2]
            raise YAMLLimitError(problem=f"cannot be read as {kind}: {first_line(err).partition(':')[0]}",
                                 problem_mark=node.start_mark) from None


def limited_load(text: str, loader_class: type[LimitedLoader] | None = None):
    """One YAML document through LimitedLoader (or a subclass): plain data only, within its limits
    (YAMLLimitError)."""
    loader = (loader_class or LimitedLoader)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _node_past(root: yaml.Node, limit: int) -> yaml.Node | None:
    """The first node (the innermost) that holds more than ``limit`` values with its aliases expanded, each
    scalar, list, mapping and key counting one, else None; a value that contains itself holds endlessly
    many. Each distinct node is counted once: time linear in the text, however far the aliases expand."""
    sizes: dict[int, int] = {}
    past: list[yaml.Node] = []

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = limit + 1      # while it is counted: an alias to it from inside repeats it endlessly
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else ()
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        if total > limit and not past:
            past.append(node)
        sizes[id(node)] = min(total, limit + 1)
        return sizes[id(node)]
    size(root)
    return past[0] if past else None


# --- building -------------------------------------------------------------------------

def from_dict(raw: dict | None, source: str = "config") -> TrialConfig:
    """Build and validate a TrialConfig; ``source`` names the file in error messages."""
    cfg = build(TrialConfig, raw or {}, "", source)
    validate(cfg, source)
    return cfg


def from_yaml(path: str | Path) -> TrialConfig:
    """Read a YAML file (LimitedLoader: plain data only) into a validated TrialConfig."""
    path = Path(path)
    try:
        raw = limited_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except YAMLLimitError as err:
        raise ConfigError(str(path), "", f"is refused ({_yaml_where(err)})") from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", f"not valid YAML ({_yaml_where(err)})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(str(path), "", f"expected a mapping at the top level, got {type(raw).__name__}")
    return from_dict(raw, str(path))


def _yaml_where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """typing.get_type_hints of a config dataclass, read once per class (it compiles each string annotation
    on every call: ~200 us for TrialConfig, paid by every with_value a sweep plan makes). Shared: read only."""
    return typing.get_type_hints(cls)


def build(cls: type, raw: Any, prefix: str, source: str):
    """The dataclass ``cls`` from a plain mapping; fields are named ``<prefix><name>`` in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip(".") or "config", f"must be a mapping, got {describe(raw)}")
    hints = field_types(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise _unknown_key(cls, unknown[0], prefix, source)
    values = {}
    for name, value in raw.items():
        values[name] = coerce(hints[name], value, f"{prefix}{name}", source)
    return cls(**values)


def _unknown_key(cls: type, key: Any, prefix: str, source: str) -> ConfigError:
    names = sorted(f.name for f in dataclasses.fields(cls))
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    allowed = ", ".join(names)
    key = short_list([str(key)])      # a hostile key is cut like any value
    return ConfigError(source, f"{prefix}{key}", f"is not a known field; {hint}allowed here: {allowed}",
                       text=f"{source}: unknown key '{prefix}{key}' (allowed here: {allowed})")


def coerce(tp: Any, value: Any, path: str, source: str):
    """``value`` as type ``tp`` (a dataclass is built, a list becomes a tuple); errors name ``path``."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path + ".", source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, path, source)
    if origin is typing.Literal:        # bool and str values compared by type too: 1 is not true
        if not any(type(value) is type(a) and value == a for a in args):
            shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
            raise ConfigError(source, path, f"must be one of {shown}; got {describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, path, f"must be a list, got {describe(value)}")
        return tuple(coerce(args[0], v, f"{path}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"must be a mapping, got {describe(value)}")
        return {str(k): str(v) for k, v in value.items()}
    return _scalar(tp, value, path, source)


def _scalar(tp: Any, value: Any, path: str, source: str):
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(source, path, f"must be true or false, got {describe(value)}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(source, path, f"must be an integer, got {describe(value)}")
    if tp is float:
        # YAML 1.1 reads "1e-3" as a string; accept numeric strings for floats.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(source, path, f"must be a number, got {short_repr(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, path, f"must be a number, got {describe(value)}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ConfigError(source, path, f"must be a string, got {describe(value)}")
    return value


def describe(value: Any) -> str:
    """A value as error messages show it: int 5, str 'x', nothing (null)."""
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {short_repr(value)}"


# An error message shows at most this many characters of a value, enough to recognise it. reprlib stops
# at 20 items a level and 3 levels, so a list that YAML aliases repeat 10^8 times is cut as it is written,
# never written whole first (~1 ms, where repr takes minutes and gigabytes).
SHOWN_CHARS = 200
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, SHOWN_CHARS, SHOWN_CHARS, SHOWN_CHARS
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 20


def short_repr(value: Any) -> str:
    """repr(value) for an error message: at most SHOWN_CHARS characters, however large the value."""
    return _cut(_SHORT.repr(value))


def short_list(values: tuple | list) -> str:
    """Values as a message lists them, 'vit, resnet50' (text unquoted), at most SHOWN_CHARS characters."""
    return _cut(", ".join(v[:SHOWN_CHARS] if isinstance(v, str) else short_repr(v) for v in values[:SHOWN_CHARS]))


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def with_value(cfg: Any, path: str, value: Any, source: str, prefix: str = ""):
    """``cfg`` with the dotted field ``path`` set to ``value`` through the builder; a mapping merges into a section."""
    head, _, rest = path.partition(".")
    hints = field_types(type(cfg))
    if head not in hints:
        raise _unknown_key(type(cfg), head, prefix, source)
    current, name = getattr(cfg, head), f"{prefix}{head}"
    if rest and dataclasses.is_dataclass(current):
        new = with_value(current, rest, value, source, name + ".")
    elif rest:
        raise ConfigError(source, f"{name}.{rest}", f"is not a field: {name} is a single value")
    else:
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = merge(to_dict(current), value)     # as a deep merge of the plain dicts did
        new = coerce(hints[head], value, name, source)
    return dataclasses.replace(cfg, **{head: new})


def with_tracking(cfg: TrialConfig, tracking: TrackingConfig, num_threads: int | None = None) -> TrialConfig:
    """The trial as one run logs it: the sweep's tracking settings and, when given, the slot's CPU threads."""
    train = cfg.train if num_threads is None else dataclasses.replace(cfg.train, num_threads=num_threads)
    return dataclasses.replace(cfg, tracking=tracking, train=train)


# --- validation -----------------------------------------------------------------------

def validate(cfg: TrialConfig, source: str = "config") -> None:
    """Reject impossible values; every error names the field."""
    for section, check in SECTION_VALIDATORS.items():
        check(getattr(cfg, section), source)


def _one_of(source: str, path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(source, path, f"must be one of {', '.join(allowed)}; got {short_repr(value)}")


def validate_data(d: DataConfig, source: str) -> None:
    """The data section (fields named data.*), its split and its synthetic settings."""
    _one_of(source, "data.source", d.source, SOURCES)
    _one_of(source, "data.align", d.align, ALIGNERS)
    if d.source != "synthetic" and not d.root:
        raise ConfigError(source, "data.root",
                          f"is required for source '{d.source}' (the folder holding the dataset)")
    if not 0 <= d.align_margin <= 1:
        raise ConfigError(source, "data.align_margin",
                          f"must be in [0, 1] (a fraction of the face box); got {d.align_margin:g}")
    if d.use_dataset_split and d.source not in SOURCES_WITH_SPLITS:
        raise ConfigError(source, "data.use_dataset_split", f"needs a source with its own split "
                          f"({', '.join(SOURCES_WITH_SPLITS)}); data.source is '{d.source}'")
    if not 0 <= d.duplicate_distance <= 64:
        raise ConfigError(source, "data.duplicate_distance",
                          f"must be in [0, 64] bits of 256; got {short_repr(d.duplicate_distance)}")
    if len(d.classes) < 2:
        raise ConfigError(source, "data.classes", "needs at least two classes")
    lowered = [c.lower() for c in d.classes]
    if len(set(lowered)) != len(lowered):
        dup = next(c for c in lowered if lowered.count(c) > 1)
        raise ConfigError(source, "data.classes", f"lists {short_repr(dup)} more than once")
    if d.balance_max_factor < 1:
        raise ConfigError(source, "data.balance_max_factor", f"must be at least 1; got {d.balance_max_factor:g}")
    _validate_balance_by(d, source)
    _validate_split(d.split, source)
    check_seed(source, "data.split_seed", d.split_seed)
    if d.split[2] == 0 and not d.use_dataset_split:
        raise ConfigError(source, "data.split", "gives the test split no images (its ratio is 0), so no test "
                          "metric could be computed; give test a share, e.g. [0.7, 0.2, 0.1]")
    _validate_synthetic(d.synthetic, source)


def _validate_split(split: tuple[float, ...], source: str) -> None:
    if len(split) != 3:
        raise ConfigError(source, "data.split", "must have three ratios: train, val, test")
    if any(r < 0 for r in split):
        raise ConfigError(source, "data.split", f"ratios must not be negative; got {list(split)}")
    if split[0] <= 0 or split[1] <= 0:
        raise ConfigError(source, "data.split", "needs a positive train and val ratio")
    if not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        raise ConfigError(source, "data.split", f"ratios must sum to 1; got {sum(split):g}")


def _validate_balance_by(d: DataConfig, source: str) -> None:
    """data.balance_by: distinct columns, each 'class' or one the source's metadata has (when known now)."""
    path = "data.balance_by"
    if not d.balance_by:
        raise ConfigError(source, path, "must name at least one column, e.g. [class] or [class, group]")
    repeated = next((c for c in d.balance_by if d.balance_by.count(c) > 1), None)
    if repeated:
        raise ConfigError(source, path, f"lists {short_repr(repeated)} more than once")
    if "subject" in d.balance_by:
        # The split keeps each subject in one split, so per-subject cells would only even out the
        # training identities (hundreds of cells), not the attribute mix the test and production see.
        raise ConfigError(source, path, "cannot use 'subject': it is the identity the split groups by, not an "
                          "attribute to balance; name attribute columns such as group")
    columns = _metadata_columns(d)
    unknown = [c for c in d.balance_by if c != CLASS_COLUMN and columns is not None and c not in columns]
    if unknown:
        known = ", ".join((CLASS_COLUMN, *columns))
        raise ConfigError(source, path, f"names {short_repr(unknown[0])}, which is not a column of "
                          f"{_columns_origin(d)}; choose from: {known}")


def _metadata_columns(d: DataConfig) -> tuple[str, ...] | None:
    """The attribute columns the data's images carry, or None when they are not known before reading it."""
    if d.source == "synthetic":
        return SYNTHETIC_ATTRIBUTES
    root = Path(d.root).expanduser() if d.source == "imagefolder" and d.root else None
    if root is None or not root.is_dir() or all(c == CLASS_COLUMN for c in d.balance_by):
        return None          # prepare_data checks the columns against the images it lists
    try:
        with open(root / METADATA_FILE, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except FileNotFoundError:
        return ()
    except OSError:
        return None          # unreadable now: prepare_data reads it (or says why it cannot)
    return tuple(name.strip() for name in header if name.strip() not in ("path", "subject", ""))


def _columns_origin(d: DataConfig) -> str:
    """Where the columns come from, as an error names it."""
    if d.source == "synthetic":
        return "the synthetic source's metadata"
    csv_path = Path(d.root).expanduser() / METADATA_FILE
    if not csv_path.is_file():
        return f"{csv_path} (no such file: add one with path, subject and attribute columns)"
    return str(csv_path)


def check_seed(source: str, path: str, seed: int) -> None:
    """A seed (the field at path) must be in 0 ... MAX_SEED: numpy and torch refuse a negative one."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(source, path, f"must be a seed from 0 to 2^64 - 1 (numpy and torch refuse others); "
                                        f"got {short_repr(seed)}")


def _validate_synthetic(s: SyntheticConfig, source: str) -> None:
    check_seed(source, "data.synthetic.seed", s.seed)
    _one_of(source, "data.synthetic.variant", s.variant, ("train", "production"))
    if s.n_images < 60:
        raise ConfigError(source, "data.synthetic.n_images",
                          f"must be at least 60 (10 per class); got {short_repr(s.n_images)}")
    if not 32 <= s.draw_size <= MAX_IMAGE_SIZE:
        raise ConfigError(source, "data.synthetic.draw_size", f"must be 32 to {MAX_IMAGE_SIZE} pixels (an image "
                          f"takes size x size x 3 bytes, 3 MB at 1024); got {short_repr(s.draw_size)}")


def validate_model(m: ModelConfig, source: str) -> None:
    """The model section (fields named model.*); an explicit ViT shape must fit the image size."""
    _one_of(source, "model.name", m.name, MODEL_NAMES)
    if not MIN_IMAGE_SIZE <= m.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(source, "model.image_size", f"must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, as "
                          "each image takes size x size x 3 bytes in the cache and 4 times that in a batch "
                          f"(3 MB and 12 MB at 1024); got {short_repr(m.image_size)}")
    if m.name != "vit" or m.pretrained is not None:
        return
    a = m.vit
    if a.patch_size <= 0 or m.image_size % a.patch_size:
        raise ConfigError(source, "model.vit.patch_size",
                          f"must divide model.image_size ({m.image_size}); got {short_repr(a.patch_size)}")
    if a.hidden_size <= 0 or a.num_attention_heads <= 0 or a.hidden_size % a.num_attention_heads:
        raise ConfigError(source, "model.vit.num_attention_heads",
                          f"must divide model.vit.hidden_size ({short_repr(a.hidden_size)}); "
                          f"got {short_repr(a.num_attention_heads)}")
    if a.num_hidden_layers <= 0 or a.intermediate_size <= 0:
        raise ConfigError(source, "model.vit.num_hidden_layers", "and intermediate_size must be positive")


def validate_optim(o: OptimConfig, source: str) -> None:
    """The optimizer section (fields named optim.*)."""
    _one_of(source, "optim.name", o.name, OPTIMIZERS)
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(source, "optim.lr", f"must be a positive number; got {o.lr:g}")
    if o.momentum < 0 or o.momentum >= 1:
        raise ConfigError(source, "optim.momentum", f"must be in [0, 1); got {o.momentum:g}")
    if o.weight_decay < 0:
        raise ConfigError(source, "optim.weight_decay", f"must not be negative; got {o.weight_decay:g}")
    if not 0 <= o.lr_drop_threshold < 1:
        raise ConfigError(source, "optim.lr_drop_threshold", f"must be in [0, 1); got {o.lr_drop_threshold:g}")
    if not 0 < o.lr_drop_factor <= 1:
        raise ConfigError(source, "optim.lr_drop_factor", f"must be in (0, 1]; got {o.lr_drop_factor:g}")


def validate_train(t: TrainConfig, source: str) -> None:
    """The training section (fields named train.*)."""
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(t, name) < 1:
            raise ConfigError(source, f"train.{name}", f"must be at least 1; got {short_repr(getattr(t, name))}")
    _one_of(source, "train.device", t.device, DEVICES)
    check_seed(source, "train.seed", t.seed)
    if t.num_threads < 0:
        raise ConfigError(source, "train.num_threads", f"must not be negative; got {short_repr(t.num_threads)}")
    _one_of(source, "train.precision", t.precision, PRECISIONS)


def validate_augment(a: AugmentConfig, source: str) -> None:
    """The augmentation section (fields named augment.*)."""
    if not 0 <= a.occlusion <= 1:      # also rejects NaN
        raise ConfigError(source, "augment.occlusion", f"must be a probability in [0, 1] (the share of training "
                          f"images that get an occluder); got {a.occlusion:g}")


def validate_tracking(t: TrackingConfig, source: str) -> None:
    """The tracking section (fields named tracking.*): log_model's type is checked by the builder."""
    if t.best_k < 1:
        raise ConfigError(source, "tracking.best_k", f"must be at least 1 (how many configurations per model keep "
                          f"their model with log_model: best_k); got {short_repr(t.best_k)}")


# --- derived values -------------------------------------------------------------------

# Each section's validator, in the order validate runs them. Each reads its own section alone, so a plan
# validates each distinct section once (orchestrator/sweep/plan.py TrialBuilder); a check that needs two
# sections would have to be added there too.
SECTION_VALIDATORS = {"data": validate_data, "model": validate_model, "optim": validate_optim,
                      "train": validate_train, "augment": validate_augment, "tracking": validate_tracking}


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-friendly data (tuples become lists)."""
    def plain(v):
        if isinstance(v, (str, int, float, type(None))):     # most leaves: skip the slower checks below
            return v
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def flat_params(cfg: TrialConfig | DataConfig) -> dict[str, str]:
    """Flat ``section.key`` params for MLflow, the same names for every model."""
    out: dict[str, str] = {}

    def walk(prefix: str, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            out[prefix] = ",".join(map(str, v)) if isinstance(v, list) else str(v)

    walk("", {k: v for k, v in to_dict(cfg).items() if k != "tracking"})
    return out


def inapplicable_params(params: dict[str, str]) -> set[str]:
    """The flat params (flat_params) that cannot change this trial: the ViT's shape on another model, the
    align margin without alignment, the balance settings without balancing, the synthetic
    source's settings for another source. A run logs none of them, so MLflow's Compare shows what differs."""
    out = set()
    if params.get("model.name") != "vit":
        out |= {k for k in params if k.startswith("model.vit.")}
    if params.get("data.align") == "none":
        out.add("data.align_margin")
    if params.get("data.balance") == "False":
        out |= {"data.balance_max_factor", "data.balance_by"}
    if params.get("data.source") != "synthetic":
        out |= {k for k in params if k.startswith("data.synthetic.")}
    return out & set(params)


def applicable_params(cfg: TrialConfig) -> dict[str, str]:
    """flat_params without the inapplicable ones: what a trial's run logs as its params."""
    params = flat_params(cfg)
    dropped = inapplicable_params(params)
    return {k: v for k, v in params.items() if k not in dropped}


def config_hash(cfg: TrialConfig) -> str:
    """Stable 12-hex hash of what determines a trial's result (tracking and device excluded)."""
    return hash_of_pieces([hash_piece(name, getattr(cfg, name)) for name in HASHED_SECTIONS])


# The sections config_hash covers (tracking never changes a result), in the sorted order of the JSON keys.
HASHED_SECTIONS = ("augment", "data", "model", "optim", "train")


def hash_piece(section: str, value: Any) -> str:
    """One section's share of config_hash: '"<section>":<its JSON>', or '' when it is left out (augment at
    its defaults). It depends on that section alone, so a plan works it out once per section value."""
    body = to_dict(value)
    if section == "train":
        for key in ("device", "checkpoint_dir", "num_threads"):
            body.pop(key)
        if not body["deterministic"]:      # hashes from before the option existed still match
            body.pop("deterministic")
        if body["precision"] in PRECISIONS_AS_BEFORE:
            body.pop("precision")
    elif section == "data":
        body.pop("cache_dir")
        _drop_inert_data_keys(body)
    elif section == "augment":
        body = _non_default_keys(body, AugmentConfig())
        if not body:
            return ""
    return f'"{section}":{json.dumps(body, sort_keys=True, separators=(",", ":"))}'


def hash_of_pieces(pieces: list[str]) -> str:
    """config_hash from the sections' hash_piece texts, in HASHED_SECTIONS order: the text is the one
    json.dumps(sort_keys=True) gives for {section: body, ...}, hashed."""
    text = "{" + ",".join(filter(None, pieces)) + "}"      # '' pieces: sections left out
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_dir(cfg: TrialConfig) -> Path:
    """Checkpoint folder of this exact config (hash), shared by every retry of it."""
    return Path(cfg.train.checkpoint_dir) / config_hash(cfg)


def kept_models_dir(checkpoint_dir: str, sweep: str) -> Path:
    """Where a sweep's finished trials keep their final weights under log_model: best_k, <run id>.pt each,
    until the sweep decides which of them to log (orchestrator/results/kept_models.py)."""
    return Path(checkpoint_dir) / KEPT_MODELS_DIR / sweep


DATA_DEFAULTS = to_dict(DataConfig())     # read, never changed: _drop_inert_data_keys compares with it


def _drop_inert_data_keys(data: dict) -> None:
    """Leave out data keys that cannot change this trial, so hashes from before they existed still match."""
    if data["align"] == "none":
        data.pop("align_margin")
    for key in ("use_dataset_split", "duplicate_distance", "dedupe"):
        if data[key] == DATA_DEFAULTS[key]:
            data.pop(key)
    if not data.get("dedupe"):
        data.pop("duplicate_distance", None)   # the audit only counts unless dedupe removes
    if data["balance_by"] == DATA_DEFAULTS["balance_by"] or not data["balance"]:
        data.pop("balance_by")


def _non_default_keys(body: dict, defaults: Any) -> dict:
    """A section's keys not at their defaults: a section (or key) added later, left out while at its
    defaults, keeps the hashes of the trials from before it existed."""
    return {k: v for k, v in body.items() if v != getattr(defaults, k)}


NAME_SEPARATOR = "·"


def short_number(x: float) -> str:
    """A number as a name shows it, to 3 significant digits: 1e-3, 3e-5, 3.16e-4, 0.5, 1e12."""
    if x == 0 or 0.1 <= abs(x) < 1000:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def name_parts(cfg: TrialConfig, axes: tuple[str, ...] = ()) -> dict[str, str]:
    """The parts of a trial's run name, in their standing order: epochs, optimizer, lr, model, the
    mitigation parts when they differ from the default (training balanced over other cells than the
    classes, augment.occlusion on), then one part per other grid axis named in `axes` (its last key and
    value: batch_size64, image_size112), seed."""
    return join_name_parts({name: section_name_parts(name, getattr(cfg, name), axes) for name in NAMED_SECTIONS},
                           axes)


# The sections a name reads, and the section of each standing part, in the standing order.
NAMED_SECTIONS = ("data", "model", "optim", "train", "augment", "tracking")
STANDING_PARTS = {"epochs": "train", "optimizer": "optim", "lr": "optim", "model": "model", "balance": "data",
                  "occlusion": "augment"}


def section_name_parts(section: str, value: Any, axes: tuple[str, ...] = ()) -> dict[str, str]:
    """The name parts (name_parts) one section gives, empty ones too: they depend on that section alone,
    so a plan works them out once per section value."""
    if section == "train":
        parts = {"epochs": f"ep{value.epochs}", "seed": f"s{value.seed}"}
    elif section == "optim":
        parts = {"optimizer": value.name, "lr": short_number(value.lr)}
    elif section == "model":
        parts = {"model": value.name}
    elif section == "data":
        balanced = value.balance and tuple(value.balance_by) != DataConfig.balance_by    # the field's default
        parts = {"balance": f"by{'+'.join(value.balance_by)}" if balanced else ""}
    elif section == "augment":
        parts = {"occlusion": f"occ{value.occlusion:g}" if value.occlusion else ""}
    else:                       # tracking: only an axis in it would give a part
        parts = {}
    for axis in axes:
        head, _, rest = axis.partition(".")
        if head != section or axis in NAMED_AXES or axis == "train.seed":
            continue
        found = value_at(value, rest) if rest else value
        if found is not None:
            parts[axis] = f"{axis.rsplit('.', 1)[-1]}{_name_value(found)}"
    return parts


def join_name_parts(pieces: dict[str, dict[str, str]], axes: tuple[str, ...] = ()) -> dict[str, str]:
    """name_parts from each section's section_name_parts: the standing parts, the axes' parts, the seed,
    in that order, the empty ones left out."""
    parts = {}
    for key, section in STANDING_PARTS.items():
        if pieces[section][key]:
            parts[key] = pieces[section][key]
    for axis in axes:
        part = pieces.get(axis.partition(".")[0], {}).get(axis)
        if part:
            parts[axis] = part
    parts["seed"] = pieces["train"]["seed"]
    return parts


# The grid axes name_parts always names, and the part each gives.
NAMED_AXES = {"model": "model", "model.name": "model", "train.epochs": "epochs", "optim.name": "optimizer",
              "optim.lr": "lr", "data.balance": "balance", "data.balance_by": "balance",
              "augment.occlusion": "occlusion"}


def leading_parts(axes: tuple[str, ...]) -> tuple[str, ...]:
    """The name parts that grid (or search) axes put first, in the axes' order; a learning rate reads with
    its optimizer before it (adam·2e-5) when the optimizer is not an axis itself."""
    named = [NAMED_AXES.get(a, a) for a in axes]
    parts = []
    for part in named:
        parts += ["optimizer", "lr"] if part == "lr" and "optimizer" not in named else [part]
    return tuple(dict.fromkeys(parts))


def value_at(cfg: TrialConfig, path: str):
    """The config's value at a dotted path (model.vit.patch_size); None where there is none."""
    value = cfg
    for key in path.split("."):
        value = getattr(value, key, None)
    return value


def _name_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return short_number(value)
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value))
    return str(value)


def trial_name(cfg: TrialConfig, first: tuple[str, ...] = (), axes: tuple[str, ...] = ()) -> str:
    """Readable run name, the parts joined by '·': ep3·adam·1e-3·vit·s0, or ep3·adam·1e-3·vit·bygroup·occ0.5·s0.
    The parts named in `first` (those that vary across a plan; see plan.unique_trials) come first, the
    seed always last, so names MLflow's runs table cuts at ~16 characters still tell trials apart."""
    return name_from_parts(name_parts(cfg, axes), first)


def name_from_parts(parts: dict[str, str], first: tuple[str, ...] = ()) -> str:
    """trial_name from a trial's name_parts: the parts in `first` first, the rest in order, the seed last."""
    ordered = [parts[k] for k in first if k in parts and k != "seed"]
    ordered += [v for k, v in parts.items() if k not in first and k != "seed"]
    return NAME_SEPARATOR.join([*ordered, parts["seed"]])


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two plain dicts; ``override`` wins; neither is modified."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def with_overrides(raw: dict, assignments: list[str], source: str = "--set") -> dict:
    """Apply ``a.b.c=value`` assignments (values parsed as YAML) to a plain dict."""
    out = raw
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(source, "", f"expected key=value, got {short_repr(item)}")
        nested: dict = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = limited_load(text)
        out = merge(out, nested)
    return out
