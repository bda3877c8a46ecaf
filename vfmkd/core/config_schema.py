"""The experiment's fixed sections as dataclass schemas: OmegaConf checks keys and types against them
at load (:func:`vfmkd.core.config.load_experiment`), and :func:`vfmkd.core.config.experiment_record`
hands a resolved config back as these typed records. Component entries (``model.backbone``,
``heads``, ``teachers``, ``distillation.losses``) stay mappings: their keys are checked against the
component's constructor."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ResolutionDistillConfig:
    """DSRL (vfmkd/distillation/resolution.py): the student sees the canvas / sr_target_scale; a
    training-only SR branch reconstructs the canvas (loss_sr, MSE) and feature affinity ties it to
    the segmentation features (loss_fa). Weights: the paper's 0.1 / 1.0 (sr / fa) are the default,
    being the values DSRL validated; the design's 0.5 / 0.5 weighs reconstruction higher."""

    enabled: bool = False
    sr_target_scale: float = 2.0  # in (1, 4]: student input = data.img_size / this, SR target = the canvas
    feat_channels: int = 64  # width of the SR branch
    sr_loss_weight: float = 0.1
    fa_loss_weight: float = 1.0
    fa_subscale: float = 0.125  # in (0, 1]: FA affinity grid = the SR grid x this (avg-pooled)
    use_low_res_sr: bool = False  # memory lever: SR branch on the level's grid, only the 3-channel image resized
    fa_detach_sr: bool = False  # true: FA moves only the segmentation side (SR features as a fixed target)
    head: Optional[str] = None  # the segmentation head (default: the only semantic/binary head)
    # single: the student trains on the canvas / sr_target_scale only (DSRL). dual: each step runs the student on
    # the canvas (high path) and on canvas / sr_target_scale (low path), shared weights; FA aligns low to high, SR
    # reconstructs the canvas from the low path; inference runs the high path (docs/resolution_distillation.md).
    mode: str = "single"
    fa_detach_high: bool = True  # dual: the high path's features are FA's fixed target (false: FA moves both paths)
    task_weight_high: float = 1.0  # dual: x the task losses of the high path
    task_weight_low: float = 1.0  # dual: x the task losses of the low path (segmentation heads)


@dataclass
class ModelConfig:
    # Mappings, not defaults: a default entry would be merged into (not replaced by) the user's.
    backbone: Dict[str, Any] = field(default_factory=dict)  # {type, config?, ...kwargs}
    neck: Dict[str, Any] = field(default_factory=lambda: {"type": "yolov8_pafpn"})
    heads: Dict[str, Any] = field(default_factory=dict)  # name -> {type, config?, ...kwargs}
    # Pretrained start of a training run: {from: <file>, parts: [backbone, neck, heads], strict: false}
    # (vfmkd/models/pretrained.py: an ultralytics YOLOv8 .pt, a timm checkpoint, a vfmkd run's best.pt).
    init: Dict[str, Any] = field(default_factory=dict)
    resolution_distill: ResolutionDistillConfig = field(default_factory=ResolutionDistillConfig)
    # Input scale where a model is built for inference (tools/test.py, export, predict, a vfmkd teacher): the
    # student sees the canvas x infer_scale, in (0, 1]. null: the trained path (dual/off: 1, single: 1/sr_target_scale).
    infer_scale: Optional[float] = None


@dataclass
class DistillationConfig:
    # name -> {type (defaults to the name), weight, log_as, ...loss kwargs}
    losses: Dict[str, Any] = field(default_factory=dict)
    # per batch: cached features with this probability, else a live teacher pass; its range is one rule,
    # check_offline_ratio, applied at load (before a run directory exists) and by TeacherRouter (API users)
    offline_ratio: float = 1.0
    distill_interval: int = 1  # distil every k-th step (the teacher pass and feature losses are skipped between)
    missing_cache: str = "error"  # error | online: images absent from a cache go to the live teacher
    # A cached map stands in for a live pass only if a live teacher would see every visible point of
    # the view within this fraction of its canvas from where the cached pass saw it (ViT maps are
    # not scale- or shift-equivariant; benchmarks/bench_aug_agreement.py measures the agreement).
    offline_max_shift: float = 0.05
    offline_crops: bool = False  # crops lose context the cached full-image map saw: live unless allowed
    # true/zscore: per-channel (x - mean) / std of teacher maps, stats measured at cache time; phi_s: PHI-S
    # (Hadamard-rotated isotropic standardisation, vfmkd/cache/phi_s.py; docs/agglomerative.md); false: raw
    standardize: Any = True
    # per step, each distilled teacher is left out with this probability (never all; the kept ones' weights are
    # renormalised; a dropped live teacher is not run); seeded by train.seed (docs/agglomerative.md)
    teacher_drop_prob: float = 0.0
    alpha: float = 1.0  # x task losses
    beta: float = 1.0  # x output (logit) distillation losses
    gamma: float = 1.0  # x feature distillation losses
    # run-wide temperature of the output (logit) losses that take one; an entry's own `temperature` wins
    temperature: Optional[float] = None


