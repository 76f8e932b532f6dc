"""Staging: local files named in a manifest are uploaded next to the batch's outputs,
so that workers on other machines can reach them. With a local output directory the
workers share this machine's filesystem and absolute paths are enough.

A file is staged only once it proved to be an image within the caps: read within the
byte cap (never whole, never a FIFO or a device) and decoded (worker/imaging.py). Its
path was confined to the manifest's roots when the row was validated.
"""

from __future__ import annotations

from PIL import Image

from worker.errors import BgswapError
from worker.fetch import read_local
from worker.imaging import check_image
from worker.jobs import JobSpec, parse_background, safe_id
from worker.settings import Settings
from worker.storage import Storage


def is_local_ref(ref: str) -> bool:
    return "://" not in ref and not ref.startswith("data:")


class Unstageable(Exception):
    """A row's local file could not be staged: the row fails with ``error`` on ``column``."""

    def __init__(self, column: str, error: BgswapError) -> None:
        super().__init__(f"{column}: {error}")
        self.column = column
        self.error = error


class Stager:
    def __init__(self, storage: Storage, root: str, settings: Settings) -> None:
        self.storage = storage
        self.root = root.rstrip("/")
        self.settings = settings

    def __call__(self, spec: JobSpec, batch_id: str) -> JobSpec:
        base = f"{self.root}/{batch_id}/_sources/{safe_id(spec.id)}"
        update: dict[str, object] = {"image": self._stage(spec.image, f"{base}-image", "image")}
        if spec.style_reference_images:
            update["style_reference_images"] = tuple(
                self._stage(ref, f"{base}-style{n}", "style_reference_images")
                for n, ref in enumerate(spec.style_reference_images, start=1)
            )
        if spec.background and parse_background(spec.background).image:
            update["background"] = self._stage(spec.background, f"{base}-background", "background")
        return spec.model_copy(update=update)

    def _stage(self, ref: str, dest: str, column: str) -> str:
        if not is_local_ref(ref):
            return ref
        s = self.settings
        try:
            data = read_local(ref, column, s.max_source_bytes)
            info = check_image(data, s.max_image_pixels, s.image_memory_budget)
            content_type = Image.MIME.get(info.format, "application/octet-stream")
            extension = Image.registered_extensions()
            suffix = next((e for e, f in extension.items() if f == info.format), "")
            return self.storage.put(dest + suffix, data, content_type).url
        except BgswapError as err:
            raise Unstageable(column, err) from err


def needs_staging(output_root: str) -> bool:
    return output_root.startswith("s3://")
