"""A request's ``model`` through the app over the fakes: the named model runs, the job records it, an
unknown one is refused naming the valid ones, ``GET /v1/models`` lists them all."""

from __future__ import annotations

from sdgate.schemas import ModelDefaults
from tests.fakes import FakeBackend
from tests.unit.api.gate import OpenGate

TWO = {"first": ModelDefaults(width=64, height=64, num_inference_steps=2), "second": ModelDefaults(width=128)}


def test_a_request_runs_on_the_model_it_names_and_the_job_records_it(open_gate: OpenGate) -> None:
    gate = open_gate(backend=FakeBackend(models=TWO))
    named = gate.client.post("/v1/generations", json={"prompt": "a fox", "model": "second", "seed": 1}).json()
    plain = gate.client.post("/v1/generations", json={"prompt": "a fox", "seed": 1}).json()
    assert (named["model"], plain["model"]) == ("second", "first")
    assert [p.model for p in gate.backend.ran] == ["second", "first"]
    assert gate.backend.ran[0].width == 128  # the named model's own defaults
    assert gate.store.records[named["id"]].model == "second"


def test_an_unknown_model_is_a_422_naming_model_with_the_valid_names(open_gate: OpenGate) -> None:
    gate = open_gate(backend=FakeBackend(models=TWO))
    resp = gate.client.post("/v1/generations", json={"prompt": "a fox", "model": "third"})
    assert resp.status_code == 422
    assert resp.json()["error"] == {
        "type": "invalid_request",
        "message": "unknown model 'third'; valid: first, second",
        "field": "model",
    }
    assert gate.backend.ran == []


def test_models_lists_every_model_with_its_defaults_and_whether_it_is_loaded(open_gate: OpenGate) -> None:
    gate = open_gate(backend=FakeBackend(models=TWO))
    cards = gate.client.get("/v1/models").json()["data"]
    assert [(c["id"], c["default"], c["loaded"], c["default_width"]) for c in cards] == [
        ("first", True, True, 64),
        ("second", False, False, 128),
    ]
    gate.client.post("/v1/generations", json={"prompt": "a fox", "model": "second"})
    assert [c["loaded"] for c in gate.client.get("/v1/models").json()["data"]] == [True, True]
