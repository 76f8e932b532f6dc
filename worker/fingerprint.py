"""Incremental runs, the pure part: what identifies a row's work, and the index entry that
says where its results already are.

A row's *fingerprint* is the sha256 of a canonical JSON (sorted keys, ``v: 1``) of

- the sha256 of its source image's bytes (not its path or URL: a file that moved is the
  same work, a URL whose image changed is not);
- the rendered prompt, the provider and the provider's model id;
- every option column of ``JobSpec`` (all fields but ``id``, ``image``, ``prompt``,
  ``output``, ``provider`` and ``meta``), with reference images named by their bytes'
  sha256 when they are local files, data URIs or staged copies of local files, and by
  the reference itself otherwise (an ``https://`` or ``s3://`` reference image);
- the row's ``id``: the default output key is made from it, so two rows with other ids
  keep their own objects even for the same image and options;
- the row's explicit ``output``, when it has one.

Not in it: ``meta`` (columns that only fed the template are in the prompt already), the
batch id, and worker settings (``BGSWAP_RUNWARE_*``...), which do not change the image.

The index keeps one small JSON object per fingerprint under the output root:
``{root}/_index/{fp[:2]}/{fp}.json``. Rows whose ``output`` is a presigned URL are never
indexed nor skipped: such a URL is a secret, grants PUT only (nothing can tell whether
the object is still there) and expires.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from worker.jobs import JobSpec, parse_background

VERSION = 1
INDEX_DIR = "_index"

# JobSpec fields that are not options: named explicitly in the fingerprint, or left out.
NOT_OPTIONS = frozenset({"id", "image", "prompt", "output", "provider", "meta"})
# Options whose values are image references.
REFERENCE_OPTIONS = ("style_reference_images", "background")


def canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _reference(ref: str, digests: Mapping[str, str]) -> str:
    digest = digests.get(ref)
    return f"sha256:{digest}" if digest is not None else ref


def _options(spec: JobSpec, digests: Mapping[str, str]) -> dict[str, Any]:
    # Unset options are left out, so that an option added to JobSpec later does not
    # change the fingerprint of rows that do not use it.
    options = {
        name: value
        for name, value in spec.model_dump(mode="json", exclude=set(NOT_OPTIONS)).items()
        if value is not None
    }
    if spec.style_reference_images:
        options["style_reference_images"] = [
            _reference(ref, digests) for ref in spec.style_reference_images
        ]
    image = background_image(spec)
    if image is not None:
        options["background"] = _reference(image, digests)
    return options


def fingerprint(
    spec: JobSpec, source_sha256: str, model: str, extra_digests: Mapping[str, str]
) -> str:
    """The row's fingerprint. ``extra_digests`` maps the reference images of the row
    (``content_references``) that are identified by their bytes to those bytes' sha256."""
    doc: dict[str, Any] = {
        "v": VERSION,
        "id": spec.id,
        "source": source_sha256,
        "prompt": spec.prompt,
        "provider": spec.provider,
        "model": model,
        "options": _options(spec, extra_digests),
    }
    if spec.output is not None:
        doc["output"] = spec.output
    return hashlib.sha256(canonical(doc)).hexdigest()


def background_image(spec: JobSpec) -> str | None:
    if not spec.background:
        return None
    try:
        return parse_background(spec.background).image
    except ValueError:
        return None


def references(spec: JobSpec) -> list[tuple[str, str]]:
    """The row's reference images besides its source, as (manifest field, reference)."""
    refs = [
        (f"style_reference_images[{n}]", ref)
        for n, ref in enumerate(spec.style_reference_images or ())
    ]
    image = background_image(spec)
    if image is not None:
        refs.append(("background", image))
    return refs


def by_content(ref: str, staged_prefix: str | None = None) -> bool:
    """Is this reference identified by its bytes? Local files and data URIs are (cheap to
    read, and their path says nothing of their content), and so are the staged copies of
    local files (``staged_prefix``: their key changes with every batch). URLs and
    ``s3://`` objects are identified by the reference: reading them costs a download."""
    if ref[:5].lower() == "data:" or "://" not in ref:
        return True
    return staged_prefix is not None and ref.startswith(staged_prefix)


def staged_prefix(root: str, batch_id: str) -> str:
    """Where a batch's local files are staged (producer/staging.py)."""
    return f"{root.rstrip('/')}/{batch_id}/_sources/"


def indexable(spec: JobSpec) -> bool:
    """A presigned ``output`` is never indexed nor skipped (see the module docstring)."""
    return spec.output is None or spec.output[:5].lower() == "s3://"


def index_location(root: str, fp: str) -> str:
    return f"{root.rstrip('/')}/{INDEX_DIR}/{fp[:2]}/{fp}.json"


def index_entry(fp: str, spec: JobSpec, record: Mapping[str, Any], batch_id: str) -> dict[str, Any]:
    """What the index keeps of a row that succeeded (``record``: its success record)."""
    return {
        "v": VERSION,
        "fingerprint": fp,
        "id": spec.id,
        "provider": record.get("provider"),
        "model": record.get("model"),
        "prompt": spec.prompt,
        "outputs": list(record.get("outputs", [])),
        "batch_id": batch_id,
        "finished_at": record.get("finished_at") or datetime.now(UTC).isoformat(),
    }


def _is_kept_object(url: object) -> bool:
    # Only objects bgswap can look at again: s3:// keys and local paths.
    return isinstance(url, str) and (url.startswith("s3://") or url.startswith("/"))


def entry_outputs(entry: object, fp: str) -> list[dict[str, Any]] | None:
    """The outputs of an index entry that is well formed and is for ``fp``, else None."""
    if not isinstance(entry, dict) or entry.get("v") != VERSION:
        return None
    if entry.get("fingerprint") != fp:
        return None
    outputs = entry.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return None
    if not all(isinstance(o, dict) and _is_kept_object(o.get("url")) for o in outputs):
        return None
    return outputs


def skipped_record(
    entry: Mapping[str, Any], spec: JobSpec, fp: str, model: str, now: str
) -> dict[str, Any]:
    """The terminal result of a row whose work is already done: the earlier objects."""
    return {
        "status": "skipped",
        "provider": spec.provider,
        "model": model,
        "prompt": spec.prompt,
        "outputs": list(entry["outputs"]),
        "cost_usd": 0.0,
        "provider_task_id": None,
        "error": None,
        "fingerprint": fp,
        "skipped_for": entry.get("batch_id"),
        "started_at": now,
        "finished_at": now,
    }
