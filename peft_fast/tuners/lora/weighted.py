"""``add_weighted_adapter``: build a new LoRA adapter from a weighted combination of existing ones (PEFT's
``LoraModel.add_weighted_adapter``), with the SVD merges batched over layers of the same shape.

Combination types, as in PEFT:

- "cat": concatenate the factors, ``A = [w_i·s_i·A_i]``, ``B = [B_i]``: exactly ``Σ w_i·s_i·B_i·A_i``, rank ``Σ r_i``.
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": merge the A factors and the B factors
  separately with per-adapter weights ``±sqrt(|w_i·s_i|)`` (sign on A only); all ranks must be equal. An
  approximation: ``B·A`` then holds cross terms ``B_i·A_j``.
- "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": merge the full deltas
  ``s_i·B_i·A_i`` (task arithmetic, TIES, DARE, magnitude pruning), then keep the top ``svd_rank`` singular triplets.

Speed: the SVD types stack the merged deltas of same-shaped layers into one ``torch.linalg.svd`` call on the
adapters' device (chunks of at most ~1 GiB). Plain "svd" without ``svd_clamp`` never forms the dense delta: the sum
is ``B_cat·A_cat`` of rank <= Σ r_i, so two thin QRs and the SVD of a small core give the same top singular triplets
(to float32 rounding, and closer to a float64 reference than a dense float32 SVD); ``svd_full_matrices`` does not
change its result. With ``progressbar=True`` a tqdm bar counts the layers written.

The merged adapter's config is PEFT's: adapters[0]'s config with ``r = lora_alpha = new rank``, the union of the
``target_modules`` (a set union, or ``"(t0)|(t1)|..."`` for regex strings), empty rank/alpha patterns. Its
``modules_to_save`` copies, if adapters[0] has any, start from the original modules, as in PEFT. It is not made
active and its parameters are frozen.

Deviations from PEFT 0.21.2 (its bugs), each making the merged delta ``s_new·B_new·A_new`` equal the intended
combination of the source deltas ``s_i·B_i·A_i``:

1. rsLoRA: PEFT builds factors whose product already is the combination, then the new adapter multiplies them by
   its own scaling ``lora_alpha/sqrt(r) = sqrt(r_new)`` (it is 1 only without rsLoRA): every type is too large by
   ``sqrt(r_new)``. Here the factors are divided by ``sqrt(s_new)`` each; the saved config is PEFT's.
2. Layers: PEFT injects the merged adapter where adapters[0]'s ``layers_to_transform``/``exclude_modules`` applied
   to the union of target names point, silently dropping the other adapters' layers elsewhere (and failing on a
   layer none of them adapts). When that set differs from the union of the adapters' layers, the merged adapter
   targets exactly that union (``target_modules`` becomes a regex of the full module names).
3. ``lora_bias``: PEFT leaves the merged B bias at its initial value (random with ``init_lora_weights=False``);
   here it is ``Σ w_i·s_i·b_i / s_new``.
4. Ranks: rank_pattern ranks below the new ``r`` are zero-padded (PEFT stores the smaller tensor under a larger
   ``r``), as is an ``svd_rank`` above a layer's dimensions; layers whose source ranks differ for a type that
   needs equal ranks raise ValueError up front (PEFT fails in ``torch.stack`` after adding the adapter).
5. Arguments are checked before anything changes, and a failure removes the half-built adapter; ``weights`` must
   have one entry per adapter (PEFT zips and drops the rest); a bad ``svd_clamp`` raises ValueError (PEFT: torch's
   RuntimeError); ``svd_driver`` is passed on CUDA only and ignored on CPU (PEFT passes it on, and torch raises
   RuntimeError); SVDs run in float32 at least, whatever the adapter dtype; PiSSA/OLoRA inits of adapters[0] are not
   re-run for the merged adapter (PEFT would rewrite the base weights); only the merged adapter's parameters are
   frozen (PEFT freezes every parameter whose name contains the new name: "m" freezes the whole model).
6. DARE with ``density=0`` gives zeros (PEFT divides by 0: NaN); see peft_fast.merge_utils.
7. Convolutions: PEFT's SVD types reshape only Conv2d deltas and fail on Conv1d/Conv3d; here every convolution's
   delta is flattened to [out, in·kernel] for the SVD and the factors get the kernel dims back.

8. ``layer_replication``: the merged adapter's config keeps adapters[0]'s map, and PEFT's injection then
   replicates the (already replicated) layers again, rewiring the other adapters' layers; here the merged adapter
   goes into the layers as they are. Its saved config still names the map, so loading it onto a fresh base
   replicates once, as the model it was made on.

Embeddings (``lora_embedding_A/B``) and convolutions combine as in PEFT otherwise; over grouped convolutions "cat"
and the SVD types are refused (B holds r/groups channels per group: PEFT's cat mixes the groups up, its svd fails).
Adapters tied by ``ensure_weight_tying`` are refused: one set of factors serves two layers, and PEFT's merged
adapter leaves lm_head out (untying it).
"""
from __future__ import annotations

