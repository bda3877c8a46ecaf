"""An ablation of a recipe: the same experiment with each of its parts switched off, for the same
budget, each run in its own process (so its peak memory is its own), summarised as a Markdown table.

Parts (only those the experiment uses are ablated):
* ``fusion``: the neck's learnable fusion (``model.neck.fusion: learnable`` -> ``sum``);
* ``dsrl``: resolution distillation (``model.resolution_distill.enabled`` -> false);
* ``teachers``: every teacher and every loss entry that reads one (feature and output distillation).
"""
from __future__ import annotations

import copy
import multiprocessing
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from vfmkd.core.errors import ConfigError
from vfmkd.distillation.resolution import TERM_NAME as RESOLUTION_TERM
from vfmkd.engine.training.run_dir import write_json
from vfmkd.tasks.scoring.panoptic_metrics import PANOPTIC
from vfmkd.utils.atomic_files import write_text

Edit = Callable[[Dict[str, Any]], None]


def _no_fusion(cfg: Dict[str, Any]) -> None:
    cfg["model"]["neck"]["fusion"] = "sum"


def _drop_from_stages(cfg: Dict[str, Any], keep: Callable[[str], bool]) -> None:
    """Stages may name loss entries a variant removes."""
    for stage in cfg["train"].get("stages") or []:
        if stage.get("losses") is not None:
            stage["losses"] = [n for n in stage["losses"] if keep(n)]
        stage["weights"] = {n: w for n, w in (stage.get("weights") or {}).items() if keep(n)}


def _no_dsrl(cfg: Dict[str, Any]) -> None:
    cfg["model"]["resolution_distill"]["enabled"] = False
    _drop_from_stages(cfg, lambda n: n != RESOLUTION_TERM)


def _no_teachers(cfg: Dict[str, Any]) -> None:
    teachers = set(cfg.get("teachers", {}))
    losses = cfg["distillation"]["losses"]
    for name in [n for n, entry in losses.items() if entry.get("teacher") in teachers]:
        del losses[name]
    cfg["teachers"] = {}
    _drop_from_stages(cfg, lambda n: n in losses or n == RESOLUTION_TERM)


@dataclass(frozen=True)
class Part:
    """One switchable part of a recipe: ``present(cfg)`` says whether the experiment uses it, ``off``
    edits a config copy so it does not."""

    name: str
    present: Callable[[Mapping[str, Any]], bool]
    off: Edit


PARTS = (
    Part("fusion", lambda c: c["model"]["neck"].get("fusion") == "learnable", _no_fusion),
    Part("dsrl", lambda c: bool(c["model"].get("resolution_distill", {}).get("enabled")), _no_dsrl),
    Part("teachers", lambda c: any(e.get("teacher") for e in c["distillation"]["losses"].values()), _no_teachers),
)


