"""Mixed precision: which autocast dtype a run uses, and the parts of a detector kept in float32.

Under ``torch.autocast`` the convolutions and matrix products run in bfloat16 (or float16), which
oneDNN executes with the CPU's AVX-512 BF16 / AMX instructions. A detector also does arithmetic on
pixel coordinates, where bfloat16's 8-bit mantissa is 2 px at x = 500: anchors, box decoding,
NMS and the losses. Autocast alone does not protect those, because torchvision takes their dtype
from the feature maps or the heads' outputs. :func:`keep_fp32_where_needed` therefore

- hands the anchor generators float32 stand-ins of the feature maps (they read only the maps'
  shapes and dtype, and would otherwise store their cell anchors in bfloat16), and
- casts the outputs of the heads' last layers (RPN head, box, mask and keypoint predictors, the
  one-stage heads) to float32, so box decoding, post-processing and every loss run in float32.

The RoI pooling reads bfloat16 features and pools in float32 (``models.roi_align``). Parameters
stay float32 (autocast casts a copy per call), so the optimizer updates float32 master weights
and checkpoints are the same as without autocast. No state dict key changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

from detfit.config import check_setting
from detfit.errors import DetfitError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The heads whose outputs are decoded into boxes or fed to a loss, by attribute path.
HEAD_OUTPUTS = (
    "rpn.head",
    "roi_heads.box_predictor",
    "roi_heads.mask_predictor",
    "roi_heads.keypoint_predictor",
    "head",  # RetinaNet, FCOS, SSD
)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (x86 AVX-512 BF16 or AMX, through oneDNN).

    torch has no public query: ``torch.cpu._is_avx512_bf16_supported`` is what its own tests use.
    Elsewhere autocast still works, emulated and slower than float32, so it is not used."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return bool(found and torch.backends.mkldnn.is_available())


def chosen_precision(precision: str | None, amp: bool, device: torch.device) -> str:
    """The precision a setting asks for: ``precision`` when given, else ``amp``'s meaning
    (false: fp32; true: bf16 on the CPU, fp16 on CUDA, as torch.autocast's defaults)."""
    if precision is not None:
        return precision
    if not amp:
        return "fp32"
    return "fp16" if device.type == "cuda" else "bf16"


def autocast_dtype(
    precision: str | None,
    device: torch.device | str,
    *,
    amp: bool = False,
    log: Callable[[str], None] = print,
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32).

    bf16 where the hardware lacks it runs float32, with one line saying so; fp16 is CUDA only
    (float16 needs loss scaling and the CPU has no fast float16 kernels)."""
    device = torch.device(device)
    name = check_setting("precision", chosen_precision(precision, amp, device))
    if name == "fp32":
        return None
    if name == "fp16":
        if device.type != "cuda":
            raise DetfitError(
                f"precision fp16: float16 autocast runs on CUDA only, not {device.type}; "
                "use bf16 on the CPU"
            )
        return torch.float16
    supported = (
        cpu_has_bf16()
        if device.type == "cpu"
        else device.type == "cuda" and (torch.cuda.is_bf16_supported())
    )
    if not supported:
        log(f"precision bf16: {device.type} has no native bfloat16 arithmetic here; running fp32")
        return None
    return torch.bfloat16


def autocast(
    device: torch.device | str, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op context for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_float32(v) for v in value)
    return value


def _outputs_to_float32(module: nn.Module, args: Any, output: Any) -> Any:
    return _to_float32(output)


def _float32_feature_shapes(module: nn.Module, args: tuple) -> tuple:
    """(image_list, feature_maps) with each map replaced by a float32 tensor of its shape that
    holds no memory (an expanded scalar): the generators read only shape, dtype and device."""
    image_list, feature_maps = args[0], args[1]
    stand_ins = [
        torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape)
        if f.dtype in (torch.bfloat16, torch.float16)
        else f
        for f in feature_maps
    ]
    return (image_list, stand_ins, *args[2:])


def keep_fp32_where_needed(model: nn.Module) -> nn.Module:
    """Register the hooks described in the module docstring on ``model``, once, in place.

    They change nothing outside autocast (float32 stays float32), so a model keeps them when it
    is later evaluated or exported in float32."""
    if getattr(model, "_detfit_fp32_hooks", False):
        return model
    for module in model.modules():
        if isinstance(module, AnchorGenerator | DefaultBoxGenerator):
            module.register_forward_pre_hook(_float32_feature_shapes)
    for path in HEAD_OUTPUTS:
        head = model
        for part in path.split("."):
            head = getattr(head, part, None)
            if head is None:
                break
        if isinstance(head, nn.Module):
            head.register_forward_hook(_outputs_to_float32)
    model._detfit_fp32_hooks = True
    return model
