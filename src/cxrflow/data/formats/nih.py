"""NIH ChestX-ray14: today's reader (:mod:`cxrflow.data.metadata`), unchanged, as a :class:`Collection`.

Every label is known (the release has no uncertain labels), so its stores have no label states.
``--views`` does not apply: the release holds frontal images only.
"""

from __future__ import annotations

from pathlib import Path

from cxrflow.data.formats import Collection
from cxrflow.data.labels import NIH14
from cxrflow.data.metadata import DATA_ENTRY_NAMES, load_release

VOCAB = NIH14
#: The collection's own files a user may give as --data instead of its folder.
METADATA_FILES = ("Data_Entry_2017*.csv", "BBox_List_2017.csv")


def detect(root: Path) -> bool:
    return any((root / name).is_file() for name in DATA_ENTRY_NAMES)


def read(root: Path, *, views: str = "frontal", need_images: bool = True) -> Collection:
    release = load_release(root, VOCAB, need_images=need_images)
    return Collection(
        format="nih",
        root=release.root,
        vocab=release.vocab,
        entries=release.entries,
        images=release.images,
        missing=release.missing,
        metadata_path=release.data_entry_path,
        train_val=release.train_val,
        test=release.test,
        unlisted=release.unlisted,
        bbox=release.bbox,
        images_checked=release.images_checked,
    )