@dataclass
class AugmentConfig:
    # The geometric part of the YOLO recipe (0 = off). Offline batches follow flips through a
    # cached flipped pass and scale/translate through RoIAlign; rotation needs the live teacher.
    fliplr: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    degrees: float = 0.0


@dataclass
class DataConfig:
    dataset: str = "coco128"
    root: str = "datasets/coco128"
    train_split: str = "train2017"
    val_split: str = "val2017"
    img_size: int = 640
    batch_size: int = 16
    num_workers: int = 2
    limit: Optional[int] = None  # first N images of each split (quick runs)
    # multi-resolution training: each training batch is rescaled to a size drawn from this list (seeded by
    # train.seed; multiples of 32); empty: every batch at img_size (docs/agglomerative.md)
    img_sizes: List[int] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Semantic class names (semantic_segmentation/config.yaml) whose pixels are the foreground of a
    # binary_head (e.g. [person]); the binary masks are built from the semantic PNGs.
    binary_classes: List[str] = field(default_factory=list)
    # What data.root is (docs/your_data.md): auto (decided from the path) | vfmkd (the coco128 folder layout) |
    # ultralytics (root = a dataset YAML) | coco (instances JSON) | images (a folder of unlabelled images).
    format: str = "auto"
    train_json: Optional[str] = None  # coco: the instances JSON of each split (null: see docs/your_data.md)
    val_json: Optional[str] = None
    # A folder of unlabelled images (any depth) added to the train split: feature and output losses on every
    # image, task losses on the labelled ones only.
    unlabelled: Optional[str] = None


@dataclass
class StageConfig:
    # One stage of train.stages: its epochs, the distillation.losses entries it trains (null: all),
    # weight overrides for them and its base LR (null: train.lr).
    name: str = ""
    epochs: int = 1
    losses: Optional[List[str]] = None
    weights: Dict[str, float] = field(default_factory=dict)
    lr: Optional[float] = None


@dataclass
class TrainConfig:
    epochs: Optional[int] = None  # 100 without stages; with stages, the sum of their epochs
    stages: List[StageConfig] = field(default_factory=list)
    lr: float = 0.01
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0005
    momentum: float = 0.937
    warmup_iters: int = 100
    warmup_epochs: int = 0  # > 0: the LR warm-up lasts this many epochs instead of warmup_iters steps
    grad_clip: float = 10.0
    seed: int = 0
    # auto (cuda:LOCAL_RANK under torchrun, else cuda if there is a GPU, else cpu) | cpu | cuda | cuda:N
    device: str = "auto"
    log_interval: int = 10
    eval_interval: int = 1  # epochs between validations; best.pt follows val mAP50-95
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    amp: Any = "auto"  # bf16 autocast of the student: auto (on a bf16-capable GPU, off elsewhere) | true | false
    save_interval_steps: int = 0  # also write checkpoints/last.pt every N optimizer steps (0: at epoch ends only)
    sync_bn: bool = False  # torchrun with several CUDA ranks: BatchNorm statistics over the global batch
    max_nonfinite_steps: int = 1  # NaN/inf steps in a row (each refused before the optimizer) that stop the run
    # Live teacher passes of the next batches overlap the student's step (vfmkd/distillation/prefetch.py):
    # auto | off; how many batches ahead; the teacher thread's CPU threads (0 = half of torch's threads).
    teacher_prefetch: str = "auto"
    teacher_prefetch_depth: int = 2
    teacher_threads: int = 0
    save_period: int = 0  # also keep checkpoints/checkpoint_epoch{E}.pt every N epochs (0: off)
    vis_interval: int = 1  # epochs between visualizations/epoch_XXX.png (0: off)
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb (optional package)
    # Memory preset (configs/presets/NAME.yaml, vfmkd/utils/presets.py; tools/train.py --preset): null = the
    # file as written (the experiment means the same on every machine), auto = picked from the GPU's memory.
    preset: Optional[str] = None


@dataclass
class EvalConfig:
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300
    batch_size: int = 16
    fidelity: bool = True  # held-out student-teacher cosine/MSE per teacher and level next to mAP
    vis_images: int = 4  # images drawn per visualization PNG


@dataclass
class ExperimentConfig:
    experiment_name: str = "experiment"
    work_dir: str = "work_dirs"
    # Modules imported before anything is built, so their @BACKBONES/@TEACHERS/... registrations
    # exist: your own components, outside the vfmkd package (e.g. my_pkg.my_backbone).
    custom_imports: List[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    # name -> {type (defaults to the name), enabled, offline, feature_path, config, ...teacher kwargs}
    teachers: Dict[str, Any] = field(default_factory=dict)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