import copy
import math
import re
from functools import partial, reduce
from typing import Optional, Sequence

import torch

from .. import injection
from ..merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties
from ..modules_to_save import ModulesToSaveWrapper
from ..trainable_tokens import TrainableTokensWrapper
from ...batching import changes_adapters
from ...config import replace_config
from ...names import check_adapter_name
from ...progress import progress
from .config import peft_only_init, rewrites_base
from .weighted_factors import as_matrix, cast_factors, factors

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
_SVD_CHUNK_ELEMENTS = 1 << 28  # inputs + outputs of one batched SVD call: 1 GiB of float32
_QUANTILE_MAX_ELEMENTS = 1 << 24  # torch.quantile refuses larger inputs


def _merge_fn(combination_type: str, density: Optional[float], majority_sign_method: str):
    base = combination_type[:-4] if combination_type.endswith("_svd") else combination_type
    if base in ("svd", "linear"):
        return task_arithmetic
    if base in ("ties", "dare_ties"):
        return partial(ties if base == "ties" else dare_ties, density=density,
                       majority_sign_method=majority_sign_method)
    return partial(dare_linear if base == "dare_linear" else magnitude_prune, density=density)


def check_weighted_adapter(tuner, adapters: Sequence[str], combination_type: str, svd_rank: Optional[int]):
    """PEFT's checks, messages and rank rules. Returns (combination_type, new_rank, new_target_modules)."""
    for adapter in adapters:
        if adapter not in tuner.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    for adapter in adapters:  # PEFT's refusal: a parameter's delta is per expert, which no combination models
        if getattr(tuner.peft_config[adapter], "target_parameters", None):
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter "
                             f"'{adapter}')")
    combining = "linear" if len(adapters) == 1 else combination_type  # (as below: one adapter is a rescale)
    grouped = [key for key, m in tuner.adapter_layers() if getattr(m.base_layer, "groups", 1) > 1
               and any(m.has_adapter(a) for a in adapters)]
    if grouped and (combining == "cat" or combining in SVD_TYPES):
        # B is [out, r/groups, 1...] there: concatenated, its groups would take the wrong channels, and a delta's
        # SVD gives no grouped factors (PEFT's cat is wrong there, its svd fails)
        raise NotImplementedError(f"add_weighted_adapter with combination_type={combining!r} over grouped "
                                  f"convolutions is not supported: {grouped} (nothing was changed); the factor "
                                  "types ('linear', 'ties', ...) combine them as PEFT does.")
    tied = sorted({a for _, m in tuner.adapter_layers() for a in getattr(m, "tied_adapters", {}) if a in adapters})
    if tied:  # one set of factors serves two layers: a combination written into each would overwrite the other's
        raise NotImplementedError(f"add_weighted_adapter: adapters {tied} tie lm_head to the input embedding "
                                  "(ensure_weight_tying), which combining does not support (nothing was changed).")
    # Trainable-token rows are not combined (PEFT gives the new adapter fresh rows): only module copies clash.
    wrappers = [m for _, m in injection.tuner_layers(tuner.model)
                if isinstance(m, ModulesToSaveWrapper) and not isinstance(m, TrainableTokensWrapper)]
    shared = [w for w in wrappers if sum(a in w.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(shared)} such instance(s).")
    combination_type = "linear" if len(adapters) == 1 else combination_type  # one adapter: a plain rescale
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r
             for c in (tuner.peft_config[a] for a in adapters)]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_TYPES:
        if not ranks and not svd_rank:
            raise ValueError(f"Found no adapter matching the names in {adapters}")
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    types = [type(tuner.peft_config[a].target_modules) for a in adapters]
    if not types:
        raise ValueError(f"Found no adapter matching the names in {adapters}")
    if len(set(types)) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    if types[0] is str:
        new_targets = "|".join(f"({tuner.peft_config[a].target_modules})" for a in adapters)
    elif types[0] is set:
        new_targets = reduce(lambda x, y: x | y, (tuner.peft_config[a].target_modules for a in adapters))
    else:
        raise TypeError(f"Invalid type {types[0]} found in target_modules")
    return combination_type, new_rank, new_targets


