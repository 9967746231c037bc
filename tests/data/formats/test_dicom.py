"""DICOM decoding (cxrflow.data.formats.dicom) against an independent numpy decode, in the ETL and predict."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from cxrflow.data.formats.dicom import read_dicom
from cxrflow.data.imaging import ImageError, load_gray, resize_gray
from cxrflow.testing.synthformats import write_dicom

RNG = np.random.default_rng(7)
RAW12 = RNG.integers(0, 4096, (64, 72)).astype(np.uint16)
RAW16 = RNG.integers(0, 65536, (64, 72)).astype(np.uint16)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window to 0..1, written out independently."""
    out = np.empty(values.shape)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out[values <= low] = 0.0
    out[values > high] = 1.0
    mid = (values > low) & (values <= high)
    out[mid] = (values[mid] - (center - 0.5)) / (width - 1) + 0.5
    return out


def _to8(unit: np.ndarray, invert: bool) -> np.ndarray:
    return np.rint((1.0 - unit if invert else unit) * 255).astype(np.uint8)


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle", "jpeg2000"])
@pytest.mark.parametrize("photometric,raw,bits", [("MONOCHROME2", RAW12, 12), ("MONOCHROME1", RAW16, 16)])
def test_windowed_rescaled_decode_matches_independent(tmp_path, syntax, photometric, raw, bits):
    slope, intercept, center, width = 2.0, -1024.0, float(raw.mean()), float(raw.std() * 4)
    path = write_dicom(
        tmp_path / "a.dcm",
        raw,
        bits_stored=bits,
        photometric=photometric,
        slope=slope,
        intercept=intercept,
        window=(center, width),
        transfer_syntax=syntax,
    )
    expected = _to8(_window(raw * slope + intercept, center, width), photometric == "MONOCHROME1")
    gray, (w, h) = load_gray(path)
    assert (w, h) == (72, 64)
    np.testing.assert_array_equal(gray, expected)


def test_no_window_stretches_deep_data_and_keeps_8_bit(tmp_path):
    path = write_dicom(tmp_path / "deep.dcm", RAW12, bits_stored=12)
    lo, hi = RAW12.min(), RAW12.max()
    np.testing.assert_array_equal(load_gray(path)[0], _to8((RAW12 - lo) / (hi - lo), False))
    eight = RNG.integers(0, 256, (10, 12)).astype(np.uint8)
    np.testing.assert_array_equal(load_gray(write_dicom(tmp_path / "eight.dcm", eight))[0], eight)


def test_voi_lut_sequence(tmp_path):
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "lut.dcm", RAW12, bits_stored=12)
    dataset = dcmread(path)
    lut = (4095 - np.arange(4096)) * 16  # 12 bits in, 16 bits out, inverted: not the identity
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data
    dataset.VOILUTSequence = Sequence([item])
    dataset.save_as(path)
    np.testing.assert_array_equal(load_gray(path)[0], _to8(lut[RAW12] / 65535.0, False))


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_eight_bit_voi_lut_over_twelve_bit_data(tmp_path, vr):
    """A VOI LUT of 4096 entries with 8-bit output: pydicom's apply_voi_lut indexed it with uint8, so
    every stored value above 255 wrapped around (a 0..16 image instead of 0..255)."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "lut8.dcm", RAW12, bits_stored=12)
    dataset = dcmread(path)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 255).astype(np.int64)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 8])
    item.add_new(0x00283006, vr, lut.astype("<u2").tobytes() if vr == "OW" else lut.tolist())
    dataset.VOILUTSequence = Sequence([item])
    dataset.save_as(path)
    np.testing.assert_array_equal(load_gray(path)[0], _to8(lut[RAW12] / 255.0, False))


@pytest.mark.parametrize("bits", [16, 12])
def test_modality_lut_sequence(tmp_path, bits):
    """A Modality LUT (here 12-bit entries, as some exports write them) then a window: pydicom's
    apply_modality_lut ended in "data type 'uint12' not understood", a traceback out of the ETL."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "mlut.dcm", RAW12, bits_stored=12, window=(1500.0, 2000.0))
    dataset = dcmread(path)
    lut = np.rint((np.arange(4096) / 4095) ** 1.5 * (2**bits - 1)).astype(np.int64)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, bits])
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())
    item.ModalityLUTType = "US"
    dataset.ModalityLUTSequence = Sequence([item])
    dataset.save_as(path)
    np.testing.assert_array_equal(load_gray(path)[0], _to8(_window(lut[RAW12].astype(float), 1500.0, 2000.0), False))


