"""Staging: local files named in a manifest are uploaded next to the batch's outputs,
so that workers on other machines can reach them. With a local output directory the
workers share this machine's filesystem and absolute paths are enough.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from worker.jobs import JobSpec, parse_background, safe_id
from worker.storage import Storage


def is_local_ref(ref: str) -> bool:
    return "://" not in ref and not ref.startswith("data:")


class Stager:
    def __init__(self, storage: Storage, root: str) -> None:
        self.storage = storage
        self.root = root.rstrip("/")

    def __call__(self, spec: JobSpec, batch_id: str) -> JobSpec:
        base = f"{self.root}/{batch_id}/_sources/{safe_id(spec.id)}"
        update: dict[str, object] = {"image": self._stage(spec.image, f"{base}-image")}
        if spec.style_reference_images:
            update["style_reference_images"] = tuple(
                self._stage(ref, f"{base}-style{n}")
                for n, ref in enumerate(spec.style_reference_images, start=1)
            )
        if spec.background and parse_background(spec.background).image:
            update["background"] = self._stage(spec.background, f"{base}-background")
        return spec.model_copy(update=update)

    def _stage(self, ref: str, dest: str) -> str:
        if not is_local_ref(ref):
            return ref
        path = Path(ref)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        obj = self.storage.put(dest + path.suffix.lower(), path.read_bytes(), content_type)
        return obj.url


def needs_staging(output_root: str) -> bool:
    return output_root.startswith("s3://")