def _check_arguments(tuner, adapters, weights, combination_type, density, majority_sign_method, svd_clamp,
                     svd_driver) -> None:
    """Errors PEFT only meets halfway through (after adding the adapter), raised before anything changes."""
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters; pass one weight per adapter.")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad}: the merged adapter would be NaN or inf.")
    if density is not None and density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if density is not None and not density <= 1:
        raise ValueError(f"density is the fraction of values kept, in [0, 1]; got {density}.")
    if combination_type not in ("svd", "linear", "cat") and density is None:  # PEFT: TypeError from `None >= 1`
        raise TypeError(f"combination_type={combination_type!r} needs `density`, a float in [0, 1].")
    if "ties" in combination_type and majority_sign_method not in ("total", "frequency"):
        raise RuntimeError(f'Unimplemented mask method "{majority_sign_method}"')
    if combination_type in SVD_TYPES:
        if svd_clamp is not None and not 0 <= svd_clamp <= 1:
            raise ValueError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp}.")
        if svd_driver not in SVD_DRIVERS:
            raise ValueError(f"svd_driver must be one of {SVD_DRIVERS}, got {svd_driver!r}.")
    if combination_type in FACTOR_TYPES:
        for key, layer in tuner.adapter_layers():
            layer_ranks = {layer.r[a] for a in adapters if layer.has_adapter(a)}
            if len(layer_ranks) > 1:
                raise ValueError("All adapters must have the same r value when using combination_type linear, "
                                 f"ties, dare_ties or dare_linear; {key} has ranks {sorted(layer_ranks)}.")


