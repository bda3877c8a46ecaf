"""Issue 16, items 1-2: `variant: auto` reads a teacher's size from its checkpoint; `device`/`dtype`/`amp: auto`
follow the machine. Checkpoints carry the real keys and shapes of each size, built on the meta device by the
real libraries (stride-0 tensors keep the files tiny); CUDA is faked only where the resolution is tested."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from segment_anything import sam_model_registry

from vfmkd.core.device import parse_device, resolve_amp, resolve_device, resolve_dtype
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.teachers.dino_teacher import DinoTeacher, Dinov2Teacher
from vfmkd.teachers.lora_sam_teacher import LoraSamTeacher, lora_key
from vfmkd.teachers.sam_teacher import SamTeacher
from vfmkd.teachers.settings import TeacherSettings
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import train as train_tool  # noqa: E402

MAIN = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"


def _tiny_file(state_dict, path: Path, wrap: bool = False) -> Path:
    """``state_dict``'s keys and shapes, every tensor a stride-0 view of one value (a few KiB on disk)."""
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state_dict.items()}
    torch.save({"model": sd} if wrap else sd, path)
    return path


def _on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.fixture(scope="module")
def sam_vit_l(tmp_path_factory) -> Path:
    model = _on_meta(lambda: sam_model_registry["vit_l"]())
    return _tiny_file(model.state_dict(), tmp_path_factory.mktemp("w") / "my_sam_l.pth")


