"""LoRA files from other tools (SAMed, PEFT) load into the lora_sam teacher: format detected from the keys,
rank read from the tensors, alpha from the file; the same adapters give the same features as vfmkd's layout."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from coco_fixture_sets import coco_image
from PIL import Image
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from small_sam import small_window_sam

from vfmkd.core.errors import CheckpointError
from vfmkd.engine.commands import prepare_features
from vfmkd.teachers.lora_formats import read_lora_file
from vfmkd.teachers.lora_sam_teacher import LoraSamTeacher, lora_key
from vfmkd.utils.cli import run_tool

SIZE, RANK, BLOCKS, DIM = 32, 2, 12, 768  # SAMed's rank r per q and v: vfmkd's fused rank is 2r


def _qv_adapters(seed=3, blocks=BLOCKS, dim=DIM, rank=RANK):
    """SAMed's w_As / w_Bs lists (q then v of every block): A (r, C) as nn.Linear(C, r), B (C, r) as nn.Linear(r, C)."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(rank, dim, generator=g) * 0.05 for _ in range(2 * blocks)],
            [torch.randn(dim, rank, generator=g) * 0.05 for _ in range(2 * blocks)])


def _fused(a_list, b_list):
    """The same adapters as one qkv LoRA of rank 2r: A = [A_q; A_v], B = [[B_q, 0], [0, 0], [0, B_v]]."""
    sd = {}
    for i in range(len(a_list) // 2):
        b = torch.zeros(3 * DIM, 2 * RANK)
        b[:DIM, :RANK], b[2 * DIM:, RANK:] = b_list[2 * i], b_list[2 * i + 1]
        sd[lora_key(i, "A")], sd[lora_key(i, "B")] = torch.cat([a_list[2 * i], a_list[2 * i + 1]]), b
    return sd


@pytest.fixture(scope="module")
def decoder_state():
    """A prompt encoder and mask decoder built as segment-anything's build_sam builds them (random weights)."""
    torch.manual_seed(5)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    return {**{f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()},
            **{f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()}}


@pytest.fixture(scope="module")
def files(decoder_state, tmp_path_factory):
    """One set of adapters written in the three layouts; SAMed's with its prompt encoder and mask decoder."""
    root = tmp_path_factory.mktemp("lora")
    a_list, b_list = _qv_adapters()
    fused = _fused(a_list, b_list)
    (root / "vfmkd").mkdir()
    torch.save(fused, root / "vfmkd" / "lora.pt")  # a plain file says no alpha
    samed = {f"w_a_{i:03d}": a for i, a in enumerate(a_list)} | {f"w_b_{i:03d}": b for i, b in enumerate(b_list)}
    samed |= decoder_state
    torch.save(samed, root / "samed.pth")
    (root / "peft").mkdir()
    torch.save({f"base_model.model.{k}.weight": v for k, v in fused.items()}, root / "peft" / "adapter_model.bin")
    (root / "peft" / "adapter_config.json").write_text(json.dumps({"r": 2 * RANK, "lora_alpha": 2 * RANK,
                                                                   "target_modules": ["qkv"]}))
    return {"vfmkd": root / "vfmkd" / "lora.pt", "samed": root / "samed.pth",
            "peft": root / "peft" / "adapter_model.bin"}


def test_peft_and_vfmkd_files_read_as_the_same_lora(files):
    vfmkd, peft = read_lora_file(files["vfmkd"]), read_lora_file(files["peft"])
    assert (vfmkd.format, peft.format) == ("vfmkd", "peft")
    assert (vfmkd.rank, vfmkd.alpha, peft.rank, peft.alpha) == (2 * RANK, None, 2 * RANK, 2 * RANK)  # alpha: its json
    assert sorted(peft.lora) == sorted(vfmkd.lora)
    for key, value in vfmkd.lora.items():
        assert torch.equal(peft.lora[key], value)


def test_a_samed_file_gives_samed_features_and_its_own_decoder(files, decoder_state):
    """The reference is SAMed's own arithmetic on the base: q += x A_q^T B_q^T, v += x A_v^T B_v^T per block (the
    merged delta taken back out of the teacher's qkv weights gives the base)."""
    image = np.array(Image.open(coco_image(0)).convert("RGB"))
    with small_window_sam():
        teacher = LoraSamTeacher(init="random", input_size=SIZE, lora_checkpoint=str(files["samed"]))
    assert (teacher.lora_rank, teacher.lora_alpha) == (RANK, float(RANK))  # rank from the tensors; SAMed: no scaling
    for key, value in teacher.sam.state_dict().items():  # its decoder and prompt encoder are the file's
        if key in decoder_state:
            assert torch.equal(value, decoder_state[key]), key
    feats, _ = teacher.extract_features([image])
    a_list, b_list = _qv_adapters()
    fused = _fused(a_list, b_list)

    def samed_hook(i):
        def hook(module, inp, out):
            out = out.clone()
            out[..., :DIM] += inp[0] @ a_list[2 * i].T @ b_list[2 * i].T
            out[..., 2 * DIM:] += inp[0] @ a_list[2 * i + 1].T @ b_list[2 * i + 1].T
            return out
        return hook

    blocks = teacher.sam.image_encoder.blocks
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            blk.attn.qkv.weight -= fused[lora_key(i, "B")] @ fused[lora_key(i, "A")]
    hooks = [blk.attn.qkv.register_forward_hook(samed_hook(i)) for i, blk in enumerate(blocks)]
    try:
        want, _ = teacher.extract_features([image])
    finally:
        for h in hooks:
            h.remove()
    for key in ("trunk", "image_embeddings"):
        torch.testing.assert_close(feats[key], want[key], atol=1e-4, rtol=1e-4)


def _write(tmp_path, sd, name="x.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize("make, pattern", [
    # a SAMed file trained on a vit_l (24 blocks of 1024) under a vit_b base: the model size is named
    (lambda: {f"w_{ab}_{i:03d}": t for ab, ts in zip("ab", _qv_adapters(blocks=24, dim=1024))
              for i, t in enumerate(ts)},
     r"does not match the base SAM vit_b.*trained on a SAM vit_l"),
    (lambda: {f"w_a_{i:03d}": torch.zeros(2, DIM) for i in range(3)} | {f"w_b_{i:03d}": torch.zeros(DIM, 2)
                                                                      for i in range(3)},
     r"q and v of every image-encoder block"),
    (lambda: {f"base_model.model.{k}.weight": v for k, v in _fused(*_qv_adapters()).items()}
     | {"base_model.model.image_encoder.blocks.0.attn.proj.lora_A.weight": torch.zeros(4, DIM)},
     r"(?s)not qkv LoRA matrices.*attn\.proj.*merges LoRA on attn.qkv only"),
    (lambda: {"encoder.layer.0.weight": torch.zeros(2, 2)},
     r"no LoRA matrices for SAM's qkv layers in any known format"),
])
def test_files_of_another_size_or_layout_are_named(make, pattern, tmp_path):
    with pytest.raises(CheckpointError) as err:
        LoraSamTeacher(init="random", input_size=SIZE, variant="vit_b", lora_checkpoint=_write(tmp_path, make()))
    assert re.search(pattern, str(err.value)), str(err.value)


def test_a_file_of_another_rank_exits_2_with_one_message(files, tmp_path, caplog):
    args = ["--teacher", "lora_sam", "--limit", "1", "--output", str(tmp_path / "cache"), "--no-progress",
            f"teacher.lora_checkpoint={files['samed']}", "teacher.lora_rank=4", "teacher.init=random",
            f"teacher.input_size={SIZE}"]
    assert run_tool(prepare_features.main, args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "has LoRA rank 2" in errors[0] and "set teacher.lora_rank=2" in errors[0], errors
