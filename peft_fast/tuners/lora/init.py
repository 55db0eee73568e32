"""Adapter initialisation schemes, as PEFT defines them (same RNG calls in the same order)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _transpose(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return w.T if fan_in_fan_out else w


def reset(layer, name: str, init) -> None:
    """``True``: A ~ kaiming-uniform, B = 0; ``"gaussian"``: A ~ N(0, 1/r), B = 0; ``False``: leave nn.Linear's init."""
    if init is False:
        return
    a = layer.lora_A[name].weight
    if init is True:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    elif isinstance(init, str) and init.lower() == "gaussian":  # PEFT compares lowercased
        nn.init.normal_(a, std=1 / layer.r[name])
    else:
        raise ValueError(f"Unknown initialization init_lora_weights={init!r}")
    nn.init.zeros_(layer.lora_B[name].weight)
    if layer.lora_bias[name]:
        nn.init.zeros_(layer.lora_B[name].bias)


def _base_weight_float32(layer) -> tuple[torch.Tensor, torch.dtype]:
    weight = layer.get_base_layer().weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or layer.base_view.quantized:
        raise TypeError(
            f"PiSSA/OLoRA initialisation needs a float32, float16 or bfloat16 base weight, got "
            f"{'4-bit codes' if layer.base_view.quantized else weight.dtype}; "
            "initialise before quantising, then quantise the residual model."
        )
    return _transpose(weight.detach().to(torch.float32), layer.fan_in_fan_out), weight.dtype


def _write_residual(layer, residual: torch.Tensor, dtype: torch.dtype) -> None:
    base = layer.get_base_layer()
    base.weight.data = _transpose(residual, layer.fan_in_fan_out).to(dtype).contiguous()
    layer.invalidate(base=True)  # a new storage under the same version counter: derived values must go


def pissa(layer, name: str, init: str) -> None:
    """Principal singular vectors go into the adapter; the base keeps the residual, so outputs are unchanged."""
    weight, dtype = _base_weight_float32(layer)
    r, scaling = layer.r[name], layer.scaling[name]
    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
    else:
        niter = int(init.split("_niter_")[-1])
        vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
        sr, uhr = sr / scaling, ur.t()
    lora_a = torch.diag(torch.sqrt(sr)) @ uhr
    lora_b = vr @ torch.diag(torch.sqrt(sr))
    layer.lora_A[name].weight.data = lora_a
    layer.lora_B[name].weight.data = lora_b
    _write_residual(layer, weight - scaling * lora_b @ lora_a, dtype)


def olora(layer, name: str) -> None:
    """Orthonormal init from a QR decomposition of the base weight; the base keeps the residual."""
    weight, dtype = _base_weight_float32(layer)
    r, scaling = layer.r[name], layer.scaling[name]
    q, rr = torch.linalg.qr(weight)
    layer.lora_A[name].weight.data = rr[:r].contiguous()
    layer.lora_B[name].weight.data = q[:, :r].contiguous()
    residual = weight - scaling * layer.lora_B[name].weight @ layer.lora_A[name].weight
    _write_residual(layer, residual, dtype)


def orthogonal(layer, name: str) -> None:
    """PEFT's orthogonal init (its draws, in its order): A and B from the odd and even rows of one random orthogonal
    r×r matrix, so that B·A = 0 at the start while neither factor is zero."""
    r = layer.r[name]
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    weight = layer.get_base_layer().weight  # (PEFT casts to the base's dtype; packed 4-bit codes are not one)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    a = torch.randn(layer.in_features, r // 2).mm(q[0::2]).T / 10.0
    b = torch.randn(r // 2, layer.out_features).T.mm(q[1::2]) / 10.0
    layer.lora_A[name].weight = nn.Parameter(a.contiguous().to(dtype))
    layer.lora_B[name].weight = nn.Parameter(b.contiguous().to(dtype))


def initialise(layer, name: str, init) -> None:
    if init == "orthogonal":  # (compared as is, as PEFT: "Orthogonal" is an unknown init)
        orthogonal(layer, name)
    elif isinstance(init, str) and init.startswith("pissa"):
        pissa(layer, name, init)
    elif isinstance(init, str) and init.lower() == "olora":
        olora(layer, name)
    else:
        reset(layer, name, init)