def _merged_config(tuner, adapters, new_rank, new_targets, source_keys):
    """PEFT's config for the merged adapter, and the injection plan; exact module names where PEFT's config would
    miss some of the adapters' layers or reach layers none of them adapts."""
    config = replace_config(copy.deepcopy(tuner.peft_config[adapters[0]]), r=new_rank, lora_alpha=new_rank,
                                 target_modules=new_targets, alpha_pattern={}, rank_pattern={})
    try:
        plan = injection.plan_adapter(tuner.model, config, type(tuner))
        if {t.key for t in plan.targets} == source_keys:
            return config, plan
    except ValueError:  # nothing matched
        pass
    config = replace_config(config, target_modules="(" + "|".join(re.escape(k) for k in sorted(source_keys))
                                 + ")", layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    return config, injection.plan_adapter(tuner.model, config, type(tuner))


@changes_adapters
def add_weighted_adapter(tuner, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total", progressbar: bool = False) -> None:
    """Add ``adapter_name`` to ``tuner`` (a LoraModel), merged from ``adapters`` with ``weights`` (negative weights
    subtract). See the module docstring for the combination types and the deviations from PEFT. As in PEFT, an
    existing ``adapter_name`` makes this a no-op, and a single adapter is always merged with "linear"."""
    check_adapter_name(adapter_name)
    if adapter_name in tuner.peft_config:  # PEFT returns without a word, leaving the old adapter under the name
        raise ValueError(f"Adapter {adapter_name} already exists; add_weighted_adapter creates a new adapter: pick "
                         "a new name, or delete the existing one first.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int (or None for the largest rank), got {svd_rank!r}.")
    adapters, weights = list(adapters), [_number("weights", w) for w in weights]
    combination_type, new_rank, new_targets = check_weighted_adapter(tuner, adapters, combination_type, svd_rank)
    _check_arguments(tuner, adapters, weights, combination_type, density, majority_sign_method, svd_clamp,
                     svd_driver)
    source_keys = {k for k, m in tuner.adapter_layers() if any(m.has_adapter(a) for a in adapters)}
    config, plan = _merged_config(tuner, adapters, new_rank, new_targets, source_keys)
    # Same init as PEFT (its random draws come before DARE's masks), except inits that rewrite the base weights.
    # (an initialisation peft_fast cannot run is skipped too: the merge writes every factor)
    skip_init = rewrites_base(config.init_lora_weights) or peft_only_init(config.init_lora_weights)
    # PEFT injects the merged adapter without upcasting it (in the base's dtype), then "cat" writes into it while
    # the other types assign new factors: the sources' dtype, float32 at least for the SVD types.
    tuner.add_adapter(adapter_name, config, autocast_adapter_dtype=False, init=False if skip_init else None,
                      plan=plan)
    layers = [m for _, m in tuner.adapter_layers() if m.has_adapter(adapter_name)]
    bar = progress(len(layers), progressbar, "Merging adapters")
    try:
        injection.set_adapter_requires_grad(tuner.model, [adapter_name], False)
        merge = _merge_fn(combination_type, density, majority_sign_method)
        with torch.no_grad():
            if combination_type in SVD_TYPES:
                _svd_merge(layers, adapters, weights, adapter_name, combination_type, merge, new_rank, svd_clamp,
                           svd_full_matrices, svd_driver, bar)
            else:
                for layer in layers:
                    if combination_type == "cat":
                        a_new, b_new = _cat(layer, adapters, weights)
                        dtype = None
                    else:
                        a_new, b_new = _merge_factors(layer, adapters, weights, merge)
                        dtype = factors(layer, _sources(layer, adapters, weights)[0][0])[0].dtype
                    _write(layer, adapter_name, a_new, b_new, adapters, weights, dtype)
                    bar.update(1)
    except BaseException:
        tuner.delete_adapter(adapter_name)
        raise
    finally:
        bar.close()


def _number(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{what} must hold numbers, got {value!r} ({type(value).__name__}).")
    return float(value)


def _sources(layer, adapters, weights):
    found = [(a, w) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
    if not found:
        raise ValueError("No matching LoRAs found. Please raise an issue on GitHub.")
    return found


def _cat(layer, adapters, weights):
    found = _sources(layer, adapters, weights)
    a_new = torch.cat([factors(layer, a)[0] * w * float(layer.scaling[a]) for a, w in found], dim=0)
    return a_new, torch.cat([factors(layer, a)[1] for a, _ in found], dim=1)


def _merge_factors(layer, adapters, weights, merge):
    """PEFT's factor merge: A and B merged separately with ±sqrt(|w·s|) (the sign on A only), A first then B
    (the order of DARE's random draws)."""
    found = _sources(layer, adapters, weights)
    w_a, w_b = [], []
    for a, w in found:
        ws = w * float(layer.scaling[a])
        root = math.sqrt(abs(ws))
        w_a.append(root if ws >= 0 else -root)
        w_b.append(root)
    a_list = [factors(layer, a)[0].detach() for a, _ in found]
    b_list = [factors(layer, a)[1].detach() for a, _ in found]
    a_new = merge(a_list, torch.tensor(w_a).to(a_list[0].device))
    return a_new, merge(b_list, torch.tensor(w_b).to(b_list[0].device))


def _write(layer, name, a_new, b_new, adapters, weights, dtype=None) -> None:
    """Store factors whose product, times the merged adapter's own scaling, is the intended delta; zero-pad ranks
    below the adapter's r. `dtype`: the factors' new dtype (None: keep the injected one)."""
    if dtype is not None and factors(layer, name)[0].dtype != dtype:
        cast_factors(layer, name, dtype)
    a, b = factors(layer, name)
    s_new = float(layer.scaling[name])
    if s_new != 1.0:  # rsLoRA: lora_alpha/sqrt(r) != 1. PEFT keeps the factors as they are (bug 1)
        a_new, b_new = a_new / math.sqrt(s_new), b_new / math.sqrt(s_new)
    k = a_new.shape[0]
    a.zero_()
    b.zero_()
    # (an SVD's factors come as matrices: a convolution's A gets its kernel dims back, its B the trailing ones)
    kb = b_new.shape[1]  # (k, or k/groups for a grouped convolution's B)
    a[:k].copy_(a_new.reshape(k, *a.shape[1:]))
    b[:, :kb].copy_(b_new.reshape(b.shape[0], kb, *b.shape[2:]))
    b_bias = layer.lora_B[name].bias if name in layer.lora_B else None
    if b_bias is not None:  # PEFT leaves the initial bias (bug 3)
        b_bias.zero_()
        for src, w in zip(adapters, weights):
            bias = layer.lora_B[src].bias if src in layer.lora_B else None
            if bias is not None:
                b_bias.add_(bias * (w * float(layer.scaling[src]) / s_new))


def _svd_merge(layers, adapters, weights, name, combination_type, merge, new_rank, clamp, full_matrices, driver,
               bar) -> None:
    # "svd" without clamping: Σ w_i·s_i·B_i·A_i = B_cat·A_cat has rank <= Σ r_i, so its SVD comes from two thin QRs
    # and the SVD of a small core (same singular triplets as the dense SVD, up to signs, which only svd_clamp's
    # quantile would see). Other types prune or elect signs entrywise: their deltas are dense.
    low_rank = combination_type == "svd" and clamp is None
    # 1. Layer by layer, in module order: DARE's draws come in PEFT's order (masks drawn in get_delta_weight's
    #    orientation, [in, out] for fan_in_fan_out layers).
    groups: dict[tuple, list] = {}
    for layer in layers:
        found = _sources(layer, adapters, weights)
        if low_rank:
            item = _low_rankfactors(layer, found)
            key = (item[0].shape[0], item[1].shape[1], item[0].shape[1], item[0].device, item[0].dtype)
        else:
            deltas = [layer.get_delta_weight(a) for a, _ in found]
            item = merge(deltas, torch.tensor([w for _, w in found]).to(deltas[0].device))
            item = as_matrix(layer, item)
            key = (*item.shape, 0, item.device, torch.promote_types(item.dtype, torch.float32))  # no half SVDs
        groups.setdefault(key, []).append((layer, item))
    # 2. One batched SVD per run of same-shaped layers, on their device, in chunks of bounded memory.
    for (out_f, in_f, rank, device, dtype), items in groups.items():
        kwargs = {"driver": driver} if driver is not None and device.type == "cuda" else {}
        if low_rank:
            per_layer = 3 * rank * (out_f + in_f)
        else:
            outputs = out_f * out_f + in_f * in_f if full_matrices else min(out_f, in_f) * (out_f + in_f)
            per_layer = out_f * in_f + outputs
        step = max(1, _SVD_CHUNK_ELEMENTS // per_layer)
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            if low_rank:
                u, s, vh = _low_rank_svd(torch.stack([b for _, (b, _) in chunk]),
                                         torch.stack([a for _, (_, a) in chunk]), kwargs)
            else:
                stacked = torch.stack([d.to(dtype) for _, d in chunk])
                u, s, vh = torch.linalg.svd(stacked, full_matrices=full_matrices, **kwargs)
                del stacked
            k = min(new_rank, s.shape[-1])  # a rank above the layer's dimensions: _write zero-pads the rest
            u = u[..., :k] * s[:, None, :k]  # U·diag(S), truncated (full_matrices' U has more columns than S)
            vh = vh[:, :k, :]
            if clamp is not None:
                hi = _row_quantile(torch.cat([u.flatten(1), vh.flatten(1)], dim=1), clamp)[:, None, None]
                u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
            for i, (layer, _) in enumerate(chunk):
                _write(layer, name, vh[i], u[i], adapters, weights, vh.dtype)
            bar.update(len(chunk))


def _low_rankfactors(layer, found):
    """(B_cat [out, R], A_cat [R, in]) with B_cat·A_cat = Σ w_i·s_i·B_i·A_i, in float32 at least."""
    dtype = torch.promote_types(factors(layer, found[0][0])[0].dtype, torch.float32)
    b = torch.cat([factors(layer, a)[1].flatten(1).to(dtype) * (w * float(layer.scaling[a])) for a, w in found],
                  dim=1)
    return b, torch.cat([factors(layer, a)[0].flatten(1).to(dtype) for a, _ in found], dim=0)


def _low_rank_svd(b: torch.Tensor, a: torch.Tensor, kwargs: dict):
    """Thin SVD of the batch b @ a ([L, out, R] @ [L, R, in]) without forming it: b = Qb·Rb, aᵀ = Qa·Ra, then
    b·a = Qb·(Rb·Raᵀ)·Qaᵀ and the SVD of the small core Rb·Raᵀ."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.transpose(1, 2))
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(1, 2), full_matrices=False, **kwargs)
    return qb @ u, s, vh @ qa.transpose(1, 2)


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(row, q) for each row (linear interpolation), without torch.quantile's 2**24-element limit."""
    if x.numel() <= _QUANTILE_MAX_ELEMENTS:
        return torch.quantile(x, q, dim=1)
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    ordered = x.sort(dim=1).values
    return torch.lerp(ordered[:, lo], ordered[:, hi], pos - lo)
