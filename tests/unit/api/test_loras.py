"""A request's ``loras`` through the app over the fakes: the field's forms and limits, the 422s naming
``loras`` (before any charge, job or image), ``GET /v1/loras``, and where an accepted request's LoRAs
are kept (the backend's params, the job, the image's metadata and its sidecar)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sdgate.config import Settings
from sdgate.imaging import read_metadata
from sdgate.schemas import MAX_LORAS, GenerationRequest, LoraInfo, LoraRequest, LoraWeight, ModelDefaults, parse_loras
from sdgate.storage import sidecar_key
from tests.fakes import FakeBackend
from tests.unit.api.gate import Gate, OpenGate, bearer, create_key

MODELS = {"first": ModelDefaults(width=64, height=64, num_inference_steps=2), "second": ModelDefaults(width=64)}
LORAS = {"style": ["first", "second"], "ink": ["first"], "big": ["second"]}


def lora_gate(open_gate: OpenGate, **settings: Any) -> Gate:
    return open_gate(backend=FakeBackend(models=MODELS, loras=LORAS), **settings)


def post(gate: Gate, body: dict[str, Any], **kw: Any) -> Any:
    return gate.client.post("/v1/generations", json={"prompt": "a fox", "seed": 1, **body}, **kw)


# -- the field ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ('[{"name": "style", "weight": 0.8}, {"name": "ink"}]', [{"name": "style", "weight": 0.8}, {"name": "ink"}]),
        ("style:0.8,ink:-1.5", [{"name": "style", "weight": 0.8}, {"name": "ink", "weight": -1.5}]),
        (" style : 2 , ink ", [{"name": "style", "weight": 2.0}, {"name": "ink"}]),
        ("ink", [{"name": "ink"}]),
        ("my:style:0.5", [{"name": "my:style", "weight": 0.5}]),  # the weight is after the last ':'
        ("style,,", [{"name": "style"}]),
        ("", []),
    ],
)
def test_parse_loras_reads_a_json_array_or_name_weight_entries(text: str, parsed: list[dict[str, Any]]) -> None:
    assert parse_loras(text) == parsed


def test_parse_loras_passes_a_list_through_and_names_a_bad_entry() -> None:
    given = [{"name": "style"}]
    assert parse_loras(given) is given
    with pytest.raises(ValueError, match=r"^loras entry 'style:heavy': the weight after ':' must be a number$"):
        parse_loras("ink:1,style:heavy")
    with pytest.raises(ValueError, match=r"^loras is not a valid JSON array$"):
        parse_loras('[{"name": "style"')


def test_a_bare_name_gets_weight_one() -> None:
    request = GenerationRequest(prompt="a fox", loras="style,ink:0.5")
    assert request.loras == [LoraRequest(name="style", weight=1.0), LoraRequest(name="ink", weight=0.5)]


@pytest.mark.parametrize("weight", [-4.0, -0.5, 0.0, 4.0])
def test_a_weight_within_minus_four_to_four_is_taken(weight: float) -> None:
    assert LoraRequest(name="style", weight=weight).weight == weight


@pytest.mark.parametrize("weight", [-4.01, 4.01, 100.0, float("nan"), float("inf")])
def test_a_weight_outside_minus_four_to_four_is_refused(weight: float) -> None:
    with pytest.raises(ValidationError):
        LoraRequest(name="style", weight=weight)


def test_a_lora_needs_a_name_and_nothing_else() -> None:
    with pytest.raises(ValidationError):
        LoraRequest(name="")
    with pytest.raises(ValidationError):
        LoraRequest.model_validate({"name": "style", "strength": 1})


def test_at_most_eight_each_name_once_and_none_is_none() -> None:
    eight = [{"name": f"l{i}"} for i in range(MAX_LORAS)]
    assert len(GenerationRequest(prompt="a fox", loras=eight).loras or []) == MAX_LORAS
    with pytest.raises(ValidationError):
        GenerationRequest(prompt="a fox", loras=[*eight, {"name": "l9"}])
    with pytest.raises(ValidationError, match="each LoRA may appear once; given more than once: ink, style"):
        GenerationRequest(prompt="a fox", loras="style,ink:2,style:0.5,ink,big")
    assert GenerationRequest(prompt="a fox", loras=[]).loras is None
    assert GenerationRequest(prompt="a fox", loras="").loras is None


def post_form(gate: Gate, loras: str) -> Any:
    """A multipart request (no file in it) whose loras is the form field's text."""
    return gate.client.post("/v1/generations", data={"prompt": "a fox"}, files={"loras": (None, loras)})


