"""A synthetic dataset in the NIH ChestX-ray14 release format, so everything runs without the 42 GB download.

Writes ``Data_Entry_2017_v2020.csv`` (the real header, spacing written ``0.14300000000000002`` or
``0.168`` as in the release), ``BBox_List_2017.csv`` (``Image Index,Finding Label,Bbox [x,y,w,h],,,``,
``Infiltrate`` for Infiltration), ``train_val_list.txt`` / ``test_list.txt`` (by patient, about
80/20, sorted) and ``images/*.png`` (8-bit gray, ``size`` x ``size``).

Labels have the real data's shape: each image is normal (``No Finding``) with probability 1/2,
otherwise it carries 1-4 findings drawn with the real prevalences flattened (square root), so
Infiltration is the most frequent finding and Hernia the rarest; every finding is then topped up to
a few patients in each official list (as far as the patient count allows) so that a per-finding
AUC is defined in every split. Patients have several images (mean about 3.6, heavy tail) with
Follow-up # 0, 1, 2...; ages 0-95 (non-decreasing over follow-ups), both sexes (54% M), PA/AP views.
Labels are drawn independently per image, so shuffled or misaligned rows destroy the signal.

Pixels: a chest-like background (dark lung fields with faint ribs, brighter mediastinum and spine,
soft-tissue body, dark outside), per-image brightness/contrast gain, a small shift and smooth
noise. Each finding present draws its own bright pattern in its own cell of a 4x4 grid (rows top to
bottom, columns left to right as the image is displayed); the pattern's side is 80-95% of the cell
(1/5 to 1/4 of the image width), so it survives downsampling to 32 px:

====================  ======  ====================================
finding               cell    pattern
====================  ======  ====================================
Pneumothorax          (0, 0)  ring
Nodule                (0, 1)  four small dots (2x2)
Fibrosis              (0, 2)  diagonal stripes
Emphysema             (0, 3)  checkerboard (4x4)
Mass                  (1, 0)  diamond
Pneumonia             (1, 1)  plus sign
Infiltration          (1, 2)  soft blob (flat-topped gaussian)
Consolidation         (1, 3)  filled triangle (apex up)
Atelectasis           (2, 0)  three horizontal bars
Edema                 (2, 1)  three vertical bars
Cardiomegaly          (2, 2)  large disc
Pleural_Thickening    (2, 3)  square frame
Effusion              (3, 0)  bright fluid under a meniscus
Hernia                (3, 2)  dome (upper half-disc)
====================  ======  ====================================

Each drawn pattern is one row of the BBox file, in the image's own pixel coordinates. With
``placement="anywhere"`` (``--placement anywhere``) each pattern sits at a uniformly random place in
the image instead of its cell, so that a finding's position varies (the localization benchmark's
fixed-box baseline then knows little).

With ``demographic_findings`` (``cxrflow synth --demographic-findings``) some findings follow the
patient instead, as real ones do, and are faint on the image, so that a model that also sees age,
sex and view (``cxrflow train --fusion demographics``) can beat one that sees the image only.
Their prevalence is ``sigmoid(base + per_decade * (age - 50) / 10 + male * [M] + ap * [AP])``
(:data:`DEMOGRAPHIC_FINDINGS`) and their pattern is drawn at :data:`FAINT_STRENGTH` of the usual
contrast. About 1% of the images then get an unusable age in the CSV (0, 150 or 414, as the real
v2017 file has), while their labels follow the true age.
Output is deterministic: metadata from ``seed``, each image from its own generator seeded with
``(seed, image number)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.data.metadata import BBOX_NAME, DATA_ENTRY_NAMES, TEST_NAME, TRAIN_VAL_NAME
from cxrflow.errors import CxrflowError
from cxrflow.outputs import check_target, marker_name, publishing

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
#: Marks a folder written by :func:`synthesize`, so that ``--overwrite`` never deletes anything else.
MARKER_NAME = marker_name("synth")

#: Images per finding in the real release (of 112,120), used for relative frequencies.
NIH_COUNTS = {
    "Infiltration": 19894, "Effusion": 13317, "Atelectasis": 11559, "Nodule": 6331, "Mass": 5782,
    "Pneumothorax": 5302, "Consolidation": 4667, "Pleural_Thickening": 3385, "Cardiomegaly": 2776,
    "Emphysema": 2516, "Edema": 2303, "Fibrosis": 1686, "Pneumonia": 1431, "Hernia": 227,
}  # fmt: skip

#: (finding, grid cell (row, col), pattern) in the order of the module docstring's table.
PATTERNS = {
    "Pneumothorax": ((0, 0), "ring"),
    "Nodule": ((0, 1), "dots"),
    "Fibrosis": ((0, 2), "diagonal"),
    "Emphysema": ((0, 3), "checker"),
    "Mass": ((1, 0), "diamond"),
    "Pneumonia": ((1, 1), "plus"),
    "Infiltration": ((1, 2), "blob"),
    "Consolidation": ((1, 3), "triangle"),
    "Atelectasis": ((2, 0), "hbars"),
    "Edema": ((2, 1), "vbars"),
    "Cardiomegaly": ((2, 2), "disc"),
    "Pleural_Thickening": ((2, 3), "frame"),
    "Effusion": ((3, 0), "meniscus"),
    "Hernia": ((3, 2), "dome"),
}
GRID = 4

#: finding -> (base, per_decade, male, ap): the logit of its prevalence (``demographic_findings``).
DEMOGRAPHIC_FINDINGS: dict[str, tuple[float, float, float, float]] = {
    "Emphysema": (-3.0, 1.2, 1.6, 0.0),
    "Edema": (-3.0, 0.4, 0.0, 2.8),
    "Cardiomegaly": (-3.0, 0.9, 0.0, 1.6),
}
#: Contrast of a demographic finding's pattern, relative to the other findings'.
FAINT_STRENGTH = 0.05
BAD_AGE_FRACTION = 0.01
BAD_AGES = (0, 150, 414)
_SHAPE_CYCLE = ("disc", "ring", "plus", "checker", "hbars", "vbars", "diamond", "frame")

#: (width, height, pixel spacing as the release writes it) seen in the release.
ORIGINAL_SIZES = (
    (2500, 2048, "0.168"),
    (2048, 2500, "0.168"),
    (2500, 2048, "0.171"),
    (2048, 2500, "0.171"),
    (2992, 2991, "0.14300000000000002"),
    (2682, 2749, "0.14300000000000002"),
    (3056, 2544, "0.139"),
    (2021, 2021, "0.194311"),
)
MAX_IMAGES_PER_PATIENT = 200
#: Where findings are drawn: in their own grid cell (slightly jittered) or anywhere in the image.
PLACEMENTS = ("grid", "anywhere")
#: More patients than any collection has (ChestX-ray14: 30,805); beyond it the tables alone outgrow memory.
MAX_PATIENTS = 1_000_000


def finding_layout(vocab: LabelVocabulary) -> dict[str, tuple[tuple[int, int], str]]:
    """Cell and pattern of every finding of ``vocab`` (NIH names use the table; others get free cells)."""
    used = {c for n, (c, _) in PATTERNS.items() if n in vocab.names}
    free = [c for c in (divmod(i, GRID) for i in range(GRID * GRID)) if c not in used]
    layout: dict[str, tuple[tuple[int, int], str]] = {}
    for k, name in enumerate(vocab.names):
        if name in PATTERNS:
            layout[name] = PATTERNS[name]
        elif free:
            layout[name] = (free.pop(0), _SHAPE_CYCLE[k % len(_SHAPE_CYCLE)])
        else:
            raise CxrflowError(f"synthetic images have room for {GRID * GRID} findings, vocabulary has {len(vocab)}")
    return layout


# --------------------------------------------------------------------------------------------- labels


def _images_per_patient(patients: int, images: int | None, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed counts >= 1 with mean about 3.6 (the release: 112,120 / 30,805); exact total if given."""
    counts = 1 + np.minimum(rng.negative_binomial(0.5, 0.159, size=patients), MAX_IMAGES_PER_PATIENT - 1)
    if images is not None:
        if images < patients:
            raise CxrflowError(f"{images} images cannot cover {patients} patients (at least one each)")
        diff = images - int(counts.sum())
        if diff > 0:
            np.add.at(counts, rng.integers(0, patients, diff), 1)
        while diff < 0:
            eligible = np.flatnonzero(counts > 1)
            take = rng.choice(eligible, size=min(-diff, len(eligible)), replace=False)
            counts[take] -= 1
            diff += len(take)
    return counts


