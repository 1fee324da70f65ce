"""LoRAs without a model: the directory's listing, each file's reading (cached per version), the fit check
on hand-made layer sizes, the adapters' on/off over a recording pipeline, and what a request's LoRAs
mean for batching (weight 0 does not run; batches group by the LoRA set)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from sdgate.config import Settings
from sdgate.engine import loras as loras_module
from sdgate.engine.loras import Adapters, LoraError, LoraFile, LoraLibrary, Shapes, misfit, module_shapes, resolve
from sdgate.schemas import LoraWeight
from tests.fakes import params


def write(path: Path, data: bytes = b"x" * 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- the directory ------------------------------------------------------------------------------------


def test_the_lora_dir_is_the_setting_else_loras_under_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(data_dir=tmp_path).loras_dir == tmp_path / "loras"
    assert Settings(data_dir=tmp_path, lora_dir=tmp_path / "mine").loras_dir == tmp_path / "mine"
    monkeypatch.setenv("SDGATE_LORA_DIR", str(tmp_path / "from-env"))
    assert Settings(data_dir=tmp_path).loras_dir == tmp_path / "from-env"


def test_files_are_the_safetensors_files_by_stem_with_their_size_and_mtime(tmp_path: Path) -> None:
    style = write(tmp_path / "style.safetensors", b"a" * 7)
    write(tmp_path / "my.odd name.safetensors", b"b" * 3)
    write(tmp_path / "notes.txt")
    write(tmp_path / "old.safetensors.bak")
    write(tmp_path / "model.ckpt")
    (tmp_path / "folder.safetensors").mkdir()  # a directory with the suffix is not a file
    write(tmp_path / "sub" / "nested.safetensors")  # only the directory itself is listed
    files = LoraLibrary(tmp_path).files()
    assert sorted(files) == ["my.odd name", "style"]
    st = style.stat()
    assert files["style"] == LoraFile("style", style, (7, st.st_mtime_ns))
    assert files["my.odd name"].stamp[0] == 3


def test_a_missing_directory_offers_nothing(tmp_path: Path) -> None:
    assert LoraLibrary(tmp_path / "absent").files() == {}


def test_the_directory_is_listed_again_on_every_look(tmp_path: Path) -> None:
    library = LoraLibrary(tmp_path / "loras")
    assert library.files() == {}  # the directory does not exist yet
    write(tmp_path / "loras" / "first.safetensors")
    assert list(library.files()) == ["first"]
    write(tmp_path / "elsewhere" / "second.safetensors").rename(tmp_path / "loras" / "second.safetensors")
    assert list(library.files()) == ["first", "second"]
    (tmp_path / "loras" / "first.safetensors").unlink()
    assert list(library.files()) == ["second"]


def test_an_adapter_name_is_safe_for_torch_and_new_when_the_file_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "my.style-v2 final.safetensors", b"a" * 10)
    library = LoraLibrary(tmp_path)
    before = library.files()["my.style-v2 final"]
    assert re.fullmatch(r"sdgate_[0-9a-f]{16}", before.adapter), before.adapter  # no dots, spaces or dashes
    assert library.files()["my.style-v2 final"].adapter == before.adapter  # the same file: the same name

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, later mtime
    touched = library.files()["my.style-v2 final"]
    assert touched.stamp != before.stamp and touched.adapter != before.adapter

    path.write_bytes(b"b" * 11)  # another size
    rewritten = library.files()["my.style-v2 final"]
    assert rewritten.adapter not in (before.adapter, touched.adapter)
    # Two names of the same size and time are two adapters.
    assert LoraFile("a", path, (1, 2)).adapter != LoraFile("b", path, (1, 2)).adapter


# -- reading a file -----------------------------------------------------------------------------------


class Reads:
    """Stands in for ``read_targets``: records the paths it read, answers from a table or raises."""

    def __init__(self, answers: dict[str, Shapes | Exception]):
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, path: Path) -> Shapes:
        self.calls.append(path.name)
        answer = self.answers[path.stem]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_file_is_read_once_per_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = Reads({"style": {"unet.a": (4, 4)}})
    monkeypatch.setattr(loras_module, "read_targets", reads)
    path = write(tmp_path / "style.safetensors", b"a" * 10)
    library = LoraLibrary(tmp_path)
    assert library.targets(library.files()["style"]) == {"unet.a": (4, 4)}
    assert library.targets(library.files()["style"]) == {"unet.a": (4, 4)}
    assert reads.calls == ["style.safetensors"]
    reads.answers["style"] = {"unet.a": (4, 8)}
    path.write_bytes(b"b" * 12)  # a new version is read again
    assert library.targets(library.files()["style"]) == {"unet.a": (4, 8)}
    assert reads.calls == ["style.safetensors"] * 2


def test_an_unreadable_file_is_a_lora_error_naming_it_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Reads({"broken": ValueError("it holds no LoRA weights")})
    monkeypatch.setattr(loras_module, "read_targets", reads)
    path = write(tmp_path / "broken.safetensors", b"a" * 10)
    library = LoraLibrary(tmp_path)
    for _ in range(2):
        with pytest.raises(LoraError) as caught:
            library.targets(library.files()["broken"])
        assert str(caught.value) == "LoRA 'broken' cannot be read as a LoRA (ValueError: it holds no LoRA weights)"
    assert reads.calls == ["broken.safetensors"]  # the failure is remembered for this version
    reads.answers["broken"] = {"unet.a": (2, 2)}
    path.write_bytes(b"fixed now")
    assert library.targets(library.files()["broken"]) == {"unet.a": (2, 2)}


@pytest.mark.parametrize("error", [KeyError("lora_up"), OSError("truncated"), RuntimeError("odd")])
def test_any_error_of_reading_becomes_a_lora_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.setattr(loras_module, "read_targets", Reads({"x": error}))
    write(tmp_path / "x.safetensors")
    library = LoraLibrary(tmp_path)
    with pytest.raises(LoraError, match=rf"^LoRA 'x' cannot be read as a LoRA \({type(error).__name__}: "):
        library.targets(library.files()["x"])


def test_resolve_gives_each_lora_its_current_file_and_weight_and_refuses_a_gone_one(tmp_path: Path) -> None:
    write(tmp_path / "a.safetensors")
    write(tmp_path / "b.safetensors")
    library = LoraLibrary(tmp_path)
    got = resolve(library, [LoraWeight("b", 0.5), LoraWeight("a", -1.0)])
    assert [(f.name, f.path, w) for f, w in got] == [
        ("b", tmp_path / "b.safetensors", 0.5),
        ("a", tmp_path / "a.safetensors", -1.0),
    ]
    (tmp_path / "a.safetensors").unlink()
    with pytest.raises(LoraError, match=r"^LoRA 'a' is no longer in the LoRA directory$"):
        resolve(library, [LoraWeight("b", 1.0), LoraWeight("a", 1.0)])


# -- fit ----------------------------------------------------------------------------------------------

MODEL: Shapes = {
    "unet.down.attn.to_q": (64, 64),
    "unet.down.attn.to_k": (128, 64),
    "text_encoder.encoder.layers.0.q_proj": (128, 128),
    "text_encoder_2.text_model.encoder.layers.0.q_proj": (256, 256),
}


def test_a_lora_fits_when_every_module_it_changes_is_there_with_its_sizes() -> None:
    assert misfit("style", {"unet.down.attn.to_q": (64, 64), "unet.down.attn.to_k": (128, 64)}, MODEL) is None
    assert misfit("empty", {}, MODEL) is None


def test_a_module_the_model_does_not_have_is_named() -> None:
    targets = {"unet.down.attn.to_q": (64, 64), "unet.mid.attn.to_v": (64, 64)}
    assert misfit("style", targets, MODEL) == "LoRA 'style' changes unet.mid.attn.to_v, which this model does not have"


def test_other_sizes_are_named_with_both() -> None:
    assert misfit("style", {"unet.down.attn.to_k": (64, 64)}, MODEL) == (
        "LoRA 'style' expects unet.down.attn.to_k to map 64 to 64 values; this model's maps 128 to 64"
    )
    assert misfit("style", {"unet.down.attn.to_q": (64, 32)}, MODEL) == (
        "LoRA 'style' expects unet.down.attn.to_q to map 64 to 32 values; this model's maps 64 to 64"
    )


def test_clips_text_model_prefix_is_tolerated_both_ways_in_text_encoders_only() -> None:
    # A kohya file names CLIP's layers under text_model.; this model's text encoder has none.
    assert misfit("te", {"text_encoder.text_model.encoder.layers.0.q_proj": (128, 128)}, MODEL) is None
    # A diffusers file names them without; this model's second text encoder has it.
    assert misfit("te", {"text_encoder_2.encoder.layers.0.q_proj": (256, 256)}, MODEL) is None
    # The sizes are still checked through the other name.
    assert misfit("te", {"text_encoder.text_model.encoder.layers.0.q_proj": (32, 32)}, MODEL) == (
        "LoRA 'te' expects text_encoder.text_model.encoder.layers.0.q_proj to map 32 to 32 values; "
        "this model's maps 128 to 128"
    )
    # Not for the UNet, and not for other names.
    assert misfit("u", {"unet.text_model.down.attn.to_q": (64, 64)}, MODEL) is not None
    assert misfit("te", {"text_encoder.text_model.encoder.layers.1.q_proj": (128, 128)}, MODEL) == (
        "LoRA 'te' changes text_encoder.text_model.encoder.layers.1.q_proj, which this model does not have"
    )


def test_module_shapes_are_the_linear_and_conv_layers_of_each_component() -> None:
    torch = pytest.importorskip("torch")
    nn = torch.nn
    # LayerNorm is neither: not a layer a LoRA changes here.
    block = nn.ModuleDict({"to_q": nn.Linear(4, 6), "conv": nn.Conv2d(3, 5, 3), "norm": nn.LayerNorm(6)})
    compiled: Any = type("Compiled", (), {"_orig_mod": block})()  # torch.compile's wrapper keeps the module
    assert module_shapes({"unet": compiled, "text_encoder": nn.Sequential(nn.Linear(2, 3))}) == {
        "unet.to_q": (4, 6),
        "unet.conv": (3, 5),
        "text_encoder.0": (2, 3),
    }


# -- adapters on a pipeline ---------------------------------------------------------------------------


class Pipe:
    """Records what the adapters ask of a diffusers pipeline; ``load_lora_weights`` fails for ``fail``."""

    def __init__(self, fail: str | None = None):
        self.fail = fail
        self.calls: list[tuple[Any, ...]] = []

    def load_lora_weights(self, path: str, adapter_name: str) -> None:
        self.calls.append(("load", Path(path).stem, adapter_name))
        if Path(path).stem == self.fail:
            raise ValueError("size mismatch")

    def delete_adapters(self, name: str) -> None:
        self.calls.append(("delete", name))

    def enable_lora(self) -> None:
        self.calls.append(("enable",))

    def disable_lora(self) -> None:
        self.calls.append(("disable",))

    def set_adapters(self, names: list[str], adapter_weights: list[float]) -> None:
        self.calls.append(("set", list(names), list(adapter_weights)))


def lora(tmp_path: Path, name: str) -> LoraFile:
    return LoraFile(name, tmp_path / f"{name}.safetensors", (10, 1))


def test_an_adapter_is_loaded_once_and_each_call_turns_on_exactly_its_set(tmp_path: Path) -> None:
    a, b = lora(tmp_path, "a"), lora(tmp_path, "b")
    pipe = Pipe()
    adapters = Adapters(pipe)
    adapters.activate([(a, 1.0), (b, 0.5)])
    assert pipe.calls == [
        ("load", "a", a.adapter),
        ("load", "b", b.adapter),
        ("enable",),
        ("set", [a.adapter, b.adapter], [1.0, 0.5]),
    ]
    assert adapters.loaded == {a.adapter, b.adapter} and adapters.on
    adapters.deactivate()
    adapters.deactivate()  # once off, nothing more to do
    pipe.calls.clear()
    adapters.activate([(b, -2.0)])  # loaded already: only turned on, alone
    assert pipe.calls == [("enable",), ("set", [b.adapter], [-2.0])]
    adapters.deactivate()
    assert pipe.calls[-1] == ("disable",) and pipe.calls.count(("disable",)) == 1
    assert not adapters.on


def test_deactivate_before_any_activation_leaves_the_pipeline_alone(tmp_path: Path) -> None:
    pipe = Pipe()
    Adapters(pipe).deactivate()
    assert pipe.calls == []


def test_a_failed_load_is_a_lora_error_naming_it_and_is_removed_and_tried_again(tmp_path: Path) -> None:
    good, bad = lora(tmp_path, "good"), lora(tmp_path, "bad")
    pipe = Pipe(fail="bad")
    adapters = Adapters(pipe)
    with pytest.raises(LoraError, match=r"^LoRA 'bad' could not be loaded: ValueError: size mismatch$"):
        adapters.activate([(good, 1.0), (bad, 1.0)])
    assert ("delete", bad.adapter) in pipe.calls
    assert adapters.loaded == {good.adapter}
    assert not any(c[0] in ("enable", "set") for c in pipe.calls)  # nothing was turned on
    pipe.calls.clear()
    pipe.fail = None
    adapters.activate([(bad, 1.0)])
    assert pipe.calls == [("load", "bad", bad.adapter), ("enable",), ("set", [bad.adapter], [1.0])]


# -- what a request's LoRAs mean for the engine -------------------------------------------------------


def test_weight_zero_is_recorded_but_not_run_and_the_rest_run_sorted_by_name() -> None:
    p = params(loras=(LoraWeight("zeta", 0.5), LoraWeight("off", 0.0), LoraWeight("alpha", -1.0)))
    assert p.active_loras == (LoraWeight("alpha", -1.0), LoraWeight("zeta", 0.5))
    assert p.public()["loras"] == [
        {"name": "zeta", "weight": 0.5},
        {"name": "off", "weight": 0.0},
        {"name": "alpha", "weight": -1.0},
    ]
    assert "loras" not in params().public()
    assert params(loras=(LoraWeight("off", -0.0),)).active_loras == ()


def test_batches_group_by_the_lora_set_whatever_its_order() -> None:
    plain = params(seed=1).batch_key()
    both = params(seed=2, loras=(LoraWeight("a", 1.0), LoraWeight("b", 0.5))).batch_key()
    swapped = params(seed=3, loras=(LoraWeight("b", 0.5), LoraWeight("a", 1.0))).batch_key()
    assert both == swapped
    assert params(seed=4, loras=(LoraWeight("a", 0.0),)).batch_key() == plain  # off: runs with the plain ones
    others = [
        params(seed=5, loras=(LoraWeight("a", 1.0),)).batch_key(),
        params(seed=6, loras=(LoraWeight("a", 0.5),)).batch_key(),
        params(seed=7, loras=(LoraWeight("a", 1.0), LoraWeight("b", 1.0))).batch_key(),
        params(seed=8, loras=(LoraWeight("b", 1.0),)).batch_key(),
    ]
    assert len({plain, both, *others}) == 6  # a LoRA, a weight or a set more or less: another batch


def test_at_most_max_loaded_adapters_stay_the_least_recently_used_goes_first(tmp_path: Path) -> None:
    a, b, c = (lora(tmp_path, n) for n in "abc")
    pipe = Pipe()
    adapters = Adapters(pipe, max_loaded=2)
    for used in (a, b, a):  # a is now the more recently used
        adapters.activate([(used, 1.0)])
        adapters.deactivate()
    pipe.calls.clear()
    adapters.activate([(c, 1.0)])
    assert pipe.calls[:2] == [("delete", b.adapter), ("load", "c", c.adapter)]
    assert adapters.loaded == {a.adapter, c.adapter}
    pipe.calls.clear()
    adapters.activate([(a, 1.0), (b, 1.0), (c, 1.0)])  # more than the bound in one request: all of it runs
    assert ("load", "b", b.adapter) in pipe.calls
    assert not any(call[0] == "delete" for call in pipe.calls)
    assert pipe.calls[-1] == ("set", [a.adapter, b.adapter, c.adapter], [1.0, 1.0, 1.0])
