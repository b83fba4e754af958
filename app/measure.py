"""The measurement table: per-label size (``medseg.inference.postprocess.measure``) and, with a ground truth,
Dice and HD95 (``medseg.metrics.per_label_metrics``). Returns a DataFrame; the page only displays it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from medseg.inference.postprocess import measure
from medseg.io import Scan
from medseg.metrics import per_label_metrics


def physical_units(scan: Scan) -> bool:
    """False for 2D images whose file states no pixel size (most PNG/JPG): sizes are then in pixels."""
    return scan.is_volume or bool(scan.meta.get("spacing_from_file", True))


def size_column(scan: Scan) -> str:
    if scan.is_volume:
        return "Volume (mL)"
    return "Area (mm²)" if physical_units(scan) else "Area (px²)"


def measurement_table(
    scan: Scan,
    mask: np.ndarray,
    labels: dict[int, dict[str, str]],
    truth: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per foreground label: name, voxel count, objects, area or volume, and Dice/HD95 vs ``truth``.

    ``mask`` and ``truth`` are class indices on ``scan``'s grid. HD95 is in mm (pixels without a stated size);
    NaN where a label is missing from either side.
    """
    sizes = measure(mask, scan.geometry, labels)
    unit_col = size_column(scan)
    count_col = "Voxels" if scan.is_volume else "Pixels"
    rows = []
    for index, entry in sizes.items():
        size = entry["volume_ml"] if scan.is_volume else entry["area_mm2"]
        rows.append({"Label": entry["name"] or f"label {index}", count_col: entry["voxels"],
                     "Objects": entry["components"], unit_col: size})
    table = pd.DataFrame(rows, index=list(sizes))
    if truth is not None and len(table):
        num_classes = max(max(labels) + 1, int(mask.max()) + 1, int(truth.max()) + 1)
        metrics = per_label_metrics(mask, truth, num_classes, spacing=scan.geometry.spacing_zyx)
        truth_sizes = measure(truth, scan.geometry, labels)
        hd_col = "HD95 (mm)" if physical_units(scan) else "HD95 (px)"
        table[f"Truth {unit_col[0].lower()}{unit_col[1:]}"] = [
            truth_sizes[i]["volume_ml" if scan.is_volume else "area_mm2"] for i in table.index
        ]
        table["Dice"] = [metrics.get(i, {}).get("dice", math.nan) for i in table.index]
        table[hd_col] = [metrics.get(i, {}).get("hd95", math.nan) for i in table.index]
    return table