# -- refused ------------------------------------------------------------------------------------------


def assert_refused(gate: Gate, resp: Any, field: str, message: str | None = None) -> None:
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_request", field)
    if message is not None:
        assert error["message"] == message
    assert gate.backend.ran == [] and gate.store.records == {} and gate.storage.objects == {}


def test_an_unknown_lora_is_a_422_naming_loras_with_the_offered_ones(open_gate: OpenGate) -> None:
    gate = lora_gate(open_gate)
    resp = post(gate, {"loras": [{"name": "style"}, {"name": "nope", "weight": 0.5}]})
    assert_refused(gate, resp, "loras", "unknown LoRA 'nope'; offered: style, ink, big")


def test_a_lora_that_does_not_fit_the_model_is_a_422_and_fits_the_other(open_gate: OpenGate) -> None:
    gate = lora_gate(open_gate)
    refused = post(gate, {"loras": [{"name": "big"}]})  # the default model, first
    assert_refused(gate, refused, "loras", "LoRA 'big' does not fit model 'first'")
    assert_refused(gate, post(gate, {"model": "second", "loras": "ink"}), "loras")
    taken = post(gate, {"model": "second", "loras": [{"name": "big"}]})
    assert taken.status_code == 200, taken.text
    assert [(p.model, p.loras) for p in gate.backend.ran] == [("second", (LoraWeight("big", 1.0),))]


def test_a_weight_out_of_range_is_a_422_naming_the_entry(open_gate: OpenGate) -> None:
    gate = lora_gate(open_gate)
    resp = post(gate, {"loras": [{"name": "style", "weight": 1}, {"name": "ink", "weight": 4.5}]})
    assert_refused(gate, resp, "loras.1.weight")


def test_too_many_and_twice_are_422s_naming_loras(open_gate: OpenGate) -> None:
    gate = lora_gate(open_gate)
    nine = [{"name": f"l{i}"} for i in range(MAX_LORAS + 1)]
    assert_refused(gate, post(gate, {"loras": nine}), "loras")
    twice = post(gate, {"loras": [{"name": "style"}, {"name": "style", "weight": 0.5}]})
    assert_refused(gate, twice, "loras")
    assert "given more than once: style" in twice.json()["error"]["message"]


def test_a_backend_without_loras_refuses_every_name(open_gate: OpenGate) -> None:
    gate = open_gate()  # the fake offers none, as the remote backends
    assert_refused(gate, post(gate, {"loras": "style"}), "loras", "unknown LoRA 'style'; offered: none")
    assert gate.client.get("/v1/loras").json() == {"object": "list", "data": []}


