"""Per-head training targets from a manifest's ``labels`` column, through the taxonomy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from livelens.errors import ConfigError
from livelens.taxonomy import Taxonomy


def target_key(group: str) -> str:
    """The batch column holding a group's target."""
    return f"t_{group}"


def covered_groups(tax: Taxonomy, label_counts: Mapping[str, int] | Iterable[str]) -> list[str]:
    """Groups (in taxonomy order) with at least one positive label in the data.

    A head with no positive example would only learn "always negative", so the job trains
    just the groups the dataset covers.

    Raises:
        ConfigError: A label is not in the taxonomy (the data was built for another version).
    """
    names = [n for n, c in label_counts.items() if c > 0] if isinstance(label_counts, Mapping) else list(label_counts)
    found = set()
    for n in names:
        if n not in tax.labels and not tax.is_negative(n):
            raise ConfigError(f"label {n!r} in the data is not in taxonomy {tax.version} ({tax.source})")
        try:
            group, index = tax.class_of(n)
        except KeyError:  # an inner node (level 1/2) of the hierarchy: not a predicted class
            continue
        if index > 0:
            found.add(group)
    return [g for g in tax.groups if g in found]


def targets_from_labels(labels: Sequence[Sequence[str]], tax: Taxonomy, groups: Sequence[str]) -> dict[str, np.ndarray]:
    """Targets per group for a batch of label lists.

    Exclusive groups give a class index (the negative, 0, when none of the group's labels is
    present); multilabel groups give a multi-hot vector over the group's classes, with the
    negative set exactly when no positive is. Labels of other groups are ignored.

    Returns:
        ``{target_key(group): array}``: int64 (N,) or float32 (N, K).
    """
    out: dict[str, np.ndarray] = {}
    for g in groups:
        grp = tax.groups[g]
        k = len(grp.classes)
        if grp.kind == "exclusive":
            out[target_key(g)] = np.zeros(len(labels), dtype=np.int64)
        else:
            out[target_key(g)] = np.zeros((len(labels), k), dtype=np.float32)
    wanted = set(groups)
    for i, row in enumerate(labels):
        for name in row:
            try:
                g, idx = tax.class_of(name)
            except KeyError:
                continue
            if g not in wanted or idx == 0:
                continue
            t = out[target_key(g)]
            if t.ndim == 1:
                t[i] = idx
            else:
                t[i, idx] = 1.0
    for g in groups:
        t = out[target_key(g)]
        if t.ndim == 2:
            t[:, 0] = (t[:, 1:].sum(1) == 0).astype(np.float32)
    return out
