"""The readable text file of a test run: every metric, scalars first, then one table per
dict-valued metric (:func:`write_test_results`, ``tools/test.py``)."""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, List, Mapping, Optional, Union

import numpy as np
import torch

from vfmkd.utils.atomic_files import write_text


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.size == 1):
        return v.item()
    return v


def _fmt(v: Any) -> str:
    v = _scalar(v)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return "nan" if math.isnan(v) else f"{float(v):.4f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return "[" + ", ".join(_fmt(x) for x in np.asarray(v.tolist()).reshape(-1).tolist()) + "]"
    return str(v)


def _table(name: str, rows: Mapping[Any, Any]) -> List[str]:
    """name -> value (one value column) or, when every value is a flat dict, name -> {column: value}
    (a column per inner key, ``-`` where a row lacks it)."""
    keys = [str(k) for k in rows]
    width = max([len(k) for k in keys] + [len("name")])
    lines = [f"[{name}] ({len(rows)} rows)"]
    if rows and all(isinstance(v, Mapping) for v in rows.values()):
        cols: List[str] = []
        for v in rows.values():
            cols += [str(c) for c in v if str(c) not in cols]
        by_name = [{str(a): b for a, b in v.items()} for v in rows.values()]
        cells = [[_fmt(r.get(c)) for c in cols] for r in by_name]
        widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(cols)]
        lines.append("  " + "name".ljust(width) + "  " + "  ".join(c.rjust(wd) for c, wd in zip(cols, widths)))
        for k, r in zip(keys, cells):
            lines.append("  " + k.ljust(width) + "  " + "  ".join(x.rjust(wd) for x, wd in zip(r, widths)))
    else:
        lines += ["  " + k.ljust(width) + "  " + _fmt(v) for k, v in zip(keys, rows.values())]
    return lines


def _depth(x: Any) -> int:
    """0 for a plain value, 1 for a mapping of plain values, 2 for a mapping of such mappings, ..."""
    if not isinstance(x, Mapping):
        return 0
    return 1 + max([_depth(v) for v in x.values()] + [0])


def _section(name: str, rows: Mapping[Any, Any]) -> List[str]:
    """One table for a flat dict or a dict of flat dicts; otherwise the plain values as one table
    and a section per nested dict (``name/key``)."""
    if _depth(rows) <= 1 or all(_depth(v) == 1 for v in rows.values()):
        return ["", *_table(name, rows)]
    plain = {k: v for k, v in rows.items() if not isinstance(v, Mapping)}
    lines = ["", *_table(name, plain)] if plain else []
    for k, v in rows.items():
        if isinstance(v, Mapping):
            lines += _section(f"{name}/{k}", v)
    return lines


def format_test_results(metrics: Mapping[str, Any], header: Optional[Mapping[str, Any]] = None) -> str:
    """The text of :func:`write_test_results`."""
    lines = ["vfmkd test results", "=================="]
    for k, v in (header or {}).items():
        lines.append(f"{k}: {_fmt(v)}")
    if header:
        lines.append("")
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    if scalars:
        width = max(len(str(k)) for k in scalars)
        lines.append("metrics")
        lines += [f"  {str(k).ljust(width)}  {_fmt(v)}" for k, v in scalars.items()]
    for name, rows in metrics.items():
        if isinstance(rows, Mapping) and rows:  # an empty table (no feature losses: no fidelity) says nothing
            lines += _section(str(name), rows)
    return "\n".join(lines) + "\n"


def write_test_results(path: Union[str, Path], metrics: Mapping[str, Any],
                       header: Optional[Mapping[str, Any]] = None) -> Path:
    """A readable text file of every metric: scalars first (``name  value``, floats to 4 decimals),
    then one table per dict-valued metric (per class: ``class  value``; class -> {metric: value}
    gets a column per metric; deeper nesting one table per inner dict). ``header`` (e.g. checkpoint,
    dataset, split) is listed first. Written atomically; returns ``path``."""
    return write_text(path, format_test_results(metrics, header))
