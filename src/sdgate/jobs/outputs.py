"""Encode once, store once: a generation's images become stored images of its job."""

from __future__ import annotations

import json
import time

from sdgate.formats import CONTENT_TYPES, EXTENSIONS
from sdgate.imaging import encode
from sdgate.jobs.lifecycle import Output
from sdgate.schemas import GeneratedImage, GenerationParams, StoredImage
from sdgate.storage import Storage, new_key, sidecar_key


def store_images(
    storage: Storage, job_id: str, model: str, params: GenerationParams, generated: list[GeneratedImage]
) -> tuple[list[Output], float, float]:
    """Encode (or take the backend's own bytes in the wanted format) and store each image and its sidecar.

    Returns the outputs and the milliseconds spent encoding and storing.
    """
    encode_s = store_s = 0.0
    outputs = []
    fmt = params.output_format
    for img in generated:
        t0 = time.perf_counter()
        # No job id in the file: the same request and seed give byte-identical images, whatever the surface.
        meta = {**params.public(), "seed": img.seed, "model": model}
        if img.encoded is not None and img.encoded_format == fmt:
            data = img.encoded
        else:
            data = encode(img.image, fmt, params.quality, meta).data
        content_type = CONTENT_TYPES[fmt]
        t1 = time.perf_counter()
        key = new_key(EXTENSIONS[fmt])
        # The image first, then its sidecar: a sidecar never describes a missing image.
        stored = storage.put(data, key, content_type)
        sidecar = {**meta, "job_id": job_id, "key": key, "content_type": content_type, "bytes": len(data)}
        if params.image_key is not None:  # what it was made from: private keys, like the sidecar's own
            sidecar["inputs"] = {"image": params.image_key, "mask": params.mask_key}
        # Not fsynced: the image file embeds the same parameters and the job record has the rest, so a
        # sidecar lost to a power cut breaks no promise; one fsync per image, not two.
        storage.put(json.dumps(sidecar).encode(), sidecar_key(key), "application/json", durable=False)
        t2 = time.perf_counter()
        encode_s += t1 - t0
        store_s += t2 - t1
        image = StoredImage(
            url=stored.url,
            key=key,
            seed=img.seed,
            width=img.image.width,
            height=img.image.height,
            content_type=content_type,
            bytes=len(data),
        )
        outputs.append(Output(image=image, data=data, pixels=img.image))
    return outputs, encode_s * 1000, store_s * 1000


def delete_images(storage: Storage, images: list[StoredImage]) -> None:
    """Remove a job's images and their sidecars (retention, or a job canceled while a worker ran it)."""
    for image in images:
        storage.delete(image.key)
        storage.delete(sidecar_key(image.key))
        # Where sidecars were stored before they moved under the private prefix (a key still valid).
        storage.delete(image.key.rsplit(".", 1)[0] + ".json")