# ----------------------------------------------------------------------------- device / dtype / amp
def _fake_cuda(monkeypatch, available: bool, bf16: bool = True, count: int = 2, local_rank=None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_auto_device_follows_the_machine(monkeypatch, caplog):
    _fake_cuda(monkeypatch, False)
    assert resolve_device("auto") == torch.device("cpu")
    _fake_cuda(monkeypatch, True)
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        assert resolve_device("auto", "train.device") == torch.device("cuda")
    assert "train.device: auto -> cuda (a CUDA GPU is visible)" in caplog.text
    _fake_cuda(monkeypatch, True, local_rank=1)  # torchrun
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # a plain `cuda` is this rank's GPU too
    assert resolve_device("cpu") == torch.device("cpu")
    _fake_cuda(monkeypatch, False, local_rank=1)  # torchrun on CPU machines: gloo, every rank on the CPU
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_dtype_and_amp_are_bf16_only_on_a_bf16_gpu(monkeypatch):
    _fake_cuda(monkeypatch, True, bf16=True)
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_amp("auto", "cuda") is True
    # a teacher kept on the CPU
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_amp("auto", "cpu") is False
    assert resolve_dtype("float16", "cuda") == "float16" and resolve_amp(False, "cuda") is False  # explicit values win
    _fake_cuda(monkeypatch, True, bf16=False)  # e.g. a V100
    assert resolve_dtype("auto", "cuda") == "float32" and resolve_amp("auto", "cuda") is False
    _fake_cuda(monkeypatch, False)
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_amp("auto", "cpu") is False
    assert resolve_amp(True, "cpu") is True  # as before: an explicit true autocasts on the CPU too
    with pytest.raises(ConfigError, match="train.amp must be auto, true or false, got 'bf16'"):
        resolve_amp("bf16", "cpu")


def test_teacher_settings_resolve_auto_on_a_faked_gpu(monkeypatch):
    _fake_cuda(monkeypatch, True, bf16=True, local_rank=0)
    settings = TeacherSettings(variant="vit_b")
    assert (settings.device, settings.dtype, settings.computed_dtype) == ("cuda:0", "bfloat16", "bfloat16")
    fp = SamTeacher.config_fingerprint(init="random", input_size=64)
    assert fp.dtype == "bfloat16"  # the fingerprint holds what runs, not "auto"
    assert fp == SamTeacher.config_fingerprint(init="random", input_size=64, device="cuda", dtype="bfloat16")


def test_on_a_cpu_auto_is_exactly_todays_cpu_float32(monkeypatch):
    _fake_cuda(monkeypatch, False)
    settings = TeacherSettings(variant="vit_b")
    assert (settings.device, settings.dtype) == ("cpu", "float32")
    explicit = dict(variant="vit_b", init="random", input_size=64, device="cpu", dtype="float32")
    assert SamTeacher.config_fingerprint(init="random", input_size=64) == SamTeacher.config_fingerprint(**explicit)
    assert "device" not in SamTeacher.config_fingerprint(**explicit).as_dict()  # where it ran is not an identity
    # an explicit CUDA config still fingerprints offline on a CPU machine (the cache a GPU wrote)
    assert SamTeacher.config_fingerprint(init="random", input_size=64, device="cuda",
                                         dtype="bfloat16").dtype == "bfloat16"


def test_a_cuda_device_without_cuda_is_one_line_and_exit_2(monkeypatch, caplog, tmp_path):
    _fake_cuda(monkeypatch, False)
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:0", "train.device")
    assert str(err.value) == ("train.device=cuda:0 but CUDA is not available on this machine; set train.device=auto "
                              "(the GPU when there is one, else the CPU) or train.device=cpu.")
    with pytest.raises(ConfigError, match=r"teacher.device='gpu' is not a torch device.*teacher.device=auto"):
        parse_device("gpu", "teacher.device")
    _fake_cuda(monkeypatch, True, count=1)
    with pytest.raises(ConfigError, match=r"train.device=cuda:3 but this machine has 1 CUDA device"):
        resolve_device("cuda:3", "train.device")
    _fake_cuda(monkeypatch, False)
    assert run_tool(train_tool.main, [str(MAIN), "train.device=cuda", f"work_dir={tmp_path}"]) == 2
    assert "train.device=cuda but CUDA is not available" in caplog.text and "train.device=auto" in caplog.text
    assert not list(tmp_path.iterdir())  # refused before a run directory exists
    caplog.clear()
    argv = ["--teacher", "sam", "--limit", "1", "--output", str(tmp_path / "c"), "--no-progress",
            "teacher.init=random", "teacher.input_size=64", "teacher.device=cuda"]
    assert run_tool(ptf.main, argv) == 2
    assert "teacher.device=cuda but CUDA is not available on this machine; set teacher.device=auto" in caplog.text


# ----------------------------------------------------------------------------- variant: auto
def test_sam_variant_is_read_from_the_file(sam_vit_l, caplog):
    fp = SamTeacher.config_fingerprint(checkpoint=str(sam_vit_l), input_size=64)
    assert fp.variant == "vit_l"
    assert fp == SamTeacher.config_fingerprint(checkpoint=str(sam_vit_l), input_size=64, variant="vit_l")
    with pytest.raises(CheckpointError, match=r"is a SAM vit_l image encoder but teacher.variant is vit_b; set "
                                              r"teacher.variant=vit_l or teacher.variant=auto"):
        SamTeacher(checkpoint=str(sam_vit_l), variant="vit_b", input_size=64)


def test_sam2_variant_and_version_are_read_from_the_file(tmp_path, monkeypatch):
    pytest.importorskip("sam2")
    from sam2.build_sam import build_sam2

    from vfmkd.teachers.sam2_teacher import SAM2_VARIANTS, Sam2Teacher

    linspace = torch.linspace  # Hiera reads its drop-path schedule with .item(): keep that one on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{"device": "cpu", **k}))
    model = _on_meta(lambda: build_sam2(SAM2_VARIANTS["sam2_hiera_small"][0], ckpt_path=None, device="meta"))
    monkeypatch.undo()
    path = _tiny_file(model.state_dict(), tmp_path / "small.pt", wrap=True)  # SAM2 (not 2.1), official wrapper
    fp = Sam2Teacher.config_fingerprint(checkpoint=str(path), input_size=64)
    assert fp.variant == "sam2_hiera_small"
    assert fp == Sam2Teacher.config_fingerprint(checkpoint=str(path), input_size=64, variant="sam2_hiera_small")
    with pytest.raises(CheckpointError, match=r"is a SAM2 Hiera-small .* but teacher.variant is sam2.1_hiera_small .*"
                                              r"set teacher.variant=sam2_hiera_small or teacher.variant=auto"):
        Sam2Teacher(checkpoint=str(path), variant="sam2.1_hiera_small", input_size=64)


def test_dino_and_dinov2_variants_are_read_from_the_file(tmp_path):
    v1 = _on_meta(lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0))
    v1_file = _tiny_file(v1.state_dict(), tmp_path / "dino_vitb16.pth")
    assert DinoTeacher.config_fingerprint(checkpoint=str(v1_file)).variant == "vitb16"
    v2 = _on_meta(lambda: timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0))
    official = {"mask_token": torch.zeros(1, 768), "register_tokens": torch.zeros(1, 4, 768),
                **{k: v for k, v in v2.state_dict().items() if k != "reg_token"}}
    v2_file = _tiny_file(official, tmp_path / "dinov2_vitb14_reg4.pth")
    fp = Dinov2Teacher.config_fingerprint(checkpoint=str(v2_file), input_size=56)
    assert fp.variant == "vitb14_reg4"
    assert fp == Dinov2Teacher.config_fingerprint(checkpoint=str(v2_file), input_size=56, variant="vitb14_reg4")
    with pytest.raises(CheckpointError, match=r"is a DINOv2 .* backbone \(vitb14_reg4\) but this is the dino teacher; "
                                              r"use the dinov2 teacher"):
        DinoTeacher.config_fingerprint(checkpoint=str(v2_file))
    with pytest.raises(CheckpointError, match=r"is a DINO ViT-B/16 backbone \(vitb16\) but teacher.variant is vits16"):
        DinoTeacher(checkpoint=str(v1_file), variant="vits16")


