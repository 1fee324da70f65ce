"""A job's input images: stored before the job is recorded, read where it runs, deleted with it.

They go under the storage's private prefix (never served, never on the CDN), and the job's params
refer to them by key: a job recovered after a restart, or run by a worker elsewhere, reads them back.
"""

from __future__ import annotations

from dataclasses import replace

from sdgate.formats import EXTENSIONS
from sdgate.imaging import ImageInputs, InputImage, read_input
from sdgate.schemas import GenerationParams
from sdgate.storage import Storage, input_key


def store_inputs(storage: Storage, params: GenerationParams, inputs: ImageInputs) -> GenerationParams:
    """Store the image (as sent) and the mask (as sdgate reads it); ``params`` with their keys."""

    def put(item: InputImage) -> str:
        key = input_key(EXTENSIONS[item.format])
        storage.put(item.data, key, item.content_type)
        return key

    image_key = put(inputs.image)
    mask_key = None if inputs.mask is None else put(inputs.mask)
    return replace(params, image_key=image_key, mask_key=mask_key)


def load_inputs(storage: Storage, params: GenerationParams, max_pixels: int) -> ImageInputs | None:
    """The inputs of ``params`` read back from storage; None for text-to-image."""
    if params.image_key is None:
        return None
    image = read_input(storage.get(params.image_key), "image", max_pixels)
    mask = None
    if params.mask_key is not None:
        mask = read_input(storage.get(params.mask_key), "mask", max_pixels, mask=True)
    return ImageInputs(image, mask)


def input_keys(params: GenerationParams) -> list[str]:
    """The storage keys of the job's inputs (none for text-to-image)."""
    return [k for k in (params.image_key, params.mask_key) if k is not None]


def delete_inputs(storage: Storage, params: GenerationParams) -> None:
    """Remove the job's inputs (retention, or a job that could not be recorded)."""
    for key in input_keys(params):
        storage.delete(key)