@pytest.mark.parametrize("syntax", ["explicit", "rle"])
def test_ybr_full_is_its_own_luma(tmp_path, syntax):
    """YBR_FULL colour: the gray image is the Y plane. Through pydicom's RGB conversion, which clips,
    and back to luma it was up to 6 levels off where the chroma is strong."""
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    y = RNG.integers(0, 256, (16, 20)).astype(np.uint8)
    cb = np.where(y > 128, 200, 40).astype(np.uint8)  # strong chroma: R, G or B leaves 0..255
    cr = np.where(y > 64, 60, 210).astype(np.uint8)
    path = write_dicom(tmp_path / "ybr.dcm", y, bits_stored=8)
    dataset = dcmread(path)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "YBR_FULL", 0
    ybr = np.stack([y, cb, cr], -1)
    dataset.PixelData = ybr.tobytes()
    if syntax == "rle":
        dataset.compress(RLELossless, ybr)
    dataset.save_as(path)
    np.testing.assert_array_equal(load_gray(path)[0], y)


def test_empty_window_is_no_window(tmp_path):
    """WindowCenter/WindowWidth present but empty (type 2 elements left blank by an export): the
    image's min..max, as without a window; it was a TypeError traceback out of the ETL."""
    from pydicom import dcmread

    path = write_dicom(tmp_path / "w.dcm", RAW12, bits_stored=12, window=(2000.0, 1000.0))
    dataset = dcmread(path)
    dataset["WindowCenter"].value, dataset["WindowWidth"].value = "", ""
    dataset.save_as(path)
    lo, hi = RAW12.min(), RAW12.max()
    np.testing.assert_array_equal(load_gray(path)[0], _to8((RAW12 - lo) / (hi - lo), False))


@pytest.mark.parametrize("implicit", [True, False])
def test_bare_dataset_without_file_meta(tmp_path, implicit):
    """A .dcm holding the dataset alone (no preamble, no file meta, as older exports write): decoded
    in the encoding it was read with, where it was quarantined for its missing Transfer Syntax UID."""
    from pydicom import dcmread, dcmwrite
    from pydicom.dataset import FileMetaDataset

    dataset = dcmread(write_dicom(tmp_path / "full.dcm", RAW12, bits_stored=12, window=(2000.0, 1000.0)))
    dataset.file_meta, dataset.preamble = FileMetaDataset(), None
    path = tmp_path / "bare.dcm"
    dcmwrite(path, dataset, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_gray(path)[0], _to8(_window(RAW12.astype(float), 2000.0, 1000.0), False))


