"""Families of hostile inputs, each fixed in one shared place: tests generate the inputs of a family
rather than list examples.

- outputs: user paths are never glob patterns, and clean-up touches only this output's own leftovers.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrflow.outputs import leftovers, publishing, write_marker

#: Output names made of glob metacharacters and ordinary letters (``st[12]``, ``*``, ``a?``).
GLOBBY = st.text(alphabet=string.ascii_lowercase[:3] + "0123[]*?!-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and "/" not in s
)

pytestmark = pytest.mark.filterwarnings("ignore")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=GLOBBY, other=GLOBBY)
def test_cleanup_of_one_output_never_touches_another_outputs_partial_folder(tmp_path_factory, name, other):
    """``etl --out 'st[12]'`` beside a running ``etl --out st1`` leaves st1's partial folder alone."""
    if name == other:
        return
    root = tmp_path_factory.mktemp("pair")
    theirs = root / f".{other}.partial-0123abcd"
    theirs.mkdir()
    write_marker(theirs, "etl", partial=True, target=other)
    (theirs / "part-0.parquet").write_text("in progress")
    assert leftovers(root / name) == []
    with publishing(root / name, "etl") as pub:
        pub.commit()
    assert (theirs / "part-0.parquet").read_text() == "in progress"


def test_leftovers_are_matched_by_exact_name_not_by_prefix(tmp_path):
    """``store``'s clean-up does not take ``store.partial-ab``'s partial folder for one of its own."""
    out = tmp_path / "store"
    theirs = tmp_path / ".store.partial-ab.partial-0123abcd"
    theirs.mkdir()
    write_marker(theirs, "etl", partial=True)
    assert leftovers(out) == []
    mine = tmp_path / ".store.partial-0123abcd"
    mine.mkdir()
    write_marker(mine, "etl", partial=True, target="other")  # another output's marker: not ours
    with publishing(out, "etl") as pub:
        pub.commit()
    assert theirs.is_dir() and mine.is_dir()
