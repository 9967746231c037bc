"""The label vocabulary: finding names in one canonical order, used everywhere.

Metadata parsing, the ETL schema, the model head, the loss, the metrics and the plots all take
their names and order from one :class:`LabelVocabulary`. Another multi-label image set is
described by building another vocabulary (other names, another "none" token, aliases).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LabelVocabulary:
    """Finding names in canonical order, plus the token meaning "none of them" and spelling aliases."""

    names: tuple[str, ...]
    no_finding: str | None = "No Finding"
    aliases: Mapping[str, str] = field(default_factory=dict)
    separator: str = "|"

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate label names in {self.names}")
        for alias, target in self.aliases.items():
            if target not in self.names:
                raise ValueError(f"alias {alias!r} points to unknown label {target!r}")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def canonical(self, name: str) -> str:
        """The canonical spelling of ``name`` (resolving aliases); KeyError when unknown."""
        name = name.strip()
        name = self.aliases.get(name, name)
        if name not in self._index:
            raise KeyError(name)
        return name

    def index(self, name: str) -> int:
        """Position of a finding (aliases accepted); KeyError when unknown."""
        return self._index[self.canonical(name)]

    @property
    def _index(self) -> dict[str, int]:
        # frozen dataclass: cache the mapping on the instance dict
        try:
            return self.__dict__["_index_cache"]
        except KeyError:
            idx = {n: i for i, n in enumerate(self.names)}
            object.__setattr__(self, "_index_cache", idx)
            return idx

    def parse(self, field_value: str) -> list[str]:
        """Split a ``A|B`` findings field into canonical names; the no-finding token gives [].

        Raises KeyError naming the first unknown finding.
        """
        parts = [p.strip() for p in field_value.split(self.separator) if p.strip()]
        if self.no_finding is not None and parts == [self.no_finding]:
            return []
        return [self.canonical(p) for p in parts]

    def encode(self, findings: Iterable[str]) -> np.ndarray:
        """Multi-hot uint8 vector in canonical order."""
        vec = np.zeros(len(self.names), dtype=np.uint8)
        for f in findings:
            vec[self.index(f)] = 1
        return vec

    def decode(self, vector: Sequence[int] | np.ndarray) -> list[str]:
        """Names of the positive entries of a multi-hot vector."""
        return [n for n, v in zip(self.names, vector) if v]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "no_finding": self.no_finding, "aliases": dict(self.aliases)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LabelVocabulary:
        return cls(tuple(d["names"]), d.get("no_finding"), dict(d.get("aliases", {})))


#: NIH ChestX-ray14: the 14 findings in the release's canonical order.
NIH14 = LabelVocabulary(
    names=(
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Pleural_Thickening",
        "Hernia",
    ),
    no_finding="No Finding",
    # BBox_List_2017.csv spells Infiltration as "Infiltrate"
    aliases={"Infiltrate": "Infiltration"},
)