@pytest.mark.parametrize("damage", ["window text", "short LUT descriptor"])
def test_unusable_header_values_are_a_reason_not_a_traceback(tmp_path, damage):
    """A window centre that is not a number, or a LUT descriptor of two values, raised ValueError out
    of the decoder: one such file ended the whole ETL job instead of being quarantined."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_dicom(tmp_path / "bad.dcm", RAW12, bits_stored=12, window=(1234.0, 999.0))
    if damage == "window text":
        data = path.read_bytes()
        assert data.count(b"1234") == 1
        path.write_bytes(data.replace(b"1234", b"abcd"))
    else:
        dataset = dcmread(path)
        item = Dataset()
        item.add_new(0x00283002, "US", [4096, 0])
        item.add_new(0x00283006, "OW", np.arange(4096).astype("<u2").tobytes())
        dataset.VOILUTSequence = Sequence([item])
        dataset.save_as(path)
    with pytest.raises(ImageError, match="unusable DICOM rescale, LUT or window values in the header"):
        load_gray(path)


@pytest.mark.parametrize("field", ["slope", "intercept", "window centre", "window width"])
@pytest.mark.parametrize("token", [b"inf", b"NaN", b"nan", b"-inf", b"1e999"])
def test_header_numbers_that_are_not_finite_are_a_reason(tmp_path, field, token):
    """A RescaleSlope (or intercept, window) of inf or NaN turned every pixel into garbage and the
    image was scored with exit 0: a header number that is not finite is a reason, not a factor."""
    marker = b"12.25" if len(token) == 5 else b"2.25" if len(token) == 4 else b"1.5"
    kwargs = {
        "slope": {"slope": float(marker)},
        "intercept": {"intercept": float(marker)},
        "window centre": {"window": (float(marker), 999.0)},
        "window width": {"window": (2000.0, float(marker))},
    }[field]
    path = write_dicom(tmp_path / "bad.dcm", RAW12, bits_stored=12, **kwargs)
    data = path.read_bytes()
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, token))
    with pytest.raises(ImageError, match="unusable DICOM rescale, LUT or window values in the header"):
        load_gray(path)


@pytest.mark.parametrize("token", [b"inf", b"NaN", b"0.0", b"-.1"])
def test_pixel_spacing_that_is_not_a_length_is_no_spacing(tmp_path, token):
    """Pixel spacing feeds box coordinates in millimetres: NaN, inf, zero or negative is unknown."""
    path = write_dicom(tmp_path / "s.dcm", RAW12, bits_stored=12, spacing=(0.5, 0.5))
    data = path.read_bytes()
    assert data.count(b"0.5\\0.5") == 1
    path.write_bytes(data.replace(b"0.5\\0.5", token + b"\\" + token))
    assert read_dicom(path).spacing is None


def test_sixteen_bit_colour_is_scaled_not_clipped(tmp_path):
    from pydicom import dcmread

    path = write_dicom(tmp_path / "rgb.dcm", RNG.integers(0, 256, (6, 8)).astype(np.uint8))
    dataset = dcmread(path)
    rgb = RNG.integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelData = rgb.tobytes()
    dataset.save_as(path)
    luma = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 65535 * 255
    np.testing.assert_allclose(load_gray(path)[0], np.rint(luma), atol=1)


def test_palette_color_is_the_luma_of_its_palette(tmp_path):
    from pydicom import dcmread

    path = write_dicom(tmp_path / "pal.dcm", RNG.integers(0, 256, (10, 12)).astype(np.uint8))
    dataset = dcmread(path)
    dataset.PhotometricInterpretation = "PALETTE COLOR"
    red, green, blue = (np.arange(256) * 257)[::-1], np.full(256, 65535), np.arange(256) * 128  # 16-bit entries
    for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        dataset.add_new(f"{name}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        dataset.add_new(f"{name}PaletteColorLookupTableData", "OW", lut.astype("<u2").tobytes())
    dataset.save_as(path)
    index = dcmread(path).pixel_array
    luma = (red[index] * 0.299 + green[index] * 0.587 + blue[index] * 0.114) / 65535 * 255
    np.testing.assert_allclose(load_gray(path)[0], np.rint(luma), atol=1)  # not the indices as gray
    assert np.abs(load_gray(path)[0].astype(int) - index).max() > 100


def test_spacing_and_header(tmp_path):
    image = read_dicom(write_dicom(tmp_path / "s.dcm", RAW12, bits_stored=12, spacing=(0.2, 0.25)))
    assert image.spacing == (0.2, 0.25) and image.bits_stored == 12 and image.photometric == "MONOCHROME2"


def _undecodable(path: Path) -> Path:
    """A DICOM file whose transfer syntax (MPEG2) no installed plugin decodes."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    write_dicom(path, RAW12, bits_stored=12)
    dataset = dcmread(path)
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_bad_dicom_reasons(tmp_path):
    with pytest.raises(ImageError, match="DICOM file without pixel data"):
        load_gray(write_dicom(tmp_path / "none.dcm", RAW12, with_pixels=False))
    with pytest.raises(ImageError, match="cannot decode DICOM pixel data .transfer syntax MPEG2"):
        load_gray(_undecodable(tmp_path / "mpeg.dcm"))


