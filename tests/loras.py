"""LoRA files for tests, made here from a local pipeline: nothing comes from a hub.

:func:`make_lora` adds a PEFT adapter to a model's UNet (and, if asked, its text encoder), gives it
seeded random weights (PEFT starts ``lora_B`` at zero, which would change nothing, and ``lora_A``
from torch's global generator), and saves it
with diffusers' ``save_lora_weights``: the diffusers/PEFT format. ``kohya=True`` writes the same
weights under kohya's names (``lora_unet_…​.lora_down.weight``, ``.lora_up.weight``, ``.alpha``),
which diffusers converts as it reads: both files change a model in the same way.

:func:`build_lora` runs it in a process of its own, for resources made in a background thread
(importing torch in a thread races the test's own imports).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(
    model_dir: Path,
    target: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    scale: float = 0.2,
    kohya: bool = False,
    text_encoder: bool = False,
) -> Path:
    """A LoRA for the pipeline saved in ``model_dir``, written to ``target`` (a ``.safetensors`` path)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    def randomized(module: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
        # PEFT's own injection: transformers' add_adapter asks for a newer PEFT than diffusers does.
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
        inject_adapter_in_model(config, module)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # every LoRA weight from the seed: the same file for the same arguments
            for name, param in module.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        state: dict[str, torch.Tensor] = get_peft_model_state_dict(module)
        return state

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    layers = {"unet_lora_layers": randomized(unet, UNET_TARGETS)}
    if text_encoder:
        from transformers import CLIPTextModel

        encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=torch.float32)
        layers["text_encoder_lora_layers"] = randomized(encoder, TEXT_TARGETS)
    target.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(target.parent, weight_name=target.name, **layers)
    if kohya:
        _to_kohya(target)
    return target


def _to_kohya(path: Path) -> None:
    """Rewrite a diffusers/PEFT LoRA file under kohya's names (alpha = rank: the same scale)."""
    import torch
    from safetensors.torch import load_file, save_file

    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(path)).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if component == "text_encoder" and not module.startswith("text_model."):
            module = f"text_model.{module}"  # kohya names CLIP's layers as transformers 4 did
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
        flat = prefix + module.replace(".", "_")
        down = kind.startswith("A")
        renamed[f"{flat}.lora_{'down' if down else 'up'}.weight"] = tensor.contiguous()
        if down:
            renamed[f"{flat}.alpha"] = torch.tensor(float(tensor.shape[0]))
    save_file(renamed, str(path))


def build_lora(model_dir: Path, target: Path, **options: object) -> Path:
    """:func:`make_lora` in a process of its own (``options`` are its keyword arguments)."""
    code = (
        "import sys, json; from pathlib import Path; from tests.loras import make_lora; "
        "make_lora(Path(sys.argv[1]), Path(sys.argv[2]), **json.loads(sys.argv[3]))"
    )
    import json

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(target), json.dumps(options)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=root,
    )
    return target
