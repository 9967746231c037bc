"""A store made from synthetic data says so: the generators mark their folders, the ETL reads the mark."""

from cxrflow.data.synth import synthesize
from cxrflow.data.synthetic import is_synthetic, synthetic_record
from cxrflow.testing.synthformats import write_generic


def test_generated_collections_are_recognised_and_others_are_not(tmp_path):
    synthesize(tmp_path / "nih", patients=4, size=16, seed=0)
    assert synthetic_record(tmp_path / "nih")["synthetic"]["generator"] == "cxrflow synth"
    generic = write_generic(tmp_path / "csv", patients=3, size=16)
    assert synthetic_record(generic)["synthetic"]["generator"] == "cxrflow.testing.synthformats"
    (tmp_path / "real").mkdir()
    assert synthetic_record(tmp_path / "real") == {}


def test_manifest_says_synthetic():
    assert is_synthetic({"synthetic": {"generator": "cxrflow synth"}, "split": {"mode": "official-lists"}})
    assert is_synthetic({"split": {"mode": "synthetic-store"}})
    assert not is_synthetic({"split": {"mode": "official-lists"}}) and not is_synthetic(None)
