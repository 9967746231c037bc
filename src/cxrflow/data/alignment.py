"""Findings of one collection matched to another's by name, for scoring a model on another store.

A model trained on one collection (say NIH ChestX-ray14) can be scored on a store of another (say
CheXpert or MIMIC-CXR) for the findings both label. Names are matched after :func:`name_key`
(case, spaces and underscores ignored), then through :data:`ALIASES`, the one table of names that
differ between the collections but mean the same finding, then through the user's own
``--map MODEL_NAME=STORE_NAME`` pairs. Findings without a match on the other side are not scored.

=====================  ==================================================
NIH ChestX-ray14       CheXpert / MIMIC-CXR
=====================  ==================================================
Effusion               Pleural Effusion
Pleural_Thickening     Pleural Thickening (a spelling; neither CheXpert nor MIMIC labels it)
=====================  ==================================================

Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia and Pneumothorax are spelt alike in all
three and match without an alias. NIH's Infiltration, Mass, Nodule, Emphysema, Fibrosis and Hernia
have no exact CheXpert counterpart (Lung Opacity and Lung Lesion are broader), so they are matched
only when the user says so with ``--map``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cxrflow.errors import CxrflowError

#: Names that differ between collections for the same finding: each set holds the spellings of one
#: finding. Compared after :func:`name_key`.
ALIASES: tuple[frozenset[str], ...] = (
    frozenset({"Effusion", "Pleural Effusion"}),
    frozenset({"Pleural_Thickening", "Pleural Thickening"}),
)


def name_key(name: str) -> str:
    """``name`` compared without case, spaces or underscores: ``Pleural_Thickening`` -> ``pleuralthickening``."""
    return "".join(ch for ch in str(name).casefold() if ch not in " _")


def _alias_keys() -> dict[str, frozenset[str]]:
    """Each alias's key -> the keys of every spelling of its finding."""
    out: dict[str, frozenset[str]] = {}
    for group in ALIASES:
        keys = frozenset(name_key(n) for n in group)
        for k in keys:
            out[k] = keys
    return out


def same_finding(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name the same finding (spelling or :data:`ALIASES`)."""
    ka, kb = name_key(a), name_key(b)
    return ka == kb or kb in _alias_keys().get(ka, frozenset())


def parse_map(pairs: Iterable[str]) -> dict[str, str]:
    """``["Mass=Lung Lesion", ...]`` -> ``{"Mass": "Lung Lesion"}``; one clear error for a malformed pair."""
    out: dict[str, str] = {}
    for pair in pairs:
        model_name, sep, store_name = str(pair).partition("=")
        if not sep or not model_name.strip() or not store_name.strip():
            raise CxrflowError(f"--map takes MODEL_FINDING=STORE_FINDING, e.g. 'Mass=Lung Lesion'; got {pair!r}")
        out[model_name.strip()] = store_name.strip()
    return out


@dataclass(frozen=True)
class Alignment:
    """Which store finding each model finding is scored against."""

    pairs: dict[str, str]  # model finding -> store finding, in the model's order
    not_labelled: list[str]  # model findings the store does not label
    not_predicted: list[str] = field(default_factory=list)  # store findings the model has no output for

    def indices(self, model_names: Sequence[str], store_names: Sequence[str]) -> tuple[list[int], list[int]]:
        """(model output index, store label index) of every scored finding, in the model's order."""
        return [list(model_names).index(m) for m in self.pairs], [
            list(store_names).index(s) for s in self.pairs.values()
        ]

    def record(self) -> dict:
        """The ``metrics.json`` fields of the alignment."""
        return {"alignment": dict(self.pairs), "not_labelled": list(self.not_labelled),
                "not_predicted": list(self.not_predicted)}  # fmt: skip


def _find(name: str, names: Sequence[str]) -> str | None:
    """The entry of ``names`` spelt like ``name`` (case, spaces, underscores ignored)."""
    return next((n for n in names if name_key(n) == name_key(name)), None)


def align(model_names: Sequence[str], store_names: Sequence[str], user_map: Mapping[str, str] | None = None,
          *, store_label: str = "the store") -> Alignment:  # fmt: skip
    """Match the model's findings to the store's: ``user_map`` first, then spelling and :data:`ALIASES`.

    Errors (one line each): a ``user_map`` entry naming a finding the model or the store does not
    have, two model findings sent to one store finding, no finding in common.
    """
    user_map = dict(user_map or {})
    pairs: dict[str, str] = {}
    for m, s in user_map.items():
        mm, ss = _find(m, model_names), _find(s, store_names)
        if mm is None or ss is None:
            side, bad, have = ("the model", m, model_names) if mm is None else (store_label, s, store_names)
            raise CxrflowError(f"--map {m}={s}: {bad!r} is not a finding of {side} (it has: {', '.join(have)})")
        pairs[mm] = ss
    for m in model_names:
        if m not in pairs:
            match = next((s for s in store_names if same_finding(m, s)), None)
            if match is not None:
                pairs[m] = match
    ordered = {m: pairs[m] for m in model_names if m in pairs}
    seen: dict[str, str] = {}
    for m, s in ordered.items():
        if s in seen:
            raise CxrflowError(f"two model findings, {seen[s]!r} and {m!r}, are mapped to the one store finding {s!r} "
                               "(by --map or the alias table of cxrflow.data.alignment); "
                               "give each store finding to one model finding with --map")  # fmt: skip
        seen[s] = m
    if not pairs:
        raise CxrflowError(
            f"no finding in common between the model ({', '.join(model_names)}) and {store_label} "
            f"({', '.join(store_names)}); match them with --map MODEL_FINDING=STORE_FINDING"
        )
    return Alignment(ordered, [m for m in model_names if m not in ordered],
                     [s for s in store_names if s not in seen])  # fmt: skip
