"""A channel that changed type: its groups merged into the original's layout at close.

While a file is written, each (type, shape) of a channel has its own complete
group: ``/data/<channel>`` for the first, ``/data/<channel>@2``, ``@3``...
for later ones (``h5.file``: appending never moves a dataset, so a killed
file is always one of those consistent states). At close the groups are
merged into the layout the original writer produced, which its readers
expect:

* ``/data/<channel>/data``: the NEWEST type (the type of the channel's last
  present value), every row; rows whose value had another type read 0.
* ``/data/<channel>/data(1)``, ``data(2)``, ...: the older types, oldest
  first, each cut after the row where the next type took over (the original
  cut them there when it renamed them; nothing present is cut: by
  construction only absent rows lie beyond).
* ``is_data_present``, ``pulse_id``, ``timestamp``: one of each for all
  rows, whichever type the row's value had.
* ``data_variant`` (only in such a channel): per row, which dataset holds
  the value, ``0`` for ``data`` and ``n`` for ``data(n)``. The original
  needed no such map because it started a new dataset at every change; here
  a value of an earlier type goes back into that type's dataset (a channel
  flipping between two types costs two datasets, not one per flip), so
  row ranges alone do not say where a row's value is.

:func:`plan_merge` decides (pure, numpy only); :func:`merge_variants` moves
the links. Moving a link and shrinking a dataset rewrite metadata only: the
merge costs what reading and writing the per-row presence does.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

__all__ = ["MergePlan", "plan_merge", "merge_variants", "older_dataset_name", "VARIANT_MAP_NAME"]

logger = logging.getLogger(__name__)

VARIANT_MAP_NAME = "data_variant"
# Group attributes of a writing-layout variant group that describe the group, not its type.
_GROUP_ONLY_ATTRIBUTES = ("channel", "variant", "variants")


def older_dataset_name(number: int) -> str:
    """``data(1)`` for the oldest type, ``data(2)`` for the next (the original's names)."""
    return f"data({number})"


@dataclass(frozen=True)
class MergePlan:
    """Where each variant (by creation index) goes, decided from the rows each holds.

    ``order``: variant indices, oldest first, the newest last (it becomes
    ``data``; the others ``data(1)``...). ``lengths``: rows each dataset keeps,
    in the same order. ``variant_of_row``: per row, the dataset number of
    its value (0 = ``data``, n = ``data(n)``; 0 where absent).
    """

    order: tuple[int, ...]
    lengths: tuple[int, ...]
    variant_of_row: np.ndarray


def plan_merge(present: Sequence[np.ndarray]) -> MergePlan:
    """The merge of a channel's variants from their per-row presence (one array per variant, equal lengths).

    The newest type is the one of the last present value; older ones are
    ordered by their last present value, so for a channel that changed
    A -> B -> C the numbering is the original's (A = ``data(1)``, B =
    ``data(2)``, C = ``data``). A variant with no present row left (a late
    stop removed them) counts as the oldest. Each older dataset keeps the
    rows up to the first row after its own last value where another type
    had one, which is where the original cut it.
    """
    if not present:
        raise ValueError("no variants to merge")
    rows = len(present[0])
    flags = [np.asarray(p).astype(bool) for p in present]
    if any(len(f) != rows for f in flags):
        raise ValueError("variants of one channel must have the same number of rows")
    last = [int(np.flatnonzero(f)[-1]) if f.any() else -1 for f in flags]
    # Oldest first; ties (variants never present) keep their creation order.
    order = tuple(sorted(range(len(flags)), key=lambda index: (last[index], index)))
    any_present = np.zeros(rows, dtype=bool)
    for f in flags:
        any_present |= f
    lengths = []
    for position, index in enumerate(order):
        if position == len(order) - 1:
            lengths.append(rows)
            continue
        others = any_present & ~flags[index]
        later = np.flatnonzero(others[last[index] + 1:])
        lengths.append(last[index] + 1 + int(later[0]) if len(later) else rows)
    numbers = {index: (0 if position == len(order) - 1 else position + 1) for position, index in enumerate(order)}
    variant_of_row = np.zeros(rows, dtype=np.min_scalar_type(len(order)))
    for index, f in enumerate(flags):
        variant_of_row[f] = numbers[index]
    return MergePlan(order, tuple(lengths), variant_of_row)


def merge_variants(data: h5py.Group, groups: Sequence[h5py.Group]) -> None:
    """Merge a channel's variant groups (creation order, the first is ``/data/<channel>``) in place.

    Afterwards only ``groups[0]`` exists, in the layout of the module
    docstring; its attributes describe ``data`` (the newest type) and every
    data dataset carries the attributes of its own type.
    """
    base = groups[0]
    present = [group["is_data_present"][()] for group in groups]
    plan = plan_merge(present)
    merged_present = np.zeros(len(present[0]), dtype="u1")
    merged_pulse_id = np.zeros(len(present[0]), dtype="<i8")
    merged_timestamp = np.zeros(len(present[0]), dtype="<i8")
    for group, flags in zip(groups, present):
        rows = flags.astype(bool)
        merged_present[rows] = 1
        merged_pulse_id[rows] = group["pulse_id"][()][rows]
        merged_timestamp[rows] = group["timestamp"][()][rows]
    type_attributes = [{key: value for key, value in group.attrs.items() if key not in _GROUP_ONLY_ATTRIBUTES}
                       for group in groups]

    # Every data dataset to a temporary name in the base group first, so
    # that no name is taken twice whatever the order is.
    staged = []
    for index, group in enumerate(groups):
        temporary = f"{base.name}/.merging{index}"
        data.file.move(f"{group.name}/data", temporary)
        staged.append(temporary)
    newest = plan.order[-1]
    for position, (index, length) in enumerate(zip(plan.order, plan.lengths)):
        name = "data" if index == newest else older_dataset_name(position + 1)
        target = f"{base.name}/{name}"
        data.file.move(staged[index], target)
        dataset = data.file[target]
        if dataset.shape[0] != length:
            dataset.resize(length, axis=0)
        for key, value in type_attributes[index].items():
            dataset.attrs[key] = value
    base["is_data_present"][...] = merged_present
    base["pulse_id"][...] = merged_pulse_id
    base["timestamp"][...] = merged_timestamp
    base.create_dataset(VARIANT_MAP_NAME, data=plan.variant_of_row, maxshape=(None,),
                        chunks=(max(1, min(len(plan.variant_of_row), 1024)),))
    for key in list(base.attrs):
        if key not in type_attributes[newest]:
            del base.attrs[key]
    for key, value in type_attributes[newest].items():
        base.attrs[key] = value
    for group in groups[1:]:
        del data[group.name.rsplit("/", 1)[1]]
    logger.info("%s: %d types merged, the newest in data", base.name, len(groups))