def variants(cfg: Mapping[str, Any], parts: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """``full``, ``no_<part>`` for each present part, and ``base`` (all of them off) when there are
    two or more; ``parts`` restricts the ablated parts (an unknown or absent one is an error)."""
    known = {p.name: p for p in PARTS}
    present = [p for p in PARTS if p.present(cfg)]
    if parts:
        bad = [n for n in parts if n not in known]
        if bad:
            raise ConfigError(f"--parts {bad}: the parts are {', '.join(known)}")
        absent = [n for n in parts if known[n] not in present]
        if absent:
            raise ConfigError(f"--parts {absent}: this experiment does not use them (it uses "
                              f"{[p.name for p in present]})")
        present = [known[n] for n in parts]
    if not present:
        raise ConfigError("nothing to ablate: the experiment uses no learnable fusion, no resolution_distill and no "
                          "teacher")
    out = {"full": copy.deepcopy(dict(cfg))}
    for part in present:
        edited = copy.deepcopy(dict(cfg))
        part.off(edited)
        out[f"no_{part.name}"] = edited
    if len(present) > 1:
        base = copy.deepcopy(dict(cfg))
        for part in present:
            part.off(base)
        out["base"] = base
    return out


def _train_child(cfg: Dict[str, Any], queue: Any) -> None:
    """Runs in a fresh process: train ``cfg``, report its metrics and this process's peak memory."""
    import torch

    from vfmkd.engine.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, progress=False)
        start = time.time()
        metrics = trainer.fit()
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        queue.put({"metrics": metrics, "seconds": time.time() - start, "run_dir": str(trainer.run_dir),
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mib": peak_gpu})
    except Exception as exc:  # re-raised by the parent with the variant's name
        try:
            queue.put({"error": exc})
        except Exception:  # an exception that cannot be pickled
            queue.put({"error": RuntimeError(f"{type(exc).__name__}: {exc}")})


def run_variant(cfg: Dict[str, Any]) -> Dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_child, args=(cfg, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _last_val(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    return next((r["val"] for r in reversed(metrics["epochs"]) if "val" in r), {})


def panoptic_scores(val: Mapping[str, Any]) -> Mapping[str, Any]:
    """The panoptic numbers of a validation result: the instance + semantic merge's (``panoptic``), else
    those of the first head that reports PQ itself (a query panoptic head, ``rapsam_head``)."""
    if isinstance(val.get(PANOPTIC), Mapping):
        return val[PANOPTIC]
    return next((v for v in val.values() if isinstance(v, Mapping) and "PQ" in v), {})


def summary_row(name: str, result: Mapping[str, Any]) -> Dict[str, Any]:
    """PQ, PQ_th, PQ_st (:func:`panoptic_scores`), mIoU (the first head reporting it), the task metric that
    picks best.pt (``metric``: e.g. ``binary Dice``, and its best ``value``: Dice for a binary head, mAP50-95 for a
    detector), time, memory of one variant."""
    val = _last_val(result["metrics"])
    semantic = next((v for v in val.values() if isinstance(v, Mapping) and "mIoU" in v), {})
    picked = result["metrics"].get("best_metric") or {}
    panoptic = panoptic_scores(val)
    return {"variant": name, "PQ": panoptic.get("PQ"), "PQ_th": panoptic.get("PQ_things"),
            "PQ_st": panoptic.get("PQ_stuff"), "mIoU": semantic.get("mIoU"),
            "metric": f"{picked['head']} {picked['metric']}" if picked else None, "value": picked.get("value"),
            "train_s": result["seconds"], "peak_rss_mib": result["peak_rss_mib"],
            "peak_gpu_mib": result["peak_gpu_mib"],
            "run_dir": result["run_dir"]}


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    def num(v: Any, fmt: str) -> str:
        return "—" if v is None or v != v else format(v, fmt)

    lines = [f"# {title}", "", "| variant | task metric (best epoch) | PQ | PQ_th | PQ_st | mIoU | train time (s) "
             "| peak RSS (MiB) | peak GPU (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        task = f"{r.get('metric')} {num(r.get('value'), '.4f')}" if r.get("metric") else "—"
        lines.append(f"| {r['variant']} | {task} | {num(r['PQ'], '.4f')} | {num(r.get('PQ_th'), '.4f')} "
                     f"| {num(r.get('PQ_st'), '.4f')} | {num(r['mIoU'], '.4f')} "
                     f"| {num(r['train_s'], '.1f')} "
                     f"| {num(r['peak_rss_mib'], '.0f')} | {num(r['peak_gpu_mib'], '.0f')} |")
    lines += ["", "Each variant: the same experiment, epochs and data, trained in its own process (peak RSS is that "
              "process's). `no_<part>` switches one part off (`no_teachers`: the same budget without any teacher: "
              "does distillation help on this data?); `base` switches all of them off."]
    return "\n".join(lines) + "\n"


def ablate(cfg: Dict[str, Any], out_dir: Path, parts: Optional[Sequence[str]] = None,
           log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Train every variant of ``cfg`` under ``out_dir`` and write ``ablation.md`` and ``ablation.json`` there."""
    out_dir = Path(out_dir)
    rows: List[Dict[str, Any]] = []
    for name, variant in variants(cfg, parts).items():
        variant["experiment_name"] = f"{cfg['experiment_name']}_{name}"
        variant["work_dir"] = str(out_dir)
        log(f"ablation: training {name}")
        result = run_variant(variant)
        if "error" in result:  # the same exception class, so a user error still exits 2 naming the fix
            exc = result["error"]
            try:
                raised = type(exc)(f"ablation variant {name}: {exc}")
            except Exception:
                raised = RuntimeError(f"ablation variant {name}: {type(exc).__name__}: {exc}")
            raise raised from None
        rows.append(summary_row(name, result))
        write_json(out_dir / "ablation.json", rows)  # partial results survive a later failure
    write_text(out_dir / "ablation.md", markdown_table(rows, f"Ablation of {cfg['experiment_name']}"))
    return rows
