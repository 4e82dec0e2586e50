"""The label taxonomy: a three-level hierarchy, prediction groups and a decision policy.

Loaded from a YAML data file (``livelens/resources/taxonomy.yaml`` by default). Every
problem in the file is reported as a :class:`~livelens.errors.TaxonomyError` that names
the file and line, because a taxonomy edited by hand is the usual source of mistakes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from livelens.errors import TaxonomyError

Decision = Literal["pass", "review", "block"]
GroupKind = Literal["exclusive", "multilabel"]
Action = Literal["block", "review", "tag"]
MAX_LEVELS = 3
_DECISION_RANK = {"pass": 0, "review": 1, "block": 2}


@dataclass(frozen=True)
class Label:
    """One node of the hierarchy."""

    name: str
    parent: str | None
    level: int
    group: str
    zh: str = ""
    threshold: float = 0.8
    review: float = 0.5
    line: int = 0


@dataclass(frozen=True)
class Group:
    """One prediction head: the leaves under a level-1 category, plus an explicit negative.

    ``classes`` lists the negative class first, then the leaves in file order; it is the
    order of the head's outputs.
    """

    name: str
    kind: GroupKind
    negative: str
    threshold: float
    review: float
    action: Action
    classes: tuple[str, ...] = ()
    line: int = 0

    @property
    def positives(self) -> tuple[str, ...]:
        """The classes other than the negative."""
        return self.classes[1:]


@dataclass
class Taxonomy:
    """A loaded, validated taxonomy."""

    version: str
    labels: dict[str, Label]
    groups: dict[str, Group]
    source: str = "<memory>"
    children: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def leaves(self) -> list[str]:
        """Labels without children: what the models predict."""
        return [n for n in self.labels if not self.children.get(n)]

    def ancestors(self, name: str) -> list[str]:
        """The parent chain of ``name``, nearest first."""
        out, cur = [], self.labels[name].parent
        while cur is not None:
            out.append(cur)
            cur = self.labels[cur].parent
        return out

    def head_sizes(self) -> dict[str, int]:
        """Outputs per group head (negative included), in file order."""
        return {g.name: len(g.classes) for g in self.groups.values()}

    def class_of(self, name: str) -> tuple[str, int]:
        """The (group, output index) that predicts ``name`` (a leaf or a negative)."""
        for g in self.groups.values():
            if name in g.classes:
                return g.name, g.classes.index(name)
        raise KeyError(f"{name!r} is not a predicted class of taxonomy {self.version}")

    def is_negative(self, name: str) -> bool:
        """Whether ``name`` is some group's negative class."""
        return any(g.negative == name for g in self.groups.values())

    def decide(self, name: str, score: float) -> Decision:
        """The pass/review/block decision for one label's score, capped by its group's action."""
        if self.is_negative(name):
            return "pass"
        label = self.labels[name]
        action = self.groups[label.group].action
        if score >= label.threshold:
            decision: Decision = "block"
        elif score >= label.review:
            decision = "review"
        else:
            decision = "pass"
        if action == "tag":
            return "pass"
        if action == "review" and decision == "block":
            return "review"
        return decision

    def with_thresholds(self, overrides: Mapping[str, Mapping[str, float]]) -> Taxonomy:
        """A copy with some labels' block/review thresholds replaced (live tuning, no file edit).

        Args:
            overrides: ``{label: {"threshold": t, "review": r}}``; either key may be left out,
                keeping the label's own value.

        Raises:
            TaxonomyError: An unknown label or key, a value outside [0, 1], or review above threshold.
        """
        if not overrides:
            return self
        labels = dict(self.labels)
        for name, values in overrides.items():
            if name not in labels:
                raise TaxonomyError(f"threshold override for unknown label {name!r}")
            if not isinstance(values, Mapping) or set(values) - {"threshold", "review"}:
                raise TaxonomyError(f"threshold override for {name!r} takes 'threshold' and/or 'review', got {values!r}")
            lab = labels[name]
            thr = _prob(values.get("threshold", lab.threshold), "threshold", f"override {name}")
            rev = _prob(values.get("review", min(lab.review, thr)), "review", f"override {name}")
            if rev > thr:
                raise TaxonomyError(f"override {name}: review threshold {rev} is above the block threshold {thr}")
            labels[name] = replace(lab, threshold=thr, review=rev)
        return Taxonomy(version=self.version, labels=labels, groups=self.groups, source=self.source,
                        children=self.children)

    def raise_threshold(self, name: str) -> float:
        """The score from which the service acts on ``name``: review for block/review groups, block for tags.

        This is "the served threshold" of every precision/recall figure: a label counts as
        predicted when the answer would route it to review or block it (or, for informational
        ``tag`` groups such as games, would tag it).
        """
        label = self.labels[name]
        return label.threshold if self.groups[label.group].action == "tag" else label.review

    @staticmethod
    def worst(decisions: list[Decision]) -> Decision:
        """The most severe of several decisions (pass for none)."""
        return max(decisions, key=_DECISION_RANK.__getitem__, default="pass")

    def describe(self, name: str, score: float) -> dict:
        """A label as the API reports it: name, parent, level, score, threshold, decision."""
        if self.is_negative(name):
            group = next(g for g in self.groups.values() if g.negative == name)
            return {"name": name, "parent": group.name, "level": 2, "score": float(score),
                    "threshold": group.threshold, "decision": "pass"}
        label = self.labels[name]
        return {"name": name, "parent": label.parent, "level": label.level, "score": float(score),
                "threshold": label.threshold, "decision": self.decide(name, score)}


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that records each mapping's 1-based line as ``__line__``."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _prob(value: object, what: str, where: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TaxonomyError(f"{where}: {what} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise TaxonomyError(f"{where}: {what} must be in [0, 1], got {v}")
    return v