def _sample_labels(n: int, vocab: LabelVocabulary, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, K]: half the images normal, the rest 1-4 findings with flattened real prevalences."""
    weights = np.sqrt(np.array([NIH_COUNTS.get(name, 2000) for name in vocab.names], dtype=np.float64))
    weights /= weights.sum()
    labels = np.zeros((n, len(vocab)), dtype=np.uint8)
    abnormal = rng.random(n) < 0.5
    k = rng.choice([1, 2, 3, 4], size=n, p=[0.6, 0.25, 0.1, 0.05])
    k = np.minimum(k, len(vocab))
    # k findings without replacement, weighted: Gumbel top-k over all images at once
    keys = np.log(weights)[None, :] - np.log(-np.log(rng.random((n, len(vocab)))))
    order = np.argsort(-keys, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(len(vocab))[None, :].repeat(n, 0), axis=1)
    labels[(rank < k[:, None]) & abnormal[:, None]] = 1
    return labels


def _top_up(
    labels: np.ndarray, patient_of_image: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator
) -> None:
    """Give every finding at least a few patients in each group of patients (in place)."""
    for group in groups:
        target = min(8, max(1, len(group) // 4))
        in_group = np.isin(patient_of_image, group)
        for j in range(labels.shape[1]):
            have = np.unique(patient_of_image[in_group & (labels[:, j] == 1)])
            lacking = np.setdiff1d(group, have)
            need = min(target - len(have), len(lacking))
            if need <= 0:
                continue
            for pid in rng.choice(lacking, size=need, replace=False):
                images = np.flatnonzero(patient_of_image == pid)
                labels[rng.choice(images), j] = 1


def _label_strings(labels: np.ndarray, vocab: LabelVocabulary) -> np.ndarray:
    """``A|B`` strings (names sorted, as in the release), ``No Finding`` for all-zero rows."""
    uniques, inverse = np.unique(labels, axis=0, return_inverse=True)
    texts = []
    for row in uniques:
        names = sorted(vocab.decode(row))
        texts.append(vocab.separator.join(names) if names else (vocab.no_finding or ""))
    return np.asarray(texts, dtype=object)[inverse.reshape(-1)]


def _demographic_labels(
    labels: np.ndarray,
    vocab: LabelVocabulary,
    age: np.ndarray,
    male: np.ndarray,
    ap: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Redraw the :data:`DEMOGRAPHIC_FINDINGS` columns from age, sex and view (in place)."""
    for name, (base, per_decade, w_male, w_ap) in DEMOGRAPHIC_FINDINGS.items():
        if name in vocab.names:
            logit = base + per_decade * (age - 50) / 10 + w_male * male + w_ap * ap
            labels[:, vocab.names.index(name)] = rng.random(len(age)) < 1 / (1 + np.exp(-logit))


