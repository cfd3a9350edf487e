"""Config trees of finetuning (`launch/finetune.py`) and sweeps (`launch/sweep.py`).

Keys shared with the rest of the project: ``out_dir``, ``seed``, ``data.root``, ``init``,
``n_labeled``, ``train.max_steps``. A sweep holds the same ``data`` / ``model`` / ``train``
sections as a finetuning run (every trial is one finetuning run) plus the grid and the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssl_pretrain.config import ConfigError, option
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.models.unet import UNetConfig

__all__ = [
    "DataConfig",
    "ModelConfig",
    "AugmentConfig",
    "TrainConfig",
    "TrackingConfig",
    "FinetuneConfig",
    "SearchConfig",
    "SweepConfig",
]


@dataclass
class DataConfig:
    """The labeled dataset, its preprocessing and its subject-level splits."""

    root: str = option(
        "", "labeled dataset: MSD layout (imagesTr/, labelsTr/, dataset.json) or image/label folders"
    )
    cache_dir: str | None = option(
        None, "cache of preprocessed volumes (default: <out_dir>/cache; a sweep's trials share the sweep's)"
    )
    splits: str | None = option(
        None,
        "JSON file with train_pool / val / test lists of subject ids: a fixed split instead of the seeded "
        "one (n_val, n_test, split_seed are then ignored)",
    )
    n_val: int = option(2, "validation subjects (fixed, used for early stopping and model selection)")
    n_test: int = option(3, "test subjects (fixed, never seen in training or selection)")
    split_seed: int = option(0, "seed of the subject-level split; keep it fixed across a study")
    preprocess: PreprocessParams = option(
        factory=PreprocessParams,
        help="preprocessing; size is the training patch and the sliding window (a pretrained init's own "
        "parameters win; field_of_view is always pad here: see choose_preprocessing)",
    )

    def validate(self) -> None:
        if self.n_val < 1:
            raise ConfigError(f"data.n_val: must be >= 1, got {self.n_val}")
        if self.n_test < 1:
            raise ConfigError(f"data.n_test: must be >= 1, got {self.n_test}")


@dataclass
class ModelConfig:
    """Architecture of a randomly initialised UNet (an export brings its own)."""

    widths: tuple[int, ...] = option((32, 64, 128, 256), "channels per level for init=random")
    norm: Literal["instance", "batch"] = option("instance", "normalisation layer for init=random")
    dropout: float = option(0.0, "bottleneck dropout for init=random")

    def unet_config(self, in_channels: int) -> UNetConfig:
        """The architecture of a random init for data with ``in_channels`` channels."""
        return UNetConfig(in_channels=in_channels, widths=tuple(self.widths), norm=self.norm, dropout=self.dropout)

    def validate(self) -> None:
        self.unet_config(1).validate()  # one rule for widths / dropout; its messages name model.*


@dataclass
class AugmentConfig:
    """On-the-fly MONAI augmentation of training patches: one strength knob, one probability per transform."""

    strength: float = option(1.0, "scales every transform's range (0 = identity, 1 = nnU-Net-like, 2 = strong)")
    p_affine: float = option(0.5, "random rotation (±15°), scale (±15 %) and shift (±6 %)")
    p_elastic: float = option(0.2, "elastic deformation")
    p_bias_field: float = option(0.2, "smooth multiplicative bias field")
    p_gamma: float = option(0.3, "gamma (contrast) change")
    p_noise: float = option(0.15, "additive Gaussian noise")
    p_smooth: float = option(0.1, "Gaussian smoothing")
    p_low_resolution: float = option(0.2, "low-resolution simulation (down- then upsampling)")
    p_flip: float = option(0.5, "left-right mirroring")

    def validate(self) -> None:
        if self.strength < 0:
            raise ConfigError(f"train.aug.strength: must be >= 0, got {self.strength}")
        for name in [n for n in self.__dataclass_fields__ if n.startswith("p_")]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.aug.{name}: a probability in [0, 1], got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Optimisation, augmentation, evaluation and early stopping."""

    max_steps: int = option(2000, "optimizer steps")
    batch_size: int = option(16, "slices per step")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_steps: int = option(50, "linear learning-rate warmup steps")
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule after warmup")
    freeze_encoder_steps: int = option(0, "steps with a frozen (pretrained) encoder before full finetuning")
    pretrained_lr_scale: float = option(1.0, "learning rate of the parameters loaded from the init, times lr")
    bf16: bool = option(True, "bf16 autocast of the training forward pass on GPUs (CPUs stay float32)")
    augment: bool = option(True, "on-the-fly MONAI augmentation of training patches (train.aug)")
    aug: AugmentConfig = option(factory=AugmentConfig, help="augmentation strength and probabilities")
    foreground_fraction: float = option(0.5, "share of training slices drawn from slices with foreground")
    eval_every: int = option(100, "steps between validation evaluations (and checkpoints)")
    sw_overlap: float = option(
        0.5, "overlap of the Gaussian-weighted sliding windows of validation and test inference, in [0, 1)"
    )
    nsd_tolerance_mm: float = option(2.0, "tolerance in mm of the test normalised surface Dice (test_nsd)")
    test_tta: bool = option(False, "mirroring test-time augmentation (rows, columns) in the test evaluation")
    test_largest_component: bool = option(
        False, "test evaluation keeps the largest component of the classes chosen on validation (--largest-component)"
    )
    patience: int = option(10, "evaluations without validation-Dice improvement before stopping; 0 = never")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "cuda when available with auto")
    num_threads: int = option(0, "torch CPU threads (0 = torch default)")
    inject_fault_at_step: int | None = option(
        None,
        "TESTING HOOK: raise once right after the checkpoint at this step (a marker file in out_dir "
        "makes it fire only once), to exercise fault tolerance",
    )

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.nsd_tolerance_mm <= 0:
            raise ConfigError(f"train.nsd_tolerance_mm: must be > 0, got {self.nsd_tolerance_mm}")
        if self.pretrained_lr_scale < 0:
            raise ConfigError(f"train.pretrained_lr_scale: must be >= 0, got {self.pretrained_lr_scale}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or self.freeze_encoder_steps < 0 or self.patience < 0:
            raise ConfigError("train.warmup_steps / freeze_encoder_steps / patience: must be >= 0")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ConfigError(f"train.sw_overlap: must be in [0, 1), got {self.sw_overlap}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"train.foreground_fraction: must be in [0, 1], got {self.foreground_fraction}")


@dataclass
class TrackingConfig:
    """MLflow tracking (the store is MLFLOW_TRACKING_URI, else MLflow's local default)."""

    enabled: bool = option(True, "log to MLflow")
    experiment: str = option("mri-ssl/finetune", "MLflow experiment")
    dataset_name: str | None = option(
        None, "name in the registry model mri-ssl-<name> (default: dataset.json name)"
    )
    register: bool = option(True, "sweeps: register the best model with the alias below")
    alias: str = option("champion", "registry alias of the overall best model")


@dataclass
class FinetuneConfig:
    """One finetuning run: init × n_labeled × seed on a labeled dataset."""

    out_dir: str = option("runs/finetune", "everything the run writes goes under it")
    seed: int = option(0, "seed: which labeled volumes are drawn, initialisation, batches, augmentation")
    init: str = option(
        "random", "random | path to an export model.pt | runs:/<id>/<path> | models:/<name>@<alias>"
    )
    n_labeled: int = option(1, "labeled training volumes drawn from the training pool (0 = all)")
    transfer: Literal["encoder", "encoder+decoder"] = option(
        "encoder+decoder",
        "parts of a pretrained init that are loaded: encoder only, or all it has (encoder, decoder, a matching head)",
    )
    resume: Literal["never", "auto"] = option(
        "auto",
        "auto: continue from <out_dir>/checkpoint/ when it holds a checkpoint of the same config; "
        "never: out_dir must hold none",
    )
    data: DataConfig = option(factory=DataConfig, help="labeled data")
    model: ModelConfig = option(factory=ModelConfig, help="architecture for init=random")
    train: TrainConfig = option(factory=TrainConfig, help="optimisation")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow")

    def validate(self) -> None:
        if self.n_labeled < 0:
            raise ConfigError(f"n_labeled: must be >= 0 (0 = all training volumes), got {self.n_labeled}")
        if not self.init:
            raise ConfigError("init: must be 'random', a path to an export or an MLflow URI")


@dataclass
class SearchConfig:
    """Ray Tune search around the init × n_labeled × seed grid."""

    lr: tuple[float, ...] = option((1e-3,), "lr: one value (fixed), or [low, high] sampled log-uniformly")
    weight_decay: tuple[float, ...] = option((1e-4,), "weight decay: one value, or [low, high] log-uniform")
    num_samples: int = option(1, "lr / weight-decay samples per grid point")
    transfer: tuple[str, ...] = option(
        ("encoder+decoder",),
        "transfer options tried per grid point (encoder | encoder+decoder); like lr, the best on validation Dice "
        "is selected per init",
    )
    scheduler: Literal["fifo", "asha"] = option("fifo", "asha stops weak trials early (no test metrics then)")
    grace_period: int = option(2, "ASHA: evaluations before a trial may be stopped")
    cpus_per_trial: float = option(1.0, "CPUs reserved per trial")
    gpus_per_trial: float = option(0.0, "GPU fraction per trial (e.g. 0.25 packs four trials on a GPU)")
    max_concurrent: int = option(0, "trials running at once (0 = as resources allow)")
    max_failures: int = option(1, "retries of a crashed trial from its last checkpoint")
    ray_num_cpus: int | None = option(None, "CPUs of the local Ray instance (ignored with RAY_ADDRESS)")
    fault_at_step: int | None = option(
        None, "TESTING HOOK: the first grid trial raises once after its checkpoint at this step"
    )

    def validate(self) -> None:
        for key in ("lr", "weight_decay"):
            v = getattr(self, key)
            if len(v) not in (1, 2) or any(x <= 0 for x in v) or (len(v) == 2 and v[0] > v[1]):
                raise ConfigError(
                    f"search.{key}: one positive value or [low, high] with low <= high, got {list(v)}"
                )
        if self.num_samples < 1:
            raise ConfigError(f"search.num_samples: must be >= 1, got {self.num_samples}")
        if not self.transfer or any(v not in ("encoder", "encoder+decoder") for v in self.transfer):
            raise ConfigError(
                f"search.transfer: a non-empty list of encoder | encoder+decoder; got {list(self.transfer)}"
            )
        if self.max_failures < 0:
            raise ConfigError(f"search.max_failures: must be >= 0, got {self.max_failures}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("search.cpus_per_trial must be > 0 and search.gpus_per_trial >= 0")


@dataclass
class SweepConfig:
    """A label-efficiency sweep: every trial is one finetuning run."""

    out_dir: str = option("runs/sweep", "everything the sweep writes goes under it")
    seed: int = option(0, "seed of the lr / weight-decay sampling")
    init: list[str] = option(
        factory=lambda: ["random"],
        help="inits to compare: random, export paths, MLflow URIs, globs over step exports (runs/c1/export/step-*)",
    )
    n_labeled: tuple[int, ...] = option((1, 2, 4), "numbers of labeled training volumes (0 = all)")
    seeds: tuple[int, ...] = option(
        (0, 1), "seeds per (init, n_labeled): which volumes are drawn, init, batches"
    )
    data: DataConfig = option(factory=DataConfig, help="labeled data")
    model: ModelConfig = option(factory=ModelConfig, help="architecture for init=random")
    train: TrainConfig = option(factory=TrainConfig, help="optimisation of every trial")
    search: SearchConfig = option(factory=SearchConfig, help="Ray Tune search")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow")

    def validate(self) -> None:
        if not self.init:
            raise ConfigError("init: give at least one init (e.g. [random, runs/c1/export/model.pt])")
        if not self.n_labeled or any(n < 0 for n in self.n_labeled):
            raise ConfigError(f"n_labeled: non-empty list of counts >= 0, got {list(self.n_labeled)}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
