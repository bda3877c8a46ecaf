"""Official checkpoint layouts of the timm-built teachers, written from randomly initialised timm models
(no weights can be downloaded): the inverse of timm's converters. Meta's DINOv3 ``.pth`` keys
(``storage_tokens``, ``ls1.gamma``, fused ``qkv`` with zero biases and ``bias_mask``, ``mask_token``,
``rope_embed.periods``; ConvNeXt ``downsample_layers`` / ``stages.i.j.dwconv``), NVIDIA's C-RADIO
``model.safetensors`` keys (``radio_model.model.patch_generator.*``, ``radio_model.summary_idxs``)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from vfmkd.teachers import RadioTeacher


def to_meta_dinov3(model: torch.nn.Module) -> dict:
    """Meta's ``dinov3_vit*_pretrain_*.pth`` layout from timm's ``vit_*_patch16_dinov3`` model."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
        if k.endswith("attn.qkv.weight"):  # the released S/B/L files carry (zero) qkv biases and the k mask
            dim = v.shape[0]
            out[k.replace("weight", "bias")] = torch.zeros(dim)
            out[k.replace("weight", "bias_mask")] = torch.cat([torch.ones(dim // 3), torch.zeros(dim // 3),
                                                               torch.ones(dim // 3)])
    c = out["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, c)
    out["rope_embed.periods"] = torch.ones(c // model.blocks[0].attn.num_heads // 4)
    return out


def to_meta_convnext(model: torch.nn.Module) -> dict:
    """Meta's ``dinov3_convnext_*_pretrain_*.pth`` layout from timm's ``convnext_*`` (num_classes=0)."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("stem.", "downsample_layers.0.").replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        out[k.replace("head.norm.", "norm.")] = v.clone()
    return out


def to_nvidia_radio(model: torch.nn.Module, summary_idxs) -> dict:
    """NVIDIA's C-RADIO ``model.safetensors`` layout from timm's ``vit_*_radio_*`` model (bias-free patch
    projection, CPE grid, CLS tokens then registers in one table)."""
    sd, p = model.state_dict(), "radio_model.model."
    out = {p + "patch_generator.embedder.weight": sd["patch_embed.proj.weight"].flatten(1).clone(),
           p + "patch_generator.pos_embed": sd["pos_embed"].clone(),
           p + "patch_generator.cls_token.token": torch.cat([sd["cls_token"][0], sd["reg_token"][0]]).clone(),
           "radio_model.input_conditioner.norm_mean": torch.tensor(RadioTeacher.mean).view(3, 1, 1),
           "radio_model.input_conditioner.norm_std": torch.tensor(RadioTeacher.std).view(3, 1, 1),
           "radio_model.summary_idxs": torch.tensor(summary_idxs)}
    out.update({p + k: v.clone() for k, v in sd.items() if k.startswith("blocks.")})
    return out


def to_meta_pe(model: torch.nn.Module) -> dict:
    """Meta's ``PE-Core-*.pt`` layout (the CLIP model's ``visual.*``) from timm's ``vit_pe_core_*`` model."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "head.bias":  # PE's projection has no bias (timm's comes back zero)
            continue
        if k == "head.weight":
            out["visual.proj"] = v.t().clone()
            continue
        if k in ("attn_pool.q.weight", "attn_pool.q.bias"):
            kind = k.rsplit(".", 1)[1]
            out[f"visual.attn_pool.attn.in_proj_{kind}"] = torch.cat([v, model.state_dict()[f"attn_pool.kv.{kind}"]])
            continue
        if k.startswith("attn_pool.kv."):
            continue
        k2 = {"cls_token": "class_embedding", "pos_embed": "positional_embedding"}.get(k, k)
        v = v[0, 0] if k == "cls_token" else v[0] if k == "pos_embed" else v
        for a, b in (("patch_embed.proj", "conv1"), ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"),
                     ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"),
                     ("attn.proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("gamma_1", "ls_1.gamma"),
                     ("gamma_2", "ls_2.gamma"), ("attn_pool.latent", "attn_pool.probe"),
                     ("attn_pool.proj", "attn_pool.attn.out_proj"), ("attn_pool.norm", "attn_pool.layernorm")):
            k2 = k2.replace(a, b)
        if k2 in ("norm.weight", "norm.bias"):
            k2 = k2.replace("norm", "ln_post")
        out["visual." + k2] = v.clone()
    out["text.token_embedding.weight"] = torch.zeros(4, 8)  # the CLIP text tower rides along (ignored)
    return out


def write_official(name: str, model: torch.nn.Module, folder: Path) -> Path:
    """The official file of teacher ``name`` (``dinov3``, ``dinov3_convnext``, ``radio``) from its timm model."""
    if name == "radio":
        path = folder / "c-radio_v3-b.safetensors"
        save_file(to_nvidia_radio(model, [0, 2]), str(path))
        return path
    if name == "dinov3":
        path = folder / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
        torch.save(to_meta_dinov3(model), path)
        return path
    if name == "pe_core":
        path = folder / "PE-Core-T16-384.pt"
        torch.save(to_meta_pe(model), path)
        return path
    path = folder / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    torch.save(to_meta_convnext(model), path)
    return path
