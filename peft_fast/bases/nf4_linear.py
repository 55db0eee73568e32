"""NF4Linear: a frozen 4-bit linear layer in bitsandbytes' layout, made and run without bitsandbytes.

`peft_fast.quantize` puts it where a model had nn.Linear layers. Its packed weight, absmax and codebook are exactly
what bitsandbytes' `quantize_4bit` gives (kernels/nf4_quantize.py), and its state dict uses transformers' 4-bit
checkpoint keys (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_*`,
`weight.quant_state.bitsandbytes__<type>`), so a 4-bit checkpoint saved by transformers + bitsandbytes (codes stored
as uint8 or, with a float bnb_4bit_quant_storage, as the same bytes in a float tensor) loads into it, and one saved
from it loads there.

`quant_storage` is bitsandbytes' bnb_4bit_quant_storage: the dtype the `weight` parameter holds the packed bytes in
([bytes / itemsize, 1], as bitsandbytes stores them). uint8 by default; a float type lets FSDP2 shard the codes like
the other weights on torch versions whose `fully_shard` refuses integer parameters (2.11), and must then be FSDP's
param_dtype too, since its all-gather casts values. The kernels always read the bytes (`codes()`); moves keep them,
and casts of the module (`.half()`, `.to(dtype)`) never convert them.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn

from ..kernels import NF4State, nf4_dequantize, nf4_linear, nf4_quantize
from ..kernels.common.nf4_format import code_bytes

STORAGES = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}
_DTYPES = {name: dtype for name, dtype in STORAGES.items() if dtype.is_floating_point}  # a quant state's weight dtype


def storage_dtype(value) -> torch.dtype:
    """A quant_storage given as a dtype or its name (as config.json writes bnb_4bit_quant_storage)."""
    dtype = STORAGES.get(value.removeprefix("torch.")) if isinstance(value, str) else value
    if dtype not in STORAGES.values():
        raise ValueError(f"quant_storage must be one of {sorted(STORAGES)} (a torch dtype or its name), got {value!r}")
    return dtype


def check_storable(n_bytes: int, dtype: torch.dtype, what: str) -> None:
    """Refuse packed codes of `n_bytes` that quant_storage `dtype` cannot hold whole; `what` names the weight."""
    if n_bytes % dtype.itemsize:
        raise ValueError(f"{what} packs into {n_bytes} bytes, not a multiple of quant_storage {_dtype_name(dtype)}'s "
                         f"{dtype.itemsize}; store the codes as uint8 (the default), or leave the layer dense")


def stored(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed uint8 codes as bitsandbytes stores them in quant_storage `dtype`: the same bytes, [bytes/itemsize, 1]."""
    if dtype == torch.uint8:
        return packed
    check_storable(packed.numel(), dtype, "the weight")
    return packed.contiguous().reshape(-1).view(dtype).unsqueeze(1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def code_view(w: torch.Tensor, storage: torch.dtype, cached, what: str):
    """(the uint8 bytes of codes `w` stored as `storage`, the cache entry to keep for the next call). `cached` is the
    last entry, (weight, view), reused while it is still this weight's storage; pass None under compile, where the
    traced graph makes the view for free and a module must not be written. A weight no longer of its storage dtype
    had its values cast: named, with the fix, since the bytes are gone."""
    if w.dtype != storage:
        raise RuntimeError(f"{what} are stored as {_dtype_name(storage)} but the weight is now "
                           f"{_dtype_name(w.dtype)}: something cast the codes' values (FSDP2 with a "
                           "MixedPrecisionPolicy param_dtype other than the storage, or a plain "
                           "`param.data = param.data.to(...)`), which destroys them. Quantize with quant_storage "
                           "equal to FSDP's param_dtype, and reload the weights.")
    if cached is not None and cached[0] is w and cached[1].data_ptr() == w.data_ptr():
        return cached[1], cached
    view = code_bytes(w)
    return view, (w, view)


def plain_codes(w, storage: torch.dtype) -> bool:
    """Whether parameter `w` holds codes in its quant_storage as a plain tensor: what module casts must not convert
    (Module.type converts uint8 tensors too; FSDP2's sharded DTensor is moved as it is)."""
    return isinstance(w, nn.Parameter) and w.dtype == storage and type(w.data) is torch.Tensor


def apply_keeping_codes(module: nn.Module, names, storage: torch.dtype, apply) -> None:
    """Run `apply` (the module's nn.Module._apply) so that the codes in parameters `names` keep their bytes under
    every cast: codes stored in a float type are seen as their bytes meanwhile, which .half()/.to(dtype) leave
    alone, and bytes Module.type converted are put back. By name, not by object: .to("meta") or
    overwrite_module_params_on_conversion replace the parameters."""
    params = module._parameters
    saved = {k: code_bytes(params[k].data) for k in names if plain_codes(params[k], storage)}
    for k, b in saved.items():
        params[k].data = b
    try:
        apply()
    finally:
        for k, b in saved.items():
            now = params[k].data
            params[k].data = stored(code_bytes(now) if now.dtype == torch.uint8 else b.to(now.device), storage)


def save_4bit_state(destination: dict, key: str, s: NF4State) -> None:
    """The quant state of the packed tensor saved at `key`, under transformers' 4-bit checkpoint keys."""
    w = key + "."
    destination[w + "absmax"] = s.absmax
    destination[w + "quant_map"] = s.code
    meta = {"quant_type": s.quant_type, "blocksize": s.blocksize, "dtype": _dtype_name(s.dtype), "shape": list(s.shape)}
    if s.absmax.is_meta:
        raise RuntimeError(
            f"{key}: a 4-bit quant state on the meta device cannot be saved (a double-quantized one's checkpoint "
            "entry holds its nested_offset value) nor reloaded by its keys, which are not modules' attributes. "
            "If this is Accelerate's FSDP2 cpu_ram_efficient_loading, which moves the model to meta and reloads it "
            "that way (it skips the step for bitsandbytes' layers only): turn it off (fsdp_cpu_ram_efficient_loading: "
            "false in the Accelerate config, FSDP_CPU_RAM_EFFICIENT_LOADING=false, or Trainer's fsdp_config "
            "cpu_ram_efficient_loading=False).")
    if s.nested:
        destination[w + "nested_absmax"] = s.nested_absmax
        destination[w + "nested_quant_map"] = s.nested_code
        meta.update(nested_blocksize=s.nested_blocksize, nested_dtype="float32", nested_offset=float(s.offset))
    blob = json.dumps(meta).encode()
    destination[w + f"quant_state.bitsandbytes__{s.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)


def state_key_tree(s: NF4State) -> SimpleNamespace:
    """The 4-bit keys save_4bit_state writes below a packed tensor's key, as an attribute tree (what
    torch.distributed.checkpoint's helpers resolve them through; see NF4Linear._fqn_modifiers)."""
    names = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if s.nested else [])
    below = {n: None for n in names}
    below["quant_state"] = SimpleNamespace(**{f"bitsandbytes__{s.quant_type}": None})
    return SimpleNamespace(**below)


class NF4Linear(nn.Module):
    """y = x·dequant(W)ᵀ + b. `weight` is the packed uint8 codes (frozen); `quant_state` holds absmax and codebook.
    `compute_dtype` as in bitsandbytes: x is cast to it for the matmul and the output cast back (None: x's dtype).
    `quant_storage`: the dtype `weight` holds the codes' bytes in (see the module's docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 compress_statistics: bool = True, quant_type: str = "nf4",
                 compute_dtype: Optional[torch.dtype] = None, device=None, dtype=None,
                 weight: Optional[torch.Tensor] = None, bias_value: Optional[torch.Tensor] = None,
                 quant_storage: torch.dtype = torch.uint8):
        """`weight` / `bias_value`: the dense values to quantize / keep (from_linear); else nn.Linear's init."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.compress_statistics, self.quant_type = blocksize, compress_statistics, quant_type
        self.compute_dtype = compute_dtype
        self.quant_storage = storage_dtype(quant_storage)
        self._code_view = None  # (weight, its bytes as uint8) when the codes are stored in another dtype
        if weight is None:
            weight = torch.empty(out_features, in_features, device=device, dtype=dtype or torch.float32)
            nn.init.kaiming_uniform_(weight, a=5**0.5)
        self._set_weight(weight.detach())
        if bias_value is None and bias:
            bias_value = torch.zeros(out_features, device=device, dtype=dtype)
        self.bias = nn.Parameter(bias_value.detach().clone(), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, compress_statistics: bool = True,
                    quant_type: str = "nf4", compute_dtype: Optional[torch.dtype] = None,
                    quant_storage: torch.dtype = torch.uint8) -> "NF4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                    compress_statistics=compress_statistics, quant_type=quant_type, compute_dtype=compute_dtype,
                    weight=linear.weight, bias_value=linear.bias, quant_storage=quant_storage)
        return layer.train(linear.training)

    def _set_weight(self, w: torch.Tensor) -> None:
        """Quantize a dense [out, in] weight (bit for bit as bitsandbytes would) into this layer."""
        packed, state = nf4_quantize(w, blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                                     quant_type=self.quant_type)
        self.weight = nn.Parameter(stored(packed, self.quant_storage), requires_grad=False)
        self.quant_state = state

    def codes(self) -> torch.Tensor:
        """The packed codes as uint8 [bytes, 1], what the kernels read: `weight` itself, or its bytes when
        quant_storage is another dtype (a view, kept with the weight it came from)."""
        w = self._parameters["weight"]  # (not Module.__getattr__: this runs on every call)
        if w.dtype == torch.uint8:
            return w
        if torch.compiler.is_compiling():
            return code_view(w, self.quant_storage, None, "NF4Linear: its 4-bit codes")[0]
        view, self._code_view = code_view(w, self.quant_storage, self._code_view, "NF4Linear: its 4-bit codes")
        return view

    # --- math ----------------------------------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The dense weight, in the dtype it was quantized from (as bitsandbytes' dequantize_4bit)."""
        return nf4_dequantize(self.codes(), self.quant_state)

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the weight by the 4-bit rounding of ``weight`` (merging adapters into this layer). As PEFT's merge
        into bitsandbytes' Linear4bit: the sum is quantized in the dtype it was promoted to (float32 adapters over a
        16-bit base: float32, then also the state's dtype), which rounds the absmax differently from a 16-bit cast."""
        self._set_weight(weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        return nf4_linear(x, self.codes(), self.quant_state, self.bias).to(in_dtype)

    def __getstate__(self):
        # the cached uint8 view of float-stored codes aliases the weight's storage as another dtype: torch.save
        # refuses that, and a copy rebuilds it anyway
        state = super().__getstate__().copy()
        state["_code_view"] = None
        return state

    def _apply(self, fn, recurse=True):
        # The codes keep their bytes under every cast; the state follows the device only.
        apply_keeping_codes(self, ["weight"], self.quant_storage, lambda: super(NF4Linear, self)._apply(fn, recurse))
        self._code_view = None
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        storage = "" if self.quant_storage == torch.uint8 else f", quant_storage={_dtype_name(self.quant_storage)}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.quant_state.nested}{storage}")

    # --- transformers' 4-bit checkpoint keys ---------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_4bit_state(destination, prefix + "weight", self.quant_state)

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch.distributed.checkpoint's state-dict helpers (Accelerate's save of an FSDP2 model) resolve every
        state-dict key as an attribute path from the model. The 4-bit keys below `weight` (`weight.absmax`,
        `weight.quant_state.bitsandbytes__nf4`, ...) name no attribute of the packed tensor: their path is
        resolved through `_state_keys` instead (this hook is how those helpers let a module rename a path)."""
        return {"weight": "_state_keys"}

    @property
    def _state_keys(self):
        return SimpleNamespace(weight=state_key_tree(self.quant_state))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = prefix + "weight."
        blob_keys = [k for k in state_dict if k.startswith(w + "quant_state.bitsandbytes__")]
        if prefix + "weight" in state_dict:
            if not blob_keys:
                error_msgs.append(f"{prefix}weight: a 4-bit NF4Linear needs the quant state saved with it "
                                  f"({w}absmax, {w}quant_map, {w}quant_state.bitsandbytes__nf4, ...), as "
                                  "transformers writes for 4-bit models; got a weight alone. Load a dense checkpoint "
                                  "before peft_fast.quantize(), or a 4-bit checkpoint after it.")
                return
            packed = state_dict[prefix + "weight"]
            if packed.dtype != torch.uint8 and packed.dtype in STORAGES.values():  # another quant_storage: its bytes
                packed = code_bytes(packed.detach())
            try:
                state = self._state_from(state_dict, w, blob_keys[0])
            except (KeyError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
                error_msgs.append(f"{prefix}weight: the 4-bit quant state is corrupt or incomplete ({e!r}).")
                return
            if packed.dtype != torch.uint8 or packed.numel() != (state.shape.numel() + 1) // 2 or \
                    tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: a 4-bit weight of shape {tuple(state.shape)} ({packed.numel()} "
                                  f"{packed.dtype} bytes) does not fit this layer "
                                  f"[{self.out_features}, {self.in_features}].")
                return
            device = self.weight.device
            codes = packed.detach().to(device).reshape(-1, 1).clone()
            self.weight = nn.Parameter(stored(codes, self.quant_storage), requires_grad=False)
            self.quant_state = state.to(device)
            self.blocksize, self.quant_type, self.compress_statistics = state.blocksize, state.quant_type, state.nested
        elif strict:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                b = state_dict[prefix + "bias"]
                if b.shape != self.bias.shape:
                    error_msgs.append(f"size mismatch for {prefix}bias: copying a param with shape {tuple(b.shape)}, "
                                      f"the shape in the current model is {tuple(self.bias.shape)}.")
                else:
                    with torch.no_grad():
                        self.bias.copy_(b)
            elif strict:
                missing_keys.append(prefix + "bias")
        if strict:
            known = {prefix + "weight", prefix + "bias"}
            for k in state_dict:
                if k.startswith(prefix) and k not in known and not k.startswith(w) and "." not in k[len(prefix):]:
                    unexpected_keys.append(k)
            if self.bias is None and prefix + "bias" in state_dict:
                unexpected_keys.append(prefix + "bias")

    @staticmethod
    def _state_from(state_dict, w: str, blob_key: str) -> NF4State:
        meta = json.loads(bytes(state_dict[blob_key].tolist()).decode())
        qt = blob_key.rsplit("__", 1)[1]
        if meta.get("quant_type", qt) not in ("nf4", "fp4"):
            raise ValueError(f"unsupported 4-bit quant type {meta.get('quant_type')!r} (nf4 and fp4 are supported)")
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"unsupported weight dtype {meta['dtype']!r}")
        nested = {}
        if "nested_blocksize" in meta:
            nested = dict(offset=torch.tensor(float(meta["nested_offset"])),
                          nested_absmax=state_dict[w + "nested_absmax"].float(),
                          nested_code=state_dict[w + "nested_quant_map"].float(),
                          nested_blocksize=int(meta["nested_blocksize"]))
        return NF4State(state_dict[w + "absmax"], torch.Size(meta["shape"]), dtype, int(meta["blocksize"]),
                        meta.get("quant_type", qt), state_dict[w + "quant_map"].float(), **nested)