def sample_entries(
    patients: int,
    rng: np.random.Generator,
    vocab: LabelVocabulary = NIH14,
    images: int | None = None,
    test_fraction: float = 0.2,
    demographic_findings: bool = False,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Synthetic metadata with the release's shape, without pixels.

    Returns (entries, labels uint8 [N, K], test patient ids). ``entries`` has the release's columns
    as strings ready to write: image_id, finding_labels, follow_up, patient_id, age, sex, view,
    width, height, spacing.
    """
    if not 1 <= patients <= MAX_PATIENTS:
        raise CxrflowError(
            f"--patients must be between 1 and {MAX_PATIENTS:,} (the release has 30,805), got {patients}"
        )
    counts = _images_per_patient(patients, images, rng)
    pids = np.arange(1, patients + 1, dtype=np.int64)
    patient_of_image = np.repeat(pids, counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    follow_up = np.arange(len(patient_of_image)) - starts
    n = len(patient_of_image)

    child = rng.random(patients) < 0.05
    first_age = np.where(child, rng.integers(0, 18, patients), np.clip(rng.normal(50, 16, patients), 18, 95))
    first_age = first_age.astype(np.int64)
    steps = rng.integers(0, 2, n) * (follow_up > 0)
    cum = np.cumsum(steps)
    age = np.minimum(first_age[patient_of_image - 1] + cum - (cum[starts] - steps[starts]), 95)
    sex = np.where(rng.random(patients) < 0.54, "M", "F")[patient_of_image - 1]
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    orig = rng.integers(0, len(ORIGINAL_SIZES), n)

    n_test = int(round(test_fraction * patients)) if patients > 1 else 0
    n_test = min(max(n_test, 1 if patients > 1 else 0), patients - 1) if patients > 1 else 0
    test_patients = np.sort(rng.choice(pids, size=n_test, replace=False))
    train_patients = np.setdiff1d(pids, test_patients)

    labels = _sample_labels(n, vocab, rng)
    if demographic_findings:
        _demographic_labels(labels, vocab, age, sex == "M", view == "AP", rng)
        bad = rng.random(n) < BAD_AGE_FRACTION
        age = np.where(bad, rng.choice(BAD_AGES, n), age)  # written wrong; the labels used the true age
    _top_up(labels, patient_of_image, [g for g in (train_patients, test_patients) if len(g)], rng)

    entries = pd.DataFrame(
        {
            "image_id": [f"{p:08d}_{f:03d}.png" for p, f in zip(patient_of_image, follow_up)],
            "finding_labels": _label_strings(labels, vocab),
            "follow_up": follow_up,
            "patient_id": patient_of_image,
            "age": age,
            "sex": sex,
            "view": view,
            "width": [ORIGINAL_SIZES[i][0] for i in orig],
            "height": [ORIGINAL_SIZES[i][1] for i in orig],
            "spacing": [ORIGINAL_SIZES[i][2] for i in orig],
        }
    )
    return entries, labels, test_patients


def write_data_entry(entries: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write :func:`sample_entries` output as ``Data_Entry_2017_v2020.csv`` (exact release format)."""
    with open(path, "w", newline="") as f:
        f.write(DATA_ENTRY_HEADER + "\n")
        order = ("image_id", "finding_labels", "follow_up", "patient_id", "age", "sex", "view", "width", "height")
        cols = [entries[c].astype(str) for c in (*order, "spacing", "spacing")]
        f.write("\n".join(",".join(row) for row in zip(*cols)))
        f.write("\n")


# --------------------------------------------------------------------------------------------- pixels


def chest_background(size: int, pad: int = 0) -> np.ndarray:
    """float32 [size + 2 pad]^2 in [0, 1]: body, two dark lung fields with faint ribs, mediastinum, spine.

    ``pad`` extends the canvas on every side (for per-image shifts without wrap-around).
    """
    n = size + 2 * pad
    v, u = (np.mgrid[0:n, 0:n].astype(np.float32) - pad + 0.5) / size
    edge = 2.5 / max(size, 1) + 0.01

    def inside(d: np.ndarray) -> np.ndarray:  # soft step: 1 inside (d < 1), 0 outside
        return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / edge, -30, 30)))

    body = inside(((u - 0.5) / 0.47) ** 2 + ((v - 0.58) / 0.5) ** 2)
    lungs = np.maximum(
        inside(((u - 0.3) / 0.16) ** 2 + ((v - 0.45) / 0.32) ** 2),
        inside(((u - 0.7) / 0.16) ** 2 + ((v - 0.45) / 0.32) ** 2),
    )
    mediastinum = inside(((u - 0.5) / 0.1) ** 2 + ((v - 0.55) / 0.42) ** 4)
    spine = inside(((u - 0.5) / 0.035) ** 2) * inside(((v - 0.55) / 0.5) ** 8)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (v * 8 + 6 * (u - 0.5) ** 2))
    img = 0.06 + 0.46 * body
    img = img - lungs * (0.28 - 0.06 * ribs)
    img = np.maximum(img, 0.62 * mediastinum * body)
    img = np.maximum(img, 0.8 * spine * body)
    return np.clip(img, 0, 1).astype(np.float32)


