"""add_weighted_adapter: PEFT's merged adapters (every combination type, same seeds for DARE), PEFT's config and
errors, files that load in PEFT; and, where PEFT 0.21.2 is wrong, the mathematically right merged delta."""
import copy
import json
import warnings

import pytest
import torch

from tiny_models import (AGAINST_PEFT, add_both, assert_close, assert_unchanged, base_model, copy_weights, default_cfg,
                         impl, inputs, make_pair, out, peft_fast_only, ref, snapshot)

ALL_TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
             "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]
SVD_TYPES = [t for t in ALL_TYPES if t.endswith("svd")]
NAMES = ["a0", "a1", "a2"]
WEIGHTS = [0.7, -0.4, 1.3]  # a negative weight subtracts


def _trio(ranks=(4, 4, 4), kind="llama", cfgs=None, **kw):
    """(ref, impl) with three adapters a0..a2 of the given ranks, identical weights in both libraries."""
    cfgs = cfgs or [{}, {}, {}]
    _, r, i = make_pair(kind, adapter_name="a0", r=ranks[0], **{**kw, **cfgs[0]})
    for k in (1, 2):
        add_both(r, i, f"a{k}", kind, seed=k, r=ranks[k], **{**kw, **cfgs[k]})
    return r, i


def _merge(model, seed=5, adapters=NAMES, weights=WEIGHTS, name="merged", **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(list(adapters), list(weights), name, **kw)


def _merge_both(r, i, **kw):
    _merge(r, **kw)
    _merge(i, **kw)


def _layers(model, name="merged"):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


def _deltas(model, name="merged"):
    """Per layer, the adapter's delta B·A·scaling in [out, in] orientation."""
    return {n: (m.get_delta_weight(name).T if m.fan_in_fan_out else m.get_delta_weight(name))
            for n, m in _layers(model, name).items()}


def _assert_same_deltas(actual, expected, atol=1e-5):
    assert set(actual) == set(expected)
    for n in expected:
        assert_close(actual[n], expected[n], atol=atol, rtol=1e-5, msg=n)


def _ranks_for(ctype):
    return (2, 4, 3) if ctype == "cat" or ctype.endswith("svd") else (4, 4, 4)


def _out(model, kind="llama"):
    model.eval()
    with torch.no_grad():
        return out(model, inputs(kind))


def _loads_in_peft(model, tmp_path, kind="llama"):
    """Save the merged adapter alone: PEFT loads it onto a fresh base model and gives this model's outputs.
    Returns the saved adapter_config.json."""
    model.set_adapter("merged")
    model.save_pretrained(str(tmp_path / "impl"), selected_adapters=["merged"])
    loaded = ref.PeftModel.from_pretrained(base_model(kind), str(tmp_path / "impl" / "merged"))
    assert_close(_out(loaded, kind), _out(model, kind), atol=1e-4, rtol=1e-4)
    with open(tmp_path / "impl" / "merged" / "adapter_config.json") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- parity
# every type on Llama; GPT-2 (Conv1D, fan_in_fan_out: DARE's masks drawn on the transposed delta) on a subset
PARITY_CASES = [(t, "llama") for t in ALL_TYPES] + [(t, "gpt2") for t in ("svd", "cat", "ties", "dare_ties_svd")]


@pytest.mark.parametrize("ctype,kind", PARITY_CASES, ids=[f"{k}-{t}" for t, k in PARITY_CASES])
def test_matches_peft(ctype, kind, tmp_path):
    r, i = _trio(_ranks_for(ctype), kind)
    kw = {"combination_type": ctype, "density": 0.5}
    _merge_both(r, i, **kw)
    _assert_same_deltas(_deltas(i), _deltas(r))
    assert list(i.peft_config) == list(r.peft_config) and i.active_adapter == r.active_adapter == "a0"
    grads = {n: p.requires_grad for n, p in i.named_parameters() if ".merged." in n}
    assert grads and not any(grads.values())
    for n, p in r.named_parameters():  # the active adapter stays trainable, as in PEFT
        if ".a0." in n:
            assert dict(i.named_parameters())[n].requires_grad == p.requires_grad
    i.set_adapter("merged")
    r.set_adapter("merged")
    assert_close(_out(i, kind), _out(r, kind), atol=1e-4, rtol=1e-4)
    saved = _loads_in_peft(i, tmp_path, kind)
    r.save_pretrained(str(tmp_path / "ref"), selected_adapters=["merged"])
    with open(tmp_path / "ref" / "merged" / "adapter_config.json") as f:
        expected = json.load(f)
    for d in (saved, expected):  # sets are written as lists in no particular order
        d.pop("peft_version")
        d["target_modules"] = sorted(d["target_modules"])
    assert saved == expected


OPTION_CASES = ([(t, {"svd_clamp": 0.9}) for t in SVD_TYPES] + [(t, {"svd_rank": 6, "svd_full_matrices": False})
                 for t in SVD_TYPES] + [(t, {"majority_sign_method": "frequency", "density": 0.3}) for t in SVD_TYPES]
                + [(t, {"majority_sign_method": "frequency"}) for t in ("ties", "dare_ties")]
                + [(t, {"density": 1.0}) for t in ("ties", "dare_ties", "dare_linear", "magnitude_prune")]
                + [(t, {"density": 0.0}) for t in ("ties", "magnitude_prune")])  # DARE: PEFT gives NaN


@pytest.mark.parametrize("ctype,extra", OPTION_CASES, ids=[f"{t}-{e}" for t, e in OPTION_CASES])
def test_options_match_peft(ctype, extra):
    r, i = _trio(_ranks_for(ctype))
    _merge_both(r, i, **{"combination_type": ctype, "density": 0.5, **extra})
    _assert_same_deltas(_deltas(i), _deltas(r))
    assert i.peft_config["merged"].r == r.peft_config["merged"].r


@pytest.mark.parametrize("ctype", ["svd", "cat", "ties", "dare_linear_svd"])
def test_single_adapter_is_linear(ctype):
    r, i = _trio()
    _merge_both(r, i, adapters=["a1"], weights=[-2.0], combination_type=ctype)
    _assert_same_deltas(_deltas(i), _deltas(r))
    assert i.peft_config["merged"].r == 4


def test_existing_name_is_refused():
    """PEFT returns without a word (the old adapter keeps the name); peft_fast says so, changing nothing either."""
    r, i = _trio()
    snap = snapshot(r)
    _merge(r, name="a1", combination_type="cat")
    assert_unchanged(r, snap)
    if AGAINST_PEFT:
        return
    snap = snapshot(i)
    with pytest.raises(ValueError, match="a1 already exists"):
        _merge(i, name="a1", combination_type="cat")
    assert_unchanged(i, snap)


def test_modules_to_save_and_regex_targets_match_peft():
    """adapters[0]'s modules_to_save: the merged adapter gets its own copy of the original module (PEFT's
    behaviour); regex target_modules are joined as "(t0)|(t1)|(t2)"."""
    cfgs = [{"modules_to_save": ["lm_head"], "target_modules": r".*\.q_proj"},
            {"target_modules": r".*\.(q_proj|v_proj)"}, {"target_modules": r".*mlp\.down_proj"}]
    r, i = _trio(cfgs=cfgs)
    for model in (r, i):
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["a0"].weight.add_(1.0)
    _merge_both(r, i, combination_type="svd")
    _assert_same_deltas(_deltas(i), _deltas(r))
    for key in ("target_modules", "modules_to_save", "r", "lora_alpha"):
        assert getattr(i.peft_config["merged"], key) == getattr(r.peft_config["merged"], key), key
    head_i, head_r = i.base_model.model.lm_head, r.base_model.model.lm_head
    assert torch.equal(head_i.modules_to_save["merged"].weight, head_r.modules_to_save["merged"].weight)
    assert torch.equal(head_i.modules_to_save["merged"].weight, head_i.original_module.weight)


# ----------------------------------------------------------------------------------------------- errors
ERROR_CASES = {
    "unknown adapter": ({}, {"adapters": ["a0", "nope"], "weights": [1.0, 1.0]}),
    "unequal ranks": ({"ranks": (2, 4, 3)}, {"combination_type": "linear"}),
    "unequal ranks dare": ({"ranks": (2, 4, 3)}, {"combination_type": "dare_ties", "density": 0.5}),
    "bad combination": ({}, {"combination_type": "average"}),
    "mixed target types": ({"cfgs": [{}, {"target_modules": r".*\.q_proj"}, {}]}, {}),
    "shared modules_to_save": ({"cfgs": [{"modules_to_save": ["lm_head"]}] * 2 + [{}]}, {}),
    "no density": ({}, {"combination_type": "ties"}),
    "negative density": ({}, {"combination_type": "dare_linear_svd", "density": -0.5}),
    "bad sign method": ({}, {"combination_type": "ties", "density": 0.5, "majority_sign_method": "median"}),
    "negative svd_rank": ({}, {"svd_rank": -1}),
    "no adapters": ({}, {"adapters": [], "weights": []}),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_peft(case):
    build, kw = ERROR_CASES[case]
    r, i = _trio(**build)
    with pytest.raises(Exception) as ref_err:
        _merge(r, **kw)
    snap = snapshot(i)
    with pytest.raises(ref_err.type):
        _merge(i, **kw)
    if not AGAINST_PEFT:  # peft_fast checks before anything changes; PEFT may leave a half-built adapter
        assert_unchanged(i, snap)


@peft_fast_only
@pytest.mark.parametrize("build,kw,error", [
    ({}, {"weights": [1.0, 2.0]}, ValueError),  # PEFT zips: the third adapter is silently dropped
    ({}, {"svd_clamp": 1.5}, ValueError),  # PEFT: torch.quantile's RuntimeError
    ({}, {"svd_driver": "qr"}, ValueError),
    # config ranks agree (4), v_proj's do not (2, 4): PEFT fails in torch.stack (RuntimeError) after adding the adapter
    ({"cfgs": [{"rank_pattern": {"v_proj": 2}}, {}, {}]}, {"combination_type": "ties", "density": 0.5}, ValueError),
])
def test_argument_errors(build, kw, error):
    _, i = _trio(**build)
    snap = snapshot(i)
    with pytest.raises(error):
        _merge(i, **kw)
    assert_unchanged(i, snap)


@peft_fast_only
def test_svd_driver_ignored_on_cpu():
    """PEFT hands svd_driver to torch.linalg.svd, which raises RuntimeError for CPU tensors: the driver is a cuSOLVER
    choice, so it is ignored on CPU."""
    for ctype in ("svd", "ties_svd"):
        r, i = _trio()
        with pytest.raises(RuntimeError, match="driver"):
            _merge(r, combination_type=ctype, density=0.5, svd_driver="gesvd")
        _merge(i, combination_type=ctype, density=0.5, svd_driver="gesvd")
        _merge(i, name="plain", combination_type=ctype, density=0.5)
        _assert_same_deltas(_deltas(i), _deltas(i, "plain"), atol=0)


@peft_fast_only
def test_batched_svd_chunks_and_progressbar(monkeypatch, capsys):
    """Chunks of one layer (as on huge layers), the sort-based quantile and the progress bar change nothing."""
    from peft_fast.tuners.lora import weighted as weighted_adapter

    _, i = _trio((2, 4, 3))
    _merge(i, combination_type="ties_svd", density=0.6, svd_clamp=0.8)
    monkeypatch.setattr(weighted_adapter, "_SVD_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(weighted_adapter, "_QUANTILE_MAX_ELEMENTS", 1)
    _merge(i, name="chunked", combination_type="ties_svd", density=0.6, svd_clamp=0.8, progressbar=True)
    _assert_same_deltas(_deltas(i, "chunked"), _deltas(i), atol=1e-6)
    assert "Merging adapters" in capsys.readouterr().err


@peft_fast_only
def test_failure_removes_the_new_adapter(monkeypatch):
    from peft_fast.tuners.lora import weighted as weighted_adapter

    _, i = _trio()
    snap = snapshot(i)
    monkeypatch.setattr(weighted_adapter, "_write", None)  # fails once the adapter has been added
    with pytest.raises(TypeError):
        _merge(i, combination_type="cat")
    assert_unchanged(i, snap)


# ----------------------------------------------------------------------------------------------- the right deltas
def _weighted_sum(model, layer_names):
    """Σ_i w_i·s_i·B_i·A_i per layer, over the adapters each layer has, in float64."""
    mods = dict(model.named_modules())
    return {n: sum(w * (mods[n].lora_B[a].weight.double() @ mods[n].lora_A[a].weight.double()) * mods[n].scaling[a]
                   for a, w in zip(NAMES, WEIGHTS) if a in mods[n].lora_A) for n in layer_names}


def _truncated(delta, k):
    u, s, vh = torch.linalg.svd(delta)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _factor_merge(model, layer_names):
    """The "linear" merge as intended: (Σ sqrt|w·s| B_i)(Σ ±sqrt|w·s| A_i), no further scaling."""
    result = {}
    for n, m in dict(model.named_modules()).items():
        if n in layer_names:
            ws = {a: w * m.scaling[a] for a, w in zip(NAMES, WEIGHTS)}
            result[n] = sum(abs(x) ** 0.5 * m.lora_B[a].weight.double() for a, x in ws.items()) @ \
                sum(x / abs(x) ** 0.5 * m.lora_A[a].weight.double() for a, x in ws.items())
    return result


def _close_to(actual, expected, atol=2e-5):
    assert set(actual) == set(expected)
    for n in expected:
        assert_close(actual[n].double(), expected[n], atol=atol, rtol=1e-5, msg=n)


def test_svd_at_full_rank_is_the_exact_sum():
    """Without rsLoRA PEFT's SVD merge is right: with svd_rank >= Σ r_i the merged delta is Σ w_i·s_i·B_i·A_i."""
    r, i = _trio()
    for model in (r, i):
        _merge(model, combination_type="svd", svd_rank=12)
        _close_to(_deltas(model), _weighted_sum(model, _layers(model)))
        _merge(model, name="cat", combination_type="cat")
        _close_to(_deltas(model, "cat"), _weighted_sum(model, _layers(model)))


@peft_fast_only
@pytest.mark.parametrize("ctype", ["svd", "cat", "linear", "ties_svd", "dare_linear", "dare_ties_svd"])
def test_rslora_merged_delta(ctype, tmp_path):
    """PEFT bug 1: with use_rslora the merged adapter's scaling lora_alpha/sqrt(r) = sqrt(r_new) multiplies factors
    whose product already is the combination (PEFT's delta is sqrt(4) = 2x the combination for svd/linear, sqrt(9)
    = 3x for cat of ranks 2+4+3). Here the delta is the combination, with PEFT's config (its file loads in PEFT)."""
    r, i = _trio(_ranks_for(ctype), use_rslora=True, lora_alpha=16)
    _merge_both(r, i, combination_type=ctype, density=0.5)
    new_rank = 9 if ctype == "cat" else 4
    assert i.peft_config["merged"].r == new_rank and i.peft_config["merged"].use_rslora
    names = _layers(i)
    expected = {"svd": lambda: {n: _truncated(d, 4) for n, d in _weighted_sum(i, names).items()},
                "cat": lambda: _weighted_sum(i, names), "linear": lambda: _factor_merge(i, names)}
    if ctype in expected:
        _close_to(_deltas(i), expected[ctype]())
    _close_to(_deltas(i), {n: d.double() / new_rank ** 0.5 for n, d in _deltas(r).items()})  # PEFT: sqrt(r) too big
    _loads_in_peft(i, tmp_path)


@peft_fast_only
def test_layers_of_every_adapter_are_kept(tmp_path):
    """PEFT bug 2: the merged config takes adapters[0]'s layers_to_transform, so PEFT's merged adapter covers layer 0
    only and silently drops a1's and a2's layer-1 updates. Here it covers every layer an adapter adapts."""
    r, i = _trio(cfgs=[{"layers_to_transform": [0]}, {}, {}])
    _merge_both(r, i, combination_type="cat")
    assert all(".layers.0." in n for n in _layers(r))
    assert any(".layers.1." in n for n in _layers(i))
    sources = {n for n, m in i.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert set(_layers(i)) == sources
    _close_to(_deltas(i), _weighted_sum(i, sources))
    _loads_in_peft(i, tmp_path)


@peft_fast_only
def test_lora_bias_is_merged():
    """PEFT bug 3: PEFT leaves the merged lora_B bias at its initial (here random) value. Here it is
    Σ w_i·s_i·b_i / s_new, so each layer's adapter output is the weighted sum of the adapters' outputs ("cat")."""
    r, i = _trio(kind="mlp", lora_bias=True)
    _merge_both(r, i, combination_type="cat")
    x = torch.randn(5, 16)
    for n, m in _layers(i).items():
        x_in = x if n.endswith("lin0") else torch.randn(5, 32)
        with torch.no_grad():
            y = {a: m.lora_B[a](m.lora_A[a](x_in)) * m.scaling[a] for a in NAMES + ["merged"]}
        assert_close(y["merged"], sum(w * y[a] for a, w in zip(NAMES, WEIGHTS)), atol=1e-5, rtol=1e-5)
        peft_bias = dict(r.named_modules())[n].lora_B["merged"].bias
        assert not torch.allclose(peft_bias, m.lora_B["merged"].bias)


@peft_fast_only
def test_rank_pattern_ranks_are_padded(tmp_path):
    """PEFT bug 4: a layer whose rank_pattern rank is below the new r gets a smaller tensor under r (its file does
    not load back). Here the factors are zero-padded: same delta as PEFT's, consistent shapes."""
    r, i = _trio(rank_pattern={"v_proj": 2})
    _merge_both(r, i, combination_type="linear")
    _assert_same_deltas(_deltas(i), _deltas(r))
    v_i = i.base_model.model.model.layers[0].self_attn.v_proj
    v_r = r.base_model.model.model.layers[0].self_attn.v_proj
    assert v_r.lora_A["merged"].weight.shape[0] == 2 and v_r.r["merged"] == 4
    assert v_i.lora_A["merged"].weight.shape[0] == 4 and v_i.r["merged"] == 4
    _loads_in_peft(i, tmp_path)


@peft_fast_only
def test_svd_rank_above_layer_dims(tmp_path):
    """PEFT bug 4: svd_rank=40 > v_proj's 32 outputs leaves PEFT with lora_B [32, 32] under r=40 (unusable). Here the
    factors are zero-padded, and rank 40 >= Σ r_i = 12 reproduces the exact weighted sum everywhere."""
    r, i = _trio()
    _merge_both(r, i, combination_type="svd", svd_rank=40)
    v_r = r.base_model.model.model.layers[0].self_attn.v_proj
    assert v_r.lora_B["merged"].weight.shape == (32, 32)
    v_i = i.base_model.model.model.layers[0].self_attn.v_proj
    assert v_i.lora_B["merged"].weight.shape == (32, 40) and v_i.lora_A["merged"].weight.shape == (40, 64)
    _close_to(_deltas(i), _weighted_sum(i, _layers(i)))
    _loads_in_peft(i, tmp_path)


@peft_fast_only
@pytest.mark.parametrize("ctype,kw", [("svd", dict(svd_clamp=1.0)), ("magnitude_prune_svd", dict(density=1.0)),
                                      ("dare_linear_svd", dict(density=1.0)), ("ties_svd", dict(density=0.5))])
def test_svd_rank_above_layer_dims_for_dense_svd_types(ctype, kw):
    """The same zero-padding for the types that take the SVD of a dense delta (full_matrices' U is [out, out] while
    S has min(out, in) values). Nothing pruned (density 1) leaves the exact weighted sum."""
    r, i = _trio()
    _merge(i, combination_type=ctype, svd_rank=40, **kw)
    v_i = i.base_model.model.model.layers[0].self_attn.v_proj
    assert v_i.lora_B["merged"].weight.shape == (32, 40) and v_i.lora_A["merged"].weight.shape == (40, 64)
    if kw.get("density") == 1.0:  # (sign election and clamping, PEFT's clamp(-q, q) of signed values, change it)
        _close_to(_deltas(i), _weighted_sum(i, _layers(i)))


@peft_fast_only
def test_pissa_init_not_rerun_on_the_base():
    """PEFT bug 5: adapters[0] initialised with PiSSA makes PEFT run PiSSA again for the merged adapter, which
    rewrites the base weights under every adapter. Here the base weights are left alone."""
    r, i = _trio(cfgs=[{"init_lora_weights": "pissa"}, {}, {}])
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    before_r, before_i = r.state_dict()[key].clone(), i.state_dict()[key].clone()
    _merge_both(r, i, combination_type="cat")
    assert not torch.equal(r.state_dict()[key], before_r)
    assert torch.equal(i.state_dict()[key], before_i)
    _close_to(_deltas(i), _weighted_sum(i, _layers(i)))


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("ctype", ["cat", "linear", "dare_ties", "svd"])
def test_merged_adapter_dtype_over_a_bf16_model_as_peft(ctype, autocast):
    """PEFT injects the merged adapter without upcasting: "cat" writes into it (the base's bf16), the factor types
    assign the sources' dtype and the SVD types float32 at least, whatever `autocast_adapter_dtype` the sources
    were made with."""
    base = base_model("llama").to(torch.bfloat16)
    models = []
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            m = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**default_cfg("llama", r=4)),
                                   adapter_name="a0", autocast_adapter_dtype=autocast)
            for k in (1, 2):
                torch.manual_seed(k)
                m.add_adapter(f"a{k}", lib.LoraConfig(**default_cfg("llama", r=4)), autocast_adapter_dtype=autocast)
        models.append(m)
    r, i = models
    copy_weights(r, i)
    _merge_both(r, i, combination_type=ctype, density=0.5)
    want, got = dict(r.named_parameters()), dict(i.named_parameters())
    merged = [n for n in want if ".merged." in n]
    assert merged
    for n in merged:
        assert got[n].dtype == want[n].dtype, (n, got[n].dtype, want[n].dtype)
    _assert_same_deltas({n: d.float() for n, d in _deltas(i).items()}, {n: d.float() for n, d in _deltas(r).items()},
                        atol=1e-2 if ctype == "cat" or not autocast else 1e-5)
