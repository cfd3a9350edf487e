"""Config trees of finetuning (`launch/finetune.py`) and sweeps (`launch/sweep.py`).

Keys shared with the rest of the project: ``out_dir``, ``seed``, ``data.root``, ``init``,
``n_labeled``, ``train.max_steps``. A sweep holds the same ``data`` / ``model`` / ``train``
sections as a finetuning run (every trial is one finetuning run) plus the grid and the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssl_pretrain.config import ConfigError, FieldError, option, validate
from ssl_pretrain.data.preprocess import PreprocessParams
from ssl_pretrain.models.unet import UNetConfig

__all__ = [
    "DataConfig",
    "ModelConfig",
    "FinetuneAugmentConfig",
    "FinetuneTrainConfig",
    "TrackingConfig",
    "FinetuneConfig",
    "SearchConfig",
    "NnunetConfig",
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
        "one (n_val, n_test, split_seed are then ignored); or nnU-Net's splits_final.json with data.fold",
    )
    fold: int | None = option(
        None, "the fold of an nnU-Net splits_final.json in data.splits: its train list is the training pool, "
        "its val list the validation set; test: the labeled cases in no list of the fold (labelsTs), else "
        "data.n_test cases held out of its train list by data.split_seed", ge=0,
    )
    labels: tuple[str, ...] | None = option(
        None,
        "class names by label value, background first ([background, prostate]), for a folder without a "
        "dataset.json; null: inferred from the label files, which must then hold the values 0..K-1",
        length=(2, None),
    )
    n_val: int = option(2, "validation subjects (fixed, used for early stopping and model selection)", ge=1)
    n_test: int = option(3, "test subjects (fixed, never seen in training or selection)", ge=1)
    split_seed: int = option(0, "seed of the subject-level split; keep it fixed across a study", ge=0)
    preprocess: PreprocessParams = option(
        factory=PreprocessParams,
        help="preprocessing; size is the training patch and the sliding window (a pretrained init's own "
        "parameters win; field_of_view is always pad here: see choose_preprocessing)",
    )


@dataclass
class ModelConfig:
    """Architecture of a randomly initialised UNet (an export brings its own)."""

    widths: tuple[int, ...] = option(
        (32, 64, 128, 256), "channels per level for init=random", ge=1, length=(2, None),
        rule="need at least 2 positive widths",
    )
    norm: Literal["instance", "batch"] = option("instance", "normalisation layer for init=random")
    dropout: float = option(0.0, "bottleneck dropout for init=random", ge=0, lt=1)
    network_class_name: str = option(
        "PlainConvUNet", "3D init=random: the dynamic_network_architectures class (as nnU-Net plans name it)"
    )
    arch: dict | None = option(
        None, "3D init=random: the network's arch_kwargs as an nnU-Net plans file writes them (as in the "
        "pretraining configs' model.arch); 3D data (a Z Y X data.preprocess.spacing) needs it",
    )

    def unet_config(self, in_channels: int, spatial_dims: int = 2) -> UNetConfig:
        """The architecture of a random init for data with ``in_channels`` channels.

        Raises:
            ConfigError: 3D data without ``model.arch``.
        """
        if spatial_dims == 3:
            if self.arch is None:
                raise ConfigError("model.arch: 3D data (a Z Y X data.preprocess.spacing) with init=random needs the "
                                  "network's arch_kwargs (see launch/configs/finetune3d.yaml)")
            cfg = UNetConfig(in_channels=in_channels, spatial_dims=3, network_class_name=self.network_class_name,
                             arch=self.arch)
            validate(cfg, "model.")
            return cfg
        return UNetConfig(in_channels=in_channels, widths=tuple(self.widths), norm=self.norm, dropout=self.dropout)

@dataclass
class FinetuneAugmentConfig:
    """On-the-fly MONAI augmentation of training patches: one strength knob, one probability per transform."""

    strength: float = option(1.0, "scales every transform's range (0 = identity, 1 = nnU-Net-like, 2 = strong)", ge=0)
    p_affine: float = option(0.5, "random rotation (±15°), scale (±15 %) and shift (±6 %)", ge=0, le=1)
    p_elastic: float = option(0.2, "elastic deformation", ge=0, le=1)
    p_bias_field: float = option(0.2, "smooth multiplicative bias field", ge=0, le=1)
    p_gamma: float = option(0.3, "gamma (contrast) change", ge=0, le=1)
    p_noise: float = option(0.15, "additive Gaussian noise", ge=0, le=1)
    p_smooth: float = option(0.1, "Gaussian smoothing", ge=0, le=1)
    p_low_resolution: float = option(0.2, "low-resolution simulation (down- then upsampling)", ge=0, le=1)
    p_flip: float = option(0.5, "mirroring: left-right in 2D, along each of the three axes in 3D", ge=0, le=1)

@dataclass
class FinetuneTrainConfig:
    """Optimisation, augmentation, evaluation and early stopping."""

    max_steps: int = option(2000, "optimizer steps", ge=1)
    batch_size: int = option(16, "patches (2D: slices) per step", ge=1)
    lr: float = option(1e-3, "peak AdamW learning rate", gt=0)
    weight_decay: float = option(1e-4, "AdamW weight decay", ge=0)
    warmup_steps: int = option(50, "linear learning-rate warmup steps", ge=0)
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule after warmup")
    freeze_encoder_steps: int = option(0, "steps with a frozen (pretrained) encoder before full finetuning", ge=0)
    pretrained_lr_scale: float = option(
        0.3, "learning rate of the parameters loaded from the init, times lr (0.3: the recipe study's choice)", ge=0
    )
    bf16: bool = option(True, "bf16 autocast of the training forward pass on GPUs (CPUs stay float32)")
    augment: bool = option(True, "on-the-fly MONAI augmentation of training patches (train.aug)")
    aug: FinetuneAugmentConfig = option(factory=FinetuneAugmentConfig, help="augmentation strength and probabilities")
    foreground_fraction: float = option(
        0.5, "share of training patches centred on foreground (nnU-Net: a third)", ge=0, le=1
    )
    patch_size: tuple[int, ...] = option(
        (64, 64, 64), "3D: training patch (D, H, W) and sliding window of inference (2D: data.preprocess.size)",
        ge=1, length=(3, 3),
    )
    deep_supervision: bool = option(False, "3D: train every decoder stage's output too (nnU-Net's loss weights)")
    eval_every: int = option(100, "steps between validation evaluations (and checkpoints)", ge=1)
    sw_overlap: float = option(
        0.5, "overlap of the Gaussian-weighted sliding windows of validation and test inference", ge=0, lt=1
    )
    nsd_tolerance_mm: float = option(2.0, "tolerance in mm of the test normalised surface Dice (test_nsd)", gt=0)
    test_tta: bool = option(
        False, "mirroring test-time augmentation in the test evaluation (rows, columns; 3D: the three axes)"
    )
    test_largest_component: bool = option(
        False, "test evaluation keeps the largest component of the classes chosen on validation (--largest-component)"
    )
    patience: int = option(10, "evaluations without validation-Dice improvement before stopping; 0 = never", ge=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "cuda when available with auto")
    num_threads: int = option(0, "torch CPU threads (0 = torch default)", ge=0)
    inject_fault_at_step: int | None = option(
        None,
        "TESTING HOOK: raise once right after the checkpoint at this step (a marker file in out_dir "
        "makes it fire only once), to exercise fault tolerance",
        ge=1,
    )

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
    promote: bool = option(
        False, "move the alias to this sweep's best even when it does not beat the current one on validation Dice"
    )


@dataclass
class FinetuneConfig:
    """One finetuning run: init × n_labeled × seed on a labeled dataset."""

    out_dir: str = option("runs/finetune", "everything the run writes goes under it")
    seed: int = option(0, "seed: which labeled volumes are drawn, initialisation, batches, augmentation", ge=0)
    init: str = option(
        "random", "random | path to an export model.pt | runs:/<id>/<path> | models:/<name>@<alias> | an nnU-Net "
        "checkpoint_final.pth | an nnssl checkpoint (network weights + adaptation plan)"
    )
    trust_checkpoint: bool = option(
        False, "load an nnU-Net / nnssl init checkpoint that holds Python objects beyond tensors (a pickle: loading "
        "it can run code from the file); only for files from a source you trust (--trust-checkpoint)",
    )
    n_labeled: int = option(1, "labeled training volumes drawn from the training pool (0 = all)", ge=0)
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
    train: FinetuneTrainConfig = option(factory=FinetuneTrainConfig, help="optimisation")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow")

    def check_fields(self) -> None:
        """``init`` may not be empty (the bounds are checked by the config loader)."""
        if not self.init:
            raise FieldError("init: must be 'random', a path to an export or an MLflow URI")


@dataclass
class SearchConfig:
    """Ray Tune search around the init × n_labeled × seed grid."""

    lr: tuple[float, ...] = option(
        (1e-3,), "lr: one value (fixed), or [low, high] sampled log-uniformly", gt=0, length=(1, 2)
    )
    weight_decay: tuple[float, ...] = option(
        (1e-4,), "weight decay: one value, or [low, high] log-uniform", gt=0, length=(1, 2)
    )
    num_samples: int = option(1, "lr / weight-decay samples per grid point", ge=1)
    transfer: tuple[str, ...] = option(
        ("encoder+decoder",),
        "transfer options tried per grid point (encoder | encoder+decoder); like lr, the best on validation Dice "
        "is selected per init",
        choices=("encoder", "encoder+decoder"), length=(1, None),
    )
    scheduler: Literal["fifo", "asha"] = option("fifo", "asha stops weak trials early (no test metrics then)")
    grace_period: int = option(2, "ASHA: evaluations before a trial may be stopped", ge=1)
    cpus_per_trial: float = option(1.0, "CPUs reserved per trial", gt=0)
    gpus_per_trial: float = option(0.0, "GPU fraction per trial (e.g. 0.25 packs four trials on a GPU)", ge=0)
    max_concurrent: int = option(0, "trials running at once (0 = as resources allow)", ge=0)
    max_failures: int = option(1, "retries of a crashed trial from its last checkpoint", ge=0)
    ray_num_cpus: int | None = option(None, "CPUs of the local Ray instance (ignored with RAY_ADDRESS)", ge=1)
    fault_at_step: int | None = option(
        None, "TESTING HOOK: the first grid trial raises once after its checkpoint at this step", ge=1
    )

    def check_fields(self) -> None:
        """A [low, high] range must be ordered."""
        for key in ("lr", "weight_decay"):
            v = getattr(self, key)
            if len(v) == 2 and v[0] > v[1]:
                raise FieldError(f"{key}: one positive value or [low, high] with low <= high, got {list(v)}")


@dataclass
class NnunetConfig:
    """The ``nnunet`` arms of a sweep: nnU-Net v2 itself (``pip install -e ".[nnunet]"``), configuration ``2d``
    (2D and 2.5D sweeps) or ``3d_fullres`` (3D), trained on each trial's labeled volumes."""

    epochs: int = option(50, "nnU-Net training epochs (nnU-Net's own default: 1000)", ge=1)
    iterations_per_epoch: int = option(250, "training iterations per epoch (nnU-Net's: 250)", ge=1)
    val_iterations_per_epoch: int = option(50, "validation iterations per epoch (nnU-Net's: 50)", ge=1)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "nnU-Net's -device; auto: cuda when the trial has a GPU")