def _pattern_mask(kind: str, n: int) -> np.ndarray:
    """float32 [n, n] mask in [0, 1] of one finding's pattern, drawn in local coordinates [-1, 1]."""
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n * 2 - 1
    r = np.sqrt(x * x + y * y)
    inf = np.maximum(np.abs(x), np.abs(y))
    if kind == "disc":
        m = r < 0.92
    elif kind == "ring":
        m = np.abs(r - 0.7) < 0.2
    elif kind == "blob":
        return np.minimum(1.0, 1.6 * np.exp(-(r**2) / 0.4)).astype(np.float32)
    elif kind == "diamond":
        m = np.abs(x) + np.abs(y) < 0.95
    elif kind == "plus":
        m = ((np.abs(x) < 0.28) | (np.abs(y) < 0.28)) & (inf < 0.95)
    elif kind == "hbars":
        m = np.cos(y * np.pi * 2.5) > 0.0
    elif kind == "vbars":
        m = np.cos(x * np.pi * 2.5) > 0.0
    elif kind == "diagonal":
        m = np.cos((x + y) * np.pi * 1.75) > 0.0
    elif kind == "checker":
        m = (np.floor((x + 1) * 2) + np.floor((y + 1) * 2)) % 2 == 0
    elif kind == "dots":
        m = np.sqrt((np.abs(x) - 0.5) ** 2 + (np.abs(y) - 0.5) ** 2) < 0.33
    elif kind == "frame":
        m = (inf > 0.6) & (inf < 0.95)
    elif kind == "triangle":
        m = (y < 0.9) & (np.abs(x) < (y + 0.95) / 1.9)
    elif kind == "dome":
        m = (r < 0.95) & (y < 0.45)
    elif kind == "meniscus":
        m = y > -0.3 + 0.6 * x * x
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return m.astype(np.float32)


