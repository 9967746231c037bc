"""The decoding libraries never speak for cxrflow: pydicom's warnings and log records, a JPEG 2000
decoder's errors and Pillow's warnings during decoding are kept off the terminal. A failed image is one
``error:`` line in cxrflow's words carrying the library's reason; an image the library coped with
prints nothing of the library's."""

from pathlib import Path

import numpy as np
import pytest

from cxrflow.cli import main
from cxrflow.data.imagecheck import ImageError, library_messages
from cxrflow.testing.synthformats import write_dicom

RAW = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096


def _codestream_at(data: bytes) -> int:
    at = data.find(b"\xff\x4f\xff\x51")  # SOC, SIZ
    assert at > 0
    return at


def _j2k_garbled(path: Path) -> None:
    data = write_dicom(path, RAW, transfer_syntax="jpeg2000").read_bytes()
    at = _codestream_at(data)
    path.write_bytes(data[: at + 60] + bytes(range(200)) + data[at + 260 :])


def _j2k_cut(path: Path) -> None:
    data = write_dicom(path, RAW, transfer_syntax="jpeg2000").read_bytes()
    path.write_bytes(data[: _codestream_at(data) + 200])


def _frames_short(path: Path) -> None:
    from pydicom import dcmread

    write_dicom(path, RAW, bits_stored=12)
    ds = dcmread(path)
    ds.NumberOfFrames = 2
    ds.save_as(path)


def _padded(path: Path) -> None:
    from pydicom import dcmread

    write_dicom(path, RAW, bits_stored=12)
    ds = dcmread(path)
    ds.PixelData = ds.PixelData + bytes(100)  # pydicom warns (and logs) that it removes the padding
    ds.save_as(path)


FAILING = {
    "j2k-garbled": (_j2k_garbled, "cannot decode DICOM pixel data"),
    "j2k-cut": (_j2k_cut, "DICOM file without pixel data (the decoder also said: End of file reached"),
    "frames-short": (_frames_short, "pixel data is less than expected"),
}
COPED = {"padded": _padded}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_torch_thread):
    from cxrflow.testing.synthstore import write_synthetic_store

    tmp = tmp_path_factory.mktemp("libmsg")
    write_synthetic_store(tmp / "store", sizes=(32,), rows={"train": 16, "val": 8, "test": 8})
    argv = ["train", "--quiet", "--store", str(tmp / "store"), "--size", "32", "--model", "simple_cnn"]
    argv += ["--out", str(tmp / "run"), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(FAILING))
def test_a_failed_image_is_one_line_in_cxrflows_words(run, tmp_path, capsys, damage):
    make, reason = FAILING[damage]
    image = tmp_path / "x.dcm"
    make(image)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(image)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {image}: ") and reason in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(COPED))
def test_an_image_the_library_coped_with_prints_nothing_on_stderr(run, tmp_path, capsys, damage):
    image = tmp_path / "x.dcm"
    COPED[damage](image)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(image)]) == 0
    captured = capsys.readouterr()
    assert "x.dcm" in captured.out
    # cxrflow's own notes only (this run has no evaluation, so no thresholds): nothing of pydicom's
    assert all(line.startswith("note: ") for line in captured.err.splitlines()), captured.err
    assert "padding" not in captured.err


@pytest.mark.parametrize("damage", sorted(FAILING))
def test_the_decoder_raises_one_image_error_and_logs_nothing(tmp_path, caplog, recwarn, damage):
    from cxrflow.data.imaging import load_gray

    make, reason = FAILING[damage]
    make(tmp_path / "x.dcm")
    recwarn.clear()  # what pydicom said while the damaged file was written
    caplog.clear()
    with pytest.raises(ImageError) as info:
        load_gray(tmp_path / "x.dcm")
    assert reason in str(info.value)
    assert not caplog.records and not recwarn.list


def test_library_messages_fold_into_the_error_and_vanish_on_success(caplog, recwarn):
    import logging
    import warnings

    with library_messages():  # the library coped: nothing of it reaches the log or the warnings
        warnings.warn("frames do not match", UserWarning, stacklevel=1)
        logging.getLogger("pydicom").warning("excess padding removed")
    assert not recwarn.list and not caplog.records
    with pytest.raises(ImageError) as info, library_messages():
        logging.getLogger("pydicom.pixels.decoders.base").error("failed to read the header")
        warnings.warn("failed to read the header", UserWarning, stacklevel=1)  # the same words: said once
        raise ImageError("cannot decode", "x.dcm")
    assert str(info.value) == "x.dcm: cannot decode (the decoder also said: failed to read the header)"
    logging.getLogger("pydicom").warning("outside decoding")  # the libraries' loggers are left as they were
    assert [r.getMessage() for r in caplog.records] == ["outside decoding"]