@dataclass
class SweepConfig:
    """A label-efficiency sweep: every trial is one finetuning run."""

    out_dir: str = option("runs/sweep", "everything the sweep writes goes under it")
    seed: int = option(0, "seed of the lr / weight-decay sampling", ge=0)
    init: list[str] = option(
        factory=lambda: ["random"],
        help="inits to compare: random, export paths, MLflow URIs, globs over step exports (runs/c1/export/step-*), "
        "nnU-Net / nnssl checkpoints; nnunet (nnU-Net v2 itself from scratch), nnunet:EXPORT (nnU-Net finetuning "
        "a 3D export)",
    )
    trust_checkpoint: bool = option(
        False, "load an nnU-Net / nnssl init checkpoint that holds Python objects beyond tensors (a pickle: loading "
        "it can run code from the file); only for files from a source you trust (--trust-checkpoint)",
    )
    n_labeled: tuple[int, ...] = option(
        (1, 2, 4), "numbers of labeled training volumes (0 = all)", ge=0, length=(1, None)
    )
    seeds: tuple[int, ...] = option(
        (0, 1), "seeds per (init, n_labeled): which volumes are drawn, init, batches", ge=0, length=(1, None)
    )
    data: DataConfig = option(factory=DataConfig, help="labeled data")
    model: ModelConfig = option(factory=ModelConfig, help="architecture for init=random")
    train: FinetuneTrainConfig = option(factory=FinetuneTrainConfig, help="optimisation of every trial")
    search: SearchConfig = option(factory=SearchConfig, help="Ray Tune search")
    nnunet: NnunetConfig = option(factory=NnunetConfig, help="the nnunet arms (init: nnunet, nnunet:EXPORT)")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow")

    def check_fields(self) -> None:
        """At least one init."""
        if not self.init:
            raise FieldError("init: give at least one init (e.g. [random, runs/c1/export/model.pt])")
