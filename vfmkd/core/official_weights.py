"""Official teacher checkpoints: where to download them and the sha256 that proves a file is intact.

The sha256 values and sizes are pinned so a truncated or swapped download is caught before it is
loaded. Sources (all agree): computational-cell-analytics/micro-sam ``micro_sam/util.py``
``_CHECKSUMS`` and several independent public download manifests that pin sha256 and byte size
of the same files. A value of ``None`` would mean "not pinned" and the downloader says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from vfmkd.core.errors import ConfigError, did_you_mean

_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class OfficialWeights:
    """One downloadable checkpoint: ``name`` is what ``tools/download_weights.py --model`` takes."""

    name: str
    family: str
    variant: str
    url: str
    filename: str
    sha256: Optional[str]
    size_bytes: Optional[int] = None
    #: small files of the same release fetched from the URL's folder into the file's folder (e.g. the
    #: ``config.json`` a Hugging Face model folder needs beside its weights); not pinned
    companions: Tuple[str, ...] = ()

    @property
    def download_command(self) -> str:
        return f"python tools/download_weights.py --model {self.name}"


def _sam(variant: str, filename: str, sha256: str, size_bytes: int) -> OfficialWeights:
    return OfficialWeights(
        name=f"sam_{variant}",
        family="sam",
        variant=variant,
        url=_SAM_BASE_URL + filename,
        filename=filename,
        sha256=sha256,
        size_bytes=size_bytes,
    )


OFFICIAL_WEIGHTS: Dict[str, OfficialWeights] = {
    w.name: w
    for w in (
        _sam("vit_b", "sam_vit_b_01ec64.pth",
             "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
        _sam("vit_l", "sam_vit_l_0b3195.pth",
             "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
        _sam("vit_h", "sam_vit_h_4b8939.pth",
             "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
    )
}


# DINO (v1) and DINOv2 backbones: Meta's official "backbone only" .pth files (torch.hub's URLs).
# DINOv2 sha256 and sizes: finegrain-ai/refiners (src/refiners/conversion/convert_dinov2.py pins all
# eight originals), each cross-checked with at least one independent public manifest that pins the
# same file (hash, and byte size where given). DINO v1: only ViT-B/16 is pinned by two independent
# manifests (sha256 + size); the other three are not pinned (None) and the downloader says so.
_DINO_BASE_URL = "https://dl.fbaipublicfiles.com/dino/"
_DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2/"


def _dino(variant: str, stem: str, sha256: Optional[str], size_bytes: Optional[int]) -> OfficialWeights:
    return OfficialWeights(name=f"dino_{variant}", family="dino", variant=variant,
                           url=f"{_DINO_BASE_URL}{stem}/{stem}.pth", filename=f"{stem}.pth",
                           sha256=sha256, size_bytes=size_bytes)


def _dinov2(variant: str, sha256: str, size_bytes: int) -> OfficialWeights:
    arch = variant.split("_")[0]  # vits14_reg4 lives in the dinov2_vits14/ folder
    filename = f"dinov2_{variant}_pretrain.pth"
    return OfficialWeights(name=f"dinov2_{variant}", family="dinov2", variant=variant,
                           url=f"{_DINOV2_BASE_URL}dinov2_{arch}/{filename}", filename=filename,
                           sha256=sha256, size_bytes=size_bytes)


OFFICIAL_WEIGHTS.update({
    w.name: w
    for w in (
        _dino("vits16", "dino_deitsmall16_pretrain", None, None),
        _dino("vitb16", "dino_vitbase16_pretrain",
              "bf34ad0f424b9029b593e8dc3ed553bf26e88bcba0d32bf3e62a6209cb64c85e", 343_242_485),
        _dino("vits8", "dino_deitsmall8_pretrain", None, None),
        _dino("vitb8", "dino_vitbase8_pretrain", None, None),
        _dinov2("vits14", "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9", 88_283_115),
        _dinov2("vitb14", "0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73", 346_378_731),
        _dinov2("vitl14", "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428", 1_217_586_395),
        _dinov2("vitg14", "baf8467e50af277596bbbafa06887c177ee899ab46033649c383577d7e9309d3", 4_546_108_579),
        _dinov2("vits14_reg4", "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb", 88_291_785),
        _dinov2("vitb14_reg4", "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71", 346_393_545),
        _dinov2("vitl14_reg4", "36e4deffbaef061a2576705b0c36f93621e2ae20bf6274694821b0b492551b51", 1_217_607_321),
        _dinov2("vitg14_reg4", "746ecb8c6301c645c5c855be91687d274587d6e48fdaec4a729753160b34a283", 4_546_140_349),
    )
})


# SAM2 (072824) and SAM2.1 (092824) checkpoints, {"model": state_dict}; name = variant = file stem.
# sha256 and sizes: the Git LFS pointers (oid sha256 + size) of the same files on Hugging Face, each
# seen in at least two independent uploads, Meta's own where found: SAM2.1 tiny camenduru/sam2-1-hiera
# + Promethe-us/sam2 + lniki/track-anything-annotate; small facebook/sam2.1-hiera-small + camenduru;
# base_plus camenduru + Promethe-us; large camenduru + tictag-io-demo + wondervictor/Mask-Adapter.
# SAM2 tiny/small/base_plus facebook/sam2-hiera-* + merve/fffiloni copies; large merve (HF staff) +
# fffiloni + sahirp. Every size also equals a public manifest that byte-counts the dl.fbaipublicfiles.com
# downloads (sam2.1: 156008466 / 184416285 / 323606802 / 898083611 bytes).
_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"


def _sam2(variant: str, sha256: Optional[str], size_bytes: Optional[int]) -> OfficialWeights:
    release = "092824" if variant.startswith("sam2.1_") else "072824"
    return OfficialWeights(name=variant, family="sam2", variant=variant, url=f"{_SAM2_BASE_URL}{release}/{variant}.pt",
                           filename=f"{variant}.pt", sha256=sha256, size_bytes=size_bytes)


OFFICIAL_WEIGHTS.update({
    w.name: w
    for w in (
        _sam2("sam2.1_hiera_tiny", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156_008_466),
        _sam2("sam2.1_hiera_small", "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184_416_285),
        _sam2("sam2.1_hiera_base_plus", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
              323_606_802),
        _sam2("sam2.1_hiera_large", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898_083_611),
        _sam2("sam2_hiera_tiny", "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125", 155_906_050),
        _sam2("sam2_hiera_small", "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3", 184_309_650),
        _sam2("sam2_hiera_base_plus", "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", 323_493_298),
        _sam2("sam2_hiera_large", "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b", 897_952_466),
    )
})


# DINOv3 (Meta, DINOv3 License): the backbone files of Meta's release; their URLs are handed out per user by
# the access form (https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/), so `url` is that
# form's page and the downloader prints what to fetch by hand. The 8 hex digits in each name are the first
# digits of its sha256 (Meta's naming); the full sums are not pinned here (None).
_DINOV3_FORM = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


def _dinov3(family: str, variant: str, stem: str) -> OfficialWeights:
    return OfficialWeights(name=f"{family}_{variant}", family=family, variant=variant, url=_DINOV3_FORM,
                           filename=f"{stem}.pth", sha256=None)


# C-RADIO (NVIDIA Open Model License): model.safetensors of NVIDIA's Hugging Face repos, saved under a name
# per variant (every repo calls its file model.safetensors). Not pinned (None).
def _radio(variant: str, repo: str) -> OfficialWeights:
    return OfficialWeights(name=variant, family="radio", variant=variant,
                           url=f"https://huggingface.co/nvidia/{repo}/resolve/main/model.safetensors",
                           filename=f"{variant}.safetensors", sha256=None)


OFFICIAL_WEIGHTS.update({
    w.name: w
    for w in (
        _dinov3("dinov3", "vits16", "dinov3_vits16_pretrain_lvd1689m-08c60483"),
        _dinov3("dinov3", "vits16plus", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa"),
        _dinov3("dinov3", "vitb16", "dinov3_vitb16_pretrain_lvd1689m-73cec8be"),
        _dinov3("dinov3", "vitl16", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd"),
        _dinov3("dinov3", "vith16plus", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5"),
        _dinov3("dinov3_convnext", "tiny", "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb"),
        _dinov3("dinov3_convnext", "small", "dinov3_convnext_small_pretrain_lvd1689m-296db49d"),
        _dinov3("dinov3_convnext", "base", "dinov3_convnext_base_pretrain_lvd1689m-801f2ba9"),
        _dinov3("dinov3_convnext", "large", "dinov3_convnext_large_pretrain_lvd1689m-61fa432d"),
        _radio("c-radio_v3-b", "C-RADIOv3-B"),
        _radio("c-radio_v3-l", "C-RADIOv3-L"),
        _radio("c-radio_v3-h", "C-RADIOv3-H"),
        _radio("c-radio_v3-g", "C-RADIOv3-g"),
        _radio("c-radio_v4-so400m", "C-RADIOv4-SO400M"),
        _radio("c-radio_v4-h", "C-RADIOv4-H"),
    )
})


# Perception Encoder core (Meta, Apache-2.0): the CLIP checkpoints of Meta's Hugging Face repos. Not pinned (None).
def _pe(variant: str, stem: str) -> OfficialWeights:
    return OfficialWeights(name=f"pe_core_{variant}", family="pe_core", variant=variant,
                           url=f"https://huggingface.co/facebook/{stem}/resolve/main/{stem}.pt",
                           filename=f"{stem}.pt", sha256=None)


OFFICIAL_WEIGHTS.update({
    w.name: w
    for w in (
        _pe("tiny16", "PE-Core-T16-384"), _pe("small16", "PE-Core-S16-384"), _pe("base16", "PE-Core-B16-224"),
        _pe("large14", "PE-Core-L14-336"), _pe("gigantic14", "PE-Core-G14-448"),
    )
})


# SAM 3 (Meta, SAM License): the gated Hugging Face release facebook/sam3, a folder of config.json + model.safetensors
# (the sam3 teacher reads both, the downloader fetches both; gated: accept the licence on the model page and set
# HF_TOKEN). Not pinned (None).
OFFICIAL_WEIGHTS["sam3"] = OfficialWeights(
    name="sam3", family="sam3", variant="sam3",
    url="https://huggingface.co/facebook/sam3/resolve/main/model.safetensors",
    filename="sam3/model.safetensors", sha256=None, companions=("config.json",))


def weights_for(family: str, variant: str) -> OfficialWeights:
    """The official checkpoint of ``family``/``variant`` (e.g. ``"sam", "vit_b"``)."""
    for w in OFFICIAL_WEIGHTS.values():
        if w.family == family and w.variant == variant:
            return w
    known = [f"{w.family}/{w.variant}" for w in OFFICIAL_WEIGHTS.values()]
    raise ConfigError(
        f"no official weights for {family}/{variant}.{did_you_mean(f'{family}/{variant}', known)} "
        f"Known: {', '.join(known)}."
    )


def default_checkpoint_path(name: str, weights_dir: Union[str, Path] = "weights") -> Path:
    """Where the downloader puts ``name`` (e.g. ``weights/sam_vit_b_01ec64.pth``)."""
    if name not in OFFICIAL_WEIGHTS:
        raise ConfigError(
            f"unknown weights '{name}'.{did_you_mean(name, OFFICIAL_WEIGHTS)} "
            f"Known: {', '.join(OFFICIAL_WEIGHTS)}."
        )
    return Path(weights_dir) / OFFICIAL_WEIGHTS[name].filename
