"""The ETL manifest's last entries, added on the driver once the Spark job has written the store.

:func:`complete_manifest` is the step of :func:`cxrflow.data.etl.run_etl` between
:func:`cxrflow.data.etlsummary.build_manifest` and writing the manifest: it stops a ``--strict`` run
with quarantined images, checks the store's files, and adds what is known only from the records and
the tasks' summaries (demographics unknown, split identity, label keys, pixel spacing, boxes).
"""

from __future__ import annotations

from cxrflow.data.etlsummary import split_identities, verify_store_files
from cxrflow.data.formats.dicom import write_spacing
from cxrflow.errors import CxrflowError


def complete_manifest(manifest, tmp, release, records, summaries, sizes, strict) -> None:
    """Stop on quarantined images under ``strict``; add the demographics, split identity, label
    keys, pixel spacing and boxes to ``manifest``, after checking the store files in ``tmp``."""
    from cxrflow.data.demographics import FIELDS as DEMOGRAPHIC_FIELDS  # driver only: it imports torch
    from cxrflow.data.demographics import count_unknown
    from cxrflow.data.formats import store_label_keys

    if strict and manifest["quarantined"]:
        q = manifest["quarantined"][0]
        raise CxrflowError(
            f"{len(manifest['quarantined'])} image(s) could not be decoded (first {q['image_id']}: {q['reason']}); "
            "drop --strict to quarantine them and go on",
            q["path"],
        )
    quarantined_ids = {q["image_id"] for q in manifest["quarantined"]}
    kept = [r for r in records if r["image_id"] not in quarantined_ids]
    # the store keeps the raw values; this counts those a fused model will see as unknown
    manifest["demographics_unknown"] = count_unknown(*([r[f] for r in kept] for f in DEMOGRAPHIC_FIELDS))
    manifest["split_identity"] = split_identities(records, manifest["quarantined"])
    manifest.update(store_label_keys(release, records, quarantined_ids))
    spacing = write_spacing(tmp, [row for s in summaries for row in s["pixel_spacing"]])
    if spacing is not None:
        manifest["pixel_spacing"] = spacing
    verify_store_files(tmp, sizes, manifest["rows"])
    if release.bbox is not None:  # after the check: the box file is not a partition
        from cxrflow.data.boxes import write_boxes

        manifest["boxes"] = write_boxes(tmp, release.bbox)