def render_image(
    labels: np.ndarray,
    size: int,
    rng: np.random.Generator,
    layout: list[tuple[tuple[int, int], str]],
    background: np.ndarray,
    placement: str = "grid",
    strength: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One uint8 [size, size] image and its boxes ``(finding index, x, y, w, h)`` in pixels.

    ``background`` is :func:`chest_background` with a pad; the image is a randomly shifted crop of it.
    ``strength``: per finding, the contrast of its pattern (default 1 for all).
    """
    pad = (background.shape[0] - size) // 2
    dy, dx = rng.integers(0, 2 * pad + 1, 2)
    img = background[dy : dy + size, dx : dx + size]
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.06, 0.06)
    coarse = max(4, size // 8)
    noise = rng.normal(0.0, 0.035, (coarse, coarse)).astype(np.float32)
    rep = -(-size // coarse)
    img = img + np.kron(noise, np.ones((rep, rep), np.float32))[:size, :size]
    boxes = []
    cell = size / GRID
    for j in np.flatnonzero(labels):
        (row, col), kind = layout[j]
        side = max(3, int(round(cell * rng.uniform(0.8, 0.95))))
        slack = cell - side
        x0 = int(round(col * cell + slack / 2 + rng.uniform(-0.4, 0.4) * slack))
        y0 = int(round(row * cell + slack / 2 + rng.uniform(-0.4, 0.4) * slack))
        if placement == "anywhere":
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        mask = _pattern_mask(kind, side) * 0.9
        if strength is not None:
            mask = mask * np.float32(strength[j])
        level = rng.uniform(0.9, 1.0)
        window = img[y0 : y0 + side, x0 : x0 + side]
        window[...] = window * (1 - mask) + level * mask
        boxes.append((int(j), float(x0), float(y0), float(side), float(side)))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), boxes


# --------------------------------------------------------------------------------------------- writer


def synthesize(
    out_dir: str | os.PathLike,
    patients: int = 200,
    size: int = 1024,
    seed: int = 0,
    vocab: LabelVocabulary = NIH14,
    *,
    overwrite: bool = False,
    placement: str = "grid",
    demographic_findings: bool = False,
) -> dict:
    """Write a synthetic dataset in the release's format to ``out_dir``; return its counts.

    Written into a temporary sibling folder, then renamed into place. An existing non-empty
    ``out_dir`` is replaced only with ``overwrite`` and only if it is an earlier synthetic dataset.
    """
    if not 16 <= size <= 8192:
        raise CxrflowError(f"--size must be between 16 and 8192 pixels, got {size}")
    if placement not in PLACEMENTS:
        raise CxrflowError(f"unknown --placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    out_dir = Path(out_dir)
    check_target(out_dir, "synth", overwrite=overwrite)
    started = time.perf_counter()
    layout_map = finding_layout(vocab)
    layout = [layout_map[name] for name in vocab.names]
    entries, labels, test_patients = sample_entries(
        patients, np.random.default_rng([seed, 1]), vocab, demographic_findings=demographic_findings
    )
    faint = [name for name in DEMOGRAPHIC_FINDINGS if demographic_findings and name in vocab.names]
    strength = np.array([FAINT_STRENGTH if name in faint else 1.0 for name in vocab.names]) if faint else None
    background = chest_background(size, pad=max(1, size // 64))

    with publishing(out_dir, "synth", overwrite=overwrite) as pub:
        tmp = pub.tmp
        (tmp / "images").mkdir()
        boxes: list[tuple[str, int, float, float, float, float]] = []
        for i, image_id in enumerate(entries["image_id"]):
            pixels, image_boxes = render_image(
                labels[i], size, np.random.default_rng([seed, 2, i]), layout, background, placement, strength
            )
            Image.fromarray(pixels, mode="L").save(tmp / "images" / image_id, format="PNG", compress_level=1)
            boxes.extend((image_id, *box) for box in image_boxes)
        write_data_entry(entries, tmp / DATA_ENTRY_NAMES[0])
        alias_of = {target: alias for alias, target in vocab.aliases.items()}
        order = sorted(boxes, key=lambda b: (b[1], b[0]))
        with open(tmp / BBOX_NAME, "w", newline="") as f:
            f.write(BBOX_HEADER + "\n")
            for image_id, j, x, y, w, h in order:
                name = vocab.names[j]
                f.write(f"{image_id},{alias_of.get(name, name)},{x:.12g},{y:.12g},{w:.12g},{h:.12g}\n")
        is_test = np.isin(entries["patient_id"].to_numpy(), test_patients)
        for name, mask in ((TRAIN_VAL_NAME, ~is_test), (TEST_NAME, is_test)):
            ids = sorted(entries["image_id"][mask])
            (tmp / name).write_text("".join(f"{i}\n" for i in ids))
        summary = {
            "out": str(out_dir),
            "patients": int(patients),
            "images": int(len(entries)),
            "size": int(size),
            "seed": int(seed),
            "placement": placement,
            "train_val_images": int((~is_test).sum()),
            "test_images": int(is_test.sum()),
            "test_patients": int(len(test_patients)),
            "boxes": len(boxes),
            "no_finding": int((labels.sum(1) == 0).sum()),
            "findings": {name: int(labels[:, j].sum()) for j, name in enumerate(vocab.names)},
            "demographic_findings": faint,
        }
        pub.commit(**summary)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
