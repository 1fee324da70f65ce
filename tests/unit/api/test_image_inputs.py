"""Image inputs through the app over the fakes: JSON and multipart decode to the same request, the inputs
are stored privately and reach the backend, the JumpStart payload's fields map, retention removes them."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdgate.jobs.retention import sweep
from sdgate.schemas import Mode
from sdgate.storage import is_public_key
from tests.unit.api.gate import Gate, OpenGate


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PICTURE = png(Image.fromarray(np.random.default_rng(1).integers(0, 256, (72, 96, 3), dtype=np.uint8), "RGB"))
MASK = png(Image.new("L", (96, 72), 255))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def private_objects(gate: Gate) -> dict[str, bytes]:
    return {k: v[0] for k, v in gate.storage.objects.items() if k.startswith("private/") and not k.endswith(".json")}


def test_json_and_multipart_are_the_same_request(open_gate: OpenGate) -> None:
    gate = open_gate()
    as_json = gate.client.post(
        "/v1/generations", json={"prompt": "a fox", "seed": 4, "strength": 0.5, "image": b64(PICTURE)}
    )
    as_data_url = gate.client.post(
        "/v1/generations",
        json={"prompt": "a fox", "seed": 4, "strength": 0.5, "image": "data:image/png;base64," + b64(PICTURE)},
    )
    as_form = gate.client.post(
        "/v1/generations",
        data={"prompt": "a fox", "seed": "4", "strength": "0.5", "negative_prompt": ""},
        files={"image": ("in.png", PICTURE, "image/png")},
    )
    for resp in (as_json, as_data_url, as_form):
        assert resp.status_code == 200, resp.text
        assert [(i["width"], i["height"]) for i in resp.json()["images"]] == [(96, 72)]
    first, *others = gate.backend.ran
    assert (first.mode, first.strength, first.negative_prompt) == (Mode.img2img, 0.5, None)
    for other in others:  # the same params, only the inputs' keys differ (each request stores its own)
        assert other.public() == first.public() and other.seeds == first.seeds
    for inputs in gate.backend.inputs:
        assert inputs is not None and inputs.image.data == PICTURE and inputs.mask is None


def test_the_inputs_are_stored_privately_and_the_sidecar_names_them(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post(
        "/v1/generations",
        files={"image": ("in.png", PICTURE, "image/png"), "mask": ("m.png", MASK, "image/png")},
        data={"prompt": "a fox", "output_format": "png"},
    )
    assert resp.status_code == 200, resp.text
    [params] = gate.backend.ran
    assert params.mode is Mode.inpaint and params.strength == 1.0
    stored = private_objects(gate)
    assert set(stored) == {params.image_key, params.mask_key}
    assert stored[params.image_key or ""] == PICTURE
    assert not any(is_public_key(k) for k in stored)
    [sidecar] = [json.loads(v[0]) for k, v in gate.storage.objects.items() if k.endswith(".json")]
    assert sidecar["inputs"] == {"image": params.image_key, "mask": params.mask_key}
    assert (sidecar["mode"], sidecar["strength"]) == ("inpaint", 1.0)
    # The record refers to them: the job can be run again from it.
    record = gate.store.records[resp.json()["id"]]
    assert (record.params.image_key, record.params.mask_key) == (params.image_key, params.mask_key)


def test_retention_deletes_the_inputs_with_the_job(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post("/v1/generations", json={"prompt": "a fox", "image": b64(PICTURE), "mask": b64(MASK)})
    assert resp.status_code == 200, resp.text
    assert len(private_objects(gate)) == 2
    for record in gate.store.records.values():
        record.created -= 3600
    assert sweep(gate.store, gate.storage, max_age_s=60) == 1
    assert gate.storage.objects == {}


def test_a_refused_request_stores_nothing(open_gate: OpenGate) -> None:
    gate = open_gate()
    bad = gate.client.post(
        "/v1/generations", json={"prompt": "a fox", "image": b64(PICTURE), "mask": b64(png(Image.new("L", (8, 8))))}
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "mask"
    assert gate.storage.objects == {} and gate.store.records == {}


@pytest.mark.parametrize(
    ("form", "files", "status", "field"),
    [
        ({"prompt": "a fox", "seed": "abc"}, {"image": ("in.png", PICTURE, "image/png")}, 422, "seed"),
        ({"prompt": "a fox"}, {"seed": ("s.txt", b"1", "text/plain")}, 422, "seed"),
        ({"prompt": "a fox"}, {"image": ("in.gif", b"GIF89a" + b"\0" * 30, "image/gif")}, 422, "image"),
        ({"prompt": "a fox", "strength": "0.5"}, None, 422, "strength"),
        ({"strength": "0.5"}, {"image": ("in.png", PICTURE, "image/png")}, 422, "prompt"),
    ],
)
def test_bad_multipart_requests_name_their_field(
    open_gate: OpenGate, form: dict[str, str], files: Any, status: int, field: str
) -> None:
    gate = open_gate()
    if files is None:  # a multipart body with no file at all
        files = {"unused": (None, "")}
    resp = gate.client.post("/v1/generations", data=form, files=files)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["field"] == field
    assert gate.backend.ran == []


def test_a_field_given_twice_is_refused(open_gate: OpenGate) -> None:
    gate = open_gate()
    body = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na fox\r\n'
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n--b--\r\n'
    )
    resp = gate.client.post(
        "/v1/generations", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert resp.status_code == 422
    assert resp.json()["error"] == {
        "type": "invalid_request",
        "message": "prompt is given more than once",
        "field": "prompt",
    }


def test_an_upload_over_its_limit_is_413_and_a_body_without_images_keeps_its_own(open_gate: OpenGate) -> None:
    gate = open_gate(max_upload_bytes=8192, max_body_bytes=1024)
    resp = gate.client.post(
        "/v1/generations", data={"prompt": "a fox"}, files={"image": ("in.png", b"\x89PNG" + b"\0" * 9000, "image/png")}
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["message"] == "request body exceeds 8192 bytes"
    # /text2image takes no images: the smaller limit.
    resp = gate.client.post("/text2image", json={"text": "x" * 2000})
    assert resp.status_code == 413
    assert "1024 bytes" in resp.text


def test_the_jumpstart_payload_takes_image_and_mask_image(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post(
        "/invocations",
        json={"prompt": "a fox", "image": b64(PICTURE), "mask_image": b64(MASK), "seed": 2},
        headers={"Accept": "application/json;jpeg"},
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["generated_images"]) == 1
    [params] = gate.backend.ran
    assert (params.mode, params.width, params.height) == (Mode.inpaint, 96, 72)
    bad = gate.client.post(
        "/invocations", json={"prompt": "a fox", "image": b64(PICTURE), "mask_image": b64(png(Image.new("L", (8, 8))))}
    )
    assert bad.status_code == 400
    body = bad.json()
    assert body["ErrorCode"] == "ValidationError"
    assert body["error"]["field"] == "mask_image"
    assert body["Message"] == "mask_image is 8x8 but image is 96x72; send a mask of the image's size"


def test_the_openapi_schema_documents_both_media_types(open_gate: OpenGate) -> None:
    gate = open_gate()
    spec = gate.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/generations"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    schemas = spec["components"]["schemas"]
    as_json = schemas[body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    as_form = schemas[body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert as_json["required"] == as_form["required"] == ["prompt"]
    assert {"image", "mask", "strength"} <= set(as_json["properties"])
    assert as_form["properties"]["image"]["format"] == "binary"
