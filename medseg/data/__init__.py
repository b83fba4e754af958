"""Datalists, splits, preprocessing and datasets."""

from medseg.data.datalist import Case, discover_cases, read_datalist, scan_stem
from medseg.data.splits import load_or_make_splits, make_folds, train_val_ids

__all__ = ["Case", "discover_cases", "read_datalist", "scan_stem", "load_or_make_splits", "make_folds", "train_val_ids"]
