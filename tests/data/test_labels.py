import numpy as np
import pytest

from cxrflow.data.labels import NIH14, LabelVocabulary


def test_nih14_canonical_order():
    assert len(NIH14) == 14
    assert NIH14.names[0] == "Atelectasis" and NIH14.names[-1] == "Hernia"
    assert NIH14.index("Pleural_Thickening") == 12


def test_parse_and_encode():
    assert NIH14.parse("No Finding") == []
    assert NIH14.parse("Cardiomegaly|Emphysema") == ["Cardiomegaly", "Emphysema"]
    vec = NIH14.encode(NIH14.parse("Cardiomegaly|Emphysema"))
    assert vec.dtype == np.uint8 and vec.sum() == 2 and vec[1] == 1 and vec[10] == 1
    assert NIH14.decode(vec) == ["Cardiomegaly", "Emphysema"]


def test_alias_and_unknown():
    assert NIH14.canonical("Infiltrate") == "Infiltration"
    with pytest.raises(KeyError):
        NIH14.parse("Cardiomegaly|Flu")


def test_other_vocabulary_roundtrip():
    v = LabelVocabulary(("a", "b"), no_finding="normal", separator=";")
    assert v.parse("normal") == [] and v.parse("b;a") == ["b", "a"]
    assert LabelVocabulary.from_dict(v.to_dict()).names == ("a", "b")