def test_a_refused_lora_is_not_charged_to_the_key(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    key = create_key(settings, "alice", images_per_day=1)
    gate = open_gate(settings, FakeBackend(models=MODELS, loras=LORAS))
    refused = post(gate, {"loras": "nope"}, headers=bearer(key))
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "loras"
    # The one image of the day is still there to take.
    assert post(gate, {"loras": "style"}, headers=bearer(key)).status_code == 200
    assert post(gate, {}, headers=bearer(key)).status_code == 429


def test_an_idempotent_retry_gets_its_job_even_when_its_lora_was_removed_since(open_gate: OpenGate) -> None:
    """A retry of a request already accepted answers with that job (as when the key's quota ran out since):
    the LoRA directory is live, so a LoRA may be gone by the time the client retries."""
    backend = FakeBackend(models=MODELS, loras=dict(LORAS))
    gate = open_gate(backend=backend)
    headers = {"Idempotency-Key": "retry-1"}
    first = post(gate, {"loras": "style"}, headers=headers)
    assert first.status_code == 200, first.text
    del backend._loras["style"]  # the file was removed from the LoRA directory
    again = post(gate, {"loras": "style"}, headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert len(gate.backend.ran) == 1


# -- accepted -----------------------------------------------------------------------------------------


def test_an_accepted_requests_loras_reach_the_backend_the_job_the_image_and_its_sidecar(
    open_gate: OpenGate,
) -> None:
    gate = lora_gate(open_gate)
    loras = [{"name": "ink", "weight": 0.75}, {"name": "style", "weight": 0.0}]
    resp = post(gate, {"loras": loras, "output_format": "png"})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["loras"] == loras  # in the request's order, weight 0 included
    assert gate.client.get(f"/v1/jobs/{job['id']}").json()["loras"] == loras
    [ran] = gate.backend.ran
    assert ran.loras == (LoraWeight("ink", 0.75), LoraWeight("style", 0.0))
    assert ran.active_loras == (LoraWeight("ink", 0.75),)
    assert gate.store.records[job["id"]].params.loras == ran.loras

    [image] = job["images"]
    key = image["url"].split("/images/", 1)[1]
    meta = read_metadata(gate.image_bytes(image["url"]))
    assert meta is not None and (meta["loras"], meta["model"]) == (loras, "first")
    sidecar = json.loads(gate.storage.objects[sidecar_key(key)][0])
    assert (sidecar["loras"], sidecar["model"], sidecar["job_id"]) == (loras, "first", job["id"])


def test_a_request_without_loras_records_none(open_gate: OpenGate) -> None:
    gate = lora_gate(open_gate)
    job = post(gate, {"output_format": "png"}).json()
    assert job["loras"] == []
    assert gate.backend.ran[0].loras == ()
    meta = read_metadata(gate.image_bytes(job["images"][0]["url"]))
    assert meta is not None and "loras" not in meta and meta["model"] == "first"


def test_an_async_jobs_view_shows_its_loras(open_gate: OpenGate) -> None:
    gate = lora_gate(open_gate)
    resp = post(gate, {"loras": "style:-1"}, headers={"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    assert resp.json()["loras"] == [{"name": "style", "weight": -1.0}]
    assert gate.client.get(resp.headers["Location"]).json()["loras"] == [{"name": "style", "weight": -1.0}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("style:0.5,ink", [LoraWeight("style", 0.5), LoraWeight("ink", 1.0)]),
        ('[{"name": "ink", "weight": -2}]', [LoraWeight("ink", -2.0)]),
    ],
)
def test_the_form_field_takes_both_forms(open_gate: OpenGate, value: str, expected: list[LoraWeight]) -> None:
    gate = lora_gate(open_gate)
    resp = post_form(gate, value)
    assert resp.status_code == 200, resp.text
    assert list(gate.backend.ran[0].loras) == expected
    assert resp.json()["loras"] == [{"name": lo.name, "weight": lo.weight} for lo in expected]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("style:heavy", "loras entry 'style:heavy': the weight after ':' must be a number"),
        ("style:9", None),
        ("style,style", None),
        ("nope:1", "unknown LoRA 'nope'; offered: style, ink, big"),
    ],
)
def test_a_bad_form_field_is_a_422_naming_loras(open_gate: OpenGate, value: str, message: str | None) -> None:
    gate = lora_gate(open_gate)
    resp = post_form(gate, value)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["field"].split(".")[0] == "loras"
    if message is not None:
        assert message in error["message"]
    assert gate.backend.ran == []


# -- GET /v1/loras ------------------------------------------------------------------------------------


class ListingBackend(FakeBackend):
    """A fake whose LoRAs carry every field ``GET /v1/loras`` shows."""

    def loras(self) -> list[LoraInfo]:
        return [
            LoraInfo("style", 1234, ["first"], ["second"]),
            LoraInfo("broken", 10, [], [], "LoRA 'broken' cannot be read as a LoRA (ValueError: empty)"),
        ]


def test_loras_lists_each_with_its_size_the_models_it_fits_and_why_it_cannot_be_used(open_gate: OpenGate) -> None:
    gate = open_gate(backend=ListingBackend(models=MODELS))
    assert gate.client.get("/v1/loras").json() == {
        "object": "list",
        "data": [
            {
                "name": "style",
                "object": "lora",
                "bytes": 1234,
                "models": ["first"],
                "unchecked": ["second"],
                "error": None,
            },
            {
                "name": "broken",
                "object": "lora",
                "bytes": 10,
                "models": [],
                "unchecked": [],
                "error": "LoRA 'broken' cannot be read as a LoRA (ValueError: empty)",
            },
        ],
    }


def test_loras_needs_a_key_when_auth_is_on(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    key = create_key(settings, "alice")
    gate = open_gate(settings, FakeBackend(models=MODELS, loras=LORAS))
    assert gate.client.get("/v1/loras").status_code == 401
    listed = gate.client.get("/v1/loras", headers=bearer(key))
    assert [(c["name"], c["models"]) for c in listed.json()["data"]] == [
        ("style", ["first", "second"]),
        ("ink", ["first"]),
        ("big", ["second"]),
    ]