def parse_taxonomy(text: str, source: str = "<memory>") -> Taxonomy:
    """Parse and validate taxonomy YAML.

    Args:
        text: The YAML document.
        source: A file name for error messages.

    Raises:
        TaxonomyError: With ``source:line`` for unknown parents, cycles, duplicates,
            depth beyond three levels, thresholds outside [0, 1] and unknown keys.
    """
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TaxonomyError(f"{source}{line}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise TaxonomyError(f"{source}: the taxonomy must be a mapping with version, groups and labels")
    for key in ("version", "groups", "labels"):
        if key not in doc:
            raise TaxonomyError(f"{source}: missing top-level key {key!r}")
    policy = doc.get("policy") or {}
    where_policy = f"{source}:{policy.get('__line__', 0)}"
    default_thr = _prob(policy.get("default_threshold", 0.8), "default_threshold", where_policy)
    default_rev = _prob(policy.get("default_review", 0.5), "default_review", where_policy)

    groups_raw: dict[str, dict] = {}
    for g in doc["groups"] or []:
        where = f"{source}:{g.get('__line__', 0)}"
        unknown = set(g) - {"name", "kind", "negative", "threshold", "review", "action", "__line__"}
        if unknown:
            raise TaxonomyError(f"{where}: unknown group keys {sorted(unknown)}")
        if "name" not in g or "negative" not in g:
            raise TaxonomyError(f"{where}: a group needs a name and an explicit negative class")
        if g["name"] in groups_raw:
            raise TaxonomyError(f"{where}: duplicate group name {g['name']!r}")
        if g.get("kind", "exclusive") not in ("exclusive", "multilabel"):
            raise TaxonomyError(f"{where}: group kind must be exclusive or multilabel, got {g.get('kind')!r}")
        if g.get("action", "block") not in ("block", "review", "tag"):
            raise TaxonomyError(f"{where}: group action must be block, review or tag, got {g.get('action')!r}")
        thr = _prob(g.get("threshold", default_thr), "threshold", where)
        rev = _prob(g.get("review", min(default_rev, thr)), "review", where)
        if rev > thr:
            raise TaxonomyError(f"{where}: review threshold {rev} is above the block threshold {thr}")
        groups_raw[g["name"]] = {**g, "threshold": thr, "review": rev, "where": where}

    raw: dict[str, dict] = {}
    for item in doc["labels"] or []:
        where = f"{source}:{item.get('__line__', 0)}" if isinstance(item, dict) else source
        if not isinstance(item, dict) or "name" not in item:
            raise TaxonomyError(f"{where}: each label needs a name")
        unknown = set(item) - {"name", "parent", "zh", "threshold", "review", "__line__"}
        if unknown:
            raise TaxonomyError(f"{where}: unknown label keys {sorted(unknown)}")
        name = str(item["name"])
        if name in raw:
            raise TaxonomyError(f"{where}: duplicate label name {name!r} (first at line {raw[name]['__line__']})")
        if name in groups_raw and item.get("parent"):
            raise TaxonomyError(f"{where}: {name!r} names a group, so it must be a level-1 label")
        if any(name == g["negative"] for g in groups_raw.values()):
            raise TaxonomyError(f"{where}: {name!r} is a group's negative class and cannot also be a label")
        raw[name] = item

    for name, item in raw.items():
        parent = item.get("parent")
        if parent is not None and parent not in raw:
            raise TaxonomyError(f"{source}:{item['__line__']}: label {name!r} has unknown parent {parent!r}")

    # Levels, with cycle detection along each parent chain.
    labels: dict[str, Label] = {}
    children: dict[str, list[str]] = {n: [] for n in raw}
    for name, item in raw.items():
        where = f"{source}:{item['__line__']}"
        chain, cur = [name], item.get("parent")
        while cur is not None:
            if cur in chain:
                raise TaxonomyError(f"{where}: cycle in parents: {' -> '.join([*chain, cur])}")
            chain.append(cur)
            cur = raw[cur].get("parent")
        level, root = len(chain), chain[-1]
        if level > MAX_LEVELS:
            raise TaxonomyError(f"{where}: label {name!r} is at level {level}; at most {MAX_LEVELS} levels")
        if root not in groups_raw:
            raise TaxonomyError(f"{where}: level-1 category {root!r} of {name!r} has no group entry")
        grp = groups_raw[root]
        thr = _prob(item.get("threshold", grp["threshold"]), "threshold", where)
        rev = _prob(item.get("review", min(grp["review"], thr)), "review", where)
        if rev > thr:
            raise TaxonomyError(f"{where}: review threshold {rev} is above the block threshold {thr}")
        labels[name] = Label(name=name, parent=item.get("parent"), level=level, group=root,
                             zh=str(item.get("zh", "")), threshold=thr, review=rev, line=item["__line__"])
        if item.get("parent") is not None:
            children[item["parent"]].append(name)

    groups: dict[str, Group] = {}
    for gname, g in groups_raw.items():
        if gname not in labels:
            raise TaxonomyError(f"{g['where']}: group {gname!r} has no level-1 label of the same name")
        leaves = [n for n, lab in labels.items() if lab.group == gname and not children[n] and n != gname]
        if not leaves:
            raise TaxonomyError(f"{g['where']}: group {gname!r} has no leaf labels to predict")
        groups[gname] = Group(name=gname, kind=g.get("kind", "exclusive"), negative=g["negative"],
                              threshold=g["threshold"], review=g["review"], action=g.get("action", "block"),
                              classes=(g["negative"], *leaves), line=int(g["__line__"]))
    return Taxonomy(version=str(doc["version"]), labels=labels, groups=groups, source=source,
                    children=children)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load a taxonomy file; the packaged default when ``path`` is None."""
    if path is None:
        return _default_taxonomy()
    p = Path(path)
    if not p.is_file():
        raise TaxonomyError(f"taxonomy file not found: {p}")
    return parse_taxonomy(p.read_text(encoding="utf-8"), source=str(p))


@cache
def _default_taxonomy() -> Taxonomy:
    ref = resources.files("livelens") / "resources" / "taxonomy.yaml"
    return parse_taxonomy(ref.read_text(encoding="utf-8"), source="livelens/resources/taxonomy.yaml")