def test_lora_sam_takes_its_base_size(sam_vit_l, tmp_path):
    lora = {lora_key(i, w): torch.zeros(*((4, 1024) if w == "A" else (3072, 4))) for i in range(24) for w in "AB"}
    torch.save(lora, tmp_path / "lora_l.pt")
    kwargs = dict(lora_checkpoint=str(tmp_path / "lora_l.pt"), lora_rank=4, input_size=64)
    assert LoraSamTeacher.config_fingerprint(checkpoint=str(sam_vit_l), **kwargs).variant == "vit_l+lora_r4_a8"
    # a random base: the size the LoRA was trained on (without a LoRA file: the default vit_b)
    assert LoraSamTeacher.config_fingerprint(init="random", **kwargs).variant == "vit_l+lora_r4_a8"
    assert LoraSamTeacher.config_fingerprint(init="random", input_size=64).variant == "vit_b+lora_r8_a8"


@pytest.mark.parametrize("cls, default", [(SamTeacher, "vit_b"), (DinoTeacher, "vits16"), (Dinov2Teacher, "vits14")])
def test_without_a_file_auto_is_the_documented_default(cls, default, monkeypatch, tmp_path):
    assert cls.config_fingerprint(init="random").variant == default
    monkeypatch.chdir(tmp_path)  # no weights/ folder: the default size's official file is missing
    with pytest.raises(CheckpointError, match=rf"{default} checkpoint not found: weights/.*Download it with "
                                              rf"`python tools/download_weights.py --model {cls.family}_{default}`"):
        cls()


def test_sam2_without_a_file_is_the_default_tiny(monkeypatch, tmp_path):
    pytest.importorskip("sam2")
    from vfmkd.teachers.sam2_teacher import Sam2Teacher

    assert Sam2Teacher.config_fingerprint(init="random").variant == "sam2.1_hiera_tiny"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"sam2.1_hiera_tiny checkpoint not found: weights/sam2.1_hiera_tiny.pt.*"
                                              r"`python tools/download_weights.py --model sam2.1_hiera_tiny`"):
        Sam2Teacher()


def test_shipped_teacher_configs_default_to_auto():
    import yaml

    for name in ("sam", "sam2", "lora_sam", "dino", "dinov2"):
        cfg = yaml.safe_load((REPO / "configs" / "teachers" / f"{name}.yaml").read_text())
        assert (cfg["variant"], cfg["dtype"], cfg["device"]) == ("auto", "auto", "auto"), name


# ----------------------------------------------------------------------------- the design quickstart, verbatim
def test_design_quickstart_runs_on_an_official_base_plus_file(tmp_path, monkeypatch, caplog):
    """README 'Quickstart' steps 4-5 on an official-layout sam2.1_hiera_base_plus.pt (Meta's sam2 package's
    own random model, saved as {"model": state_dict}) and no variant override: the cache tool and the
    design experiment read the size from the file. Small sizes only (teacher input 64, 4 images, 1 epoch)."""
    pytest.importorskip("sam2")
    import json

    import h5py
    from sam2.build_sam import build_sam2

    from vfmkd.teachers.sam2_teacher import SAM2_VARIANTS

    monkeypatch.chdir(tmp_path)  # weights/, teacher_features/ as the quickstart writes them; data from the repo
    torch.manual_seed(0)
    model = build_sam2(SAM2_VARIANTS["sam2.1_hiera_base_plus"][0], ckpt_path=None, device="cpu")
    (tmp_path / "weights").mkdir()
    torch.save({"model": model.state_dict()}, tmp_path / "weights" / "sam2.1_hiera_base_plus.pt")
    del model
    small = ["teacher.input_size=64"]
    caplog.set_level(logging.INFO, logger="vfmkd")
    assert ptf.main(["--teacher", "sam2", "--output", "teacher_features/sam2/",
                     "teacher.model_path=weights/sam2.1_hiera_base_plus.pt", *small,
                     "--limit", "4", "--batch-size", "4", "--no-progress"]) == 0
    assert (
        "Using SAM2 teacher model: sam2.1_hiera_base_plus (variant auto: read from weights/sam2.1_hiera_base_plus.pt) "
        "on cpu in float32" in caplog.text
    )
    with h5py.File(tmp_path / "teacher_features" / "sam2" / "train2017.h5", "r") as f:
        fp = json.loads(f.attrs["fingerprint"])
    assert (fp["variant"], fp["dtype"]) == ("sam2.1_hiera_base_plus", "float32")
    design = REPO / "configs" / "experiments" / "yolov8_sam2_coco.yaml"
    argv = ["--config", str(design), "--backbone", "yolov8", "--teacher", "sam2", "--dataset", "coco128",
            "teachers.sam2.input_size=64", "data.limit=4", "data.img_size=64", "data.batch_size=2", "train.epochs=1",
            "train.warmup_iters=1", "eval.batch_size=4", f"work_dir={tmp_path / 'runs'}", "--no-progress"]
    assert train_tool.main(argv) == 0  # the cache matched: the run's `auto` fingerprint is the cache tool's
    (run,) = (tmp_path / "runs" / "yolov8_sam2_coco_detection").iterdir()
    (epoch,) = json.loads((run / "metrics.json").read_text())["epochs"]
    assert epoch["teacher_batches"]["sam2"]["offline"] > 0 and epoch["train"]["loss_feat_distill_sam2"] > 0
    log = (run / "train.log").read_text()
    assert "on cpu (train.device=auto), bf16 autocast off (train.amp=auto)" in log