@pytest.mark.slow
def test_etl_reads_dicom_and_quarantines_bad_ones(spark, tmp_path):
    from cxrflow.data.etl import run_etl

    root = tmp_path / "data"
    rows = [["image", "patient_id", "labels"]]
    expected = {}
    for i in range(12):
        raw = RNG.integers(0, 4096, (64, 56)).astype(np.uint16)
        syntax = "jpeg2000" if i % 2 else "explicit"
        rel = f"dcm/{i}.dcm"
        write_dicom(root / rel, raw, bits_stored=12, window=(2048, 4096), transfer_syntax=syntax)
        expected[rel] = resize_gray(_to8(_window(raw.astype(float), 2048, 4096), False), 16)
        rows.append([rel, str(i), "Nodule" if i % 3 else "No Finding"])
    write_dicom(root / "dcm/none.dcm", RAW12, with_pixels=False)
    _undecodable(root / "dcm/mpeg.dcm")
    rows += [["dcm/none.dcm", "90", "Nodule"], ["dcm/mpeg.dcm", "91", "Nodule"]]
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    manifest = run_etl(root, tmp_path / "store", sizes=(16,), spark=spark)
    reasons = {q["image_id"]: q["reason"] for q in manifest["quarantined"]}
    assert reasons["dcm/none.dcm"] == "DICOM file without pixel data"
    assert "cannot decode DICOM pixel data (transfer syntax MPEG2" in reasons["dcm/mpeg.dcm"]
    table = ds.dataset(str(tmp_path / "store"), format="parquet", partitioning="hive").to_table()
    got = {r["image_id"]: np.frombuffer(r["pixels"], np.uint8).reshape(16, 16) for r in table.to_pylist()}
    assert set(got) == set(expected)
    for image, pixels in expected.items():
        np.testing.assert_array_equal(got[image], pixels)
    import pyarrow.parquet as pq

    spacing = pq.read_table(tmp_path / "store" / manifest["pixel_spacing"]["file"]).to_pylist()
    assert [r["image_id"] for r in spacing] == sorted(expected)
    assert all(r["spacing_row_mm"] == pytest.approx(0.143) for r in spacing)


@pytest.mark.slow
def test_predict_accepts_dicom(tmp_path, capsys):
    import json

    from cxrflow.cli import main
    from cxrflow.testing.synthstore import write_synthetic_store

    write_synthetic_store(tmp_path / "store", sizes=(32,), rows={"train": 16, "val": 8, "test": 8})
    assert (
        main(
            [
                "train",
                "--quiet",
                "--store",
                str(tmp_path / "store"),
                "--size",
                "32",
                "--model",
                "simple_cnn",
                "--out",
                str(tmp_path / "run"),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    image = write_dicom(tmp_path / "x.dcm", RAW16, photometric="MONOCHROME1")
    assert main(["predict", "--run", str(tmp_path / "run"), str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["predictions"][0]["probabilities"]) == 14


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_codecs_match_the_uncompressed_file(name):
    """pydicom's own sample files: one signed 16-bit image in several transfer syntaxes (JPEG-LS and
    JPEG 2000 through the pylibjpeg plugins) decode to the same pixels as its uncompressed copy."""
    from pydicom.data import get_testdata_file

    reference, other = get_testdata_file("MR_small.dcm"), get_testdata_file(name)
    if reference is None or other is None:
        pytest.skip("pydicom's bundled test files are not installed")
    np.testing.assert_array_equal(load_gray(other)[0], load_gray(reference)[0])


def test_pixel_bomb_is_refused_from_the_header(tmp_path):
    """A header claiming 20000 x 20000 pixels is refused before pydicom allocates or decodes them."""
    from pydicom import dcmread

    path = write_dicom(tmp_path / "bomb.dcm", RAW12, bits_stored=12)
    dataset = dcmread(path)
    dataset.Rows = dataset.Columns = 20000
    dataset.save_as(path)
    with pytest.raises(ImageError, match="image of 20000x20000 pixels would be 20000x20000 after padding.*not decoded"):
        load_gray(path)


def test_truncated_pixel_data_is_a_reason(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", RAW12, bits_stored=12)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ImageError, match="cannot decode DICOM pixel data"):
        load_gray(path)


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT"])
def test_voi_lut_functions(tmp_path, function):
    from pydicom import dcmread

    path = write_dicom(tmp_path / "f.dcm", RAW12, bits_stored=12, window=(2000.0, 1500.0))
    dataset = dcmread(path)
    dataset.VOILUTFunction = function
    dataset.save_as(path)
    x = RAW12.astype(np.float64)
    unit = 1 / (1 + np.exp(-4 * (x - 2000) / 1500)) if function == "SIGMOID" else np.clip((x - 2000) / 1500 + 0.5, 0, 1)
    np.testing.assert_array_equal(load_gray(path)[0], _to8(unit, False))
