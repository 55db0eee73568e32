"""`peft-fast merge`, `quantize` and `convert`: what they write loads in transformers, peft_fast and PEFT and gives
the adapters' outputs. The folders and the runs of every command are built once: tests/helpers/cli_workspace.py."""
import importlib.util
import json
import os
import warnings

import pytest
import torch

from cli_workspace import CONSOLE_SCRIPT, IDS, _error, _load_base, _logits, _ok  # noqa: F401
from tiny_models import peft_fast_only

pytestmark = peft_fast_only

# --- merge ----------------------------------------------------------------------------------------------------
def test_merge_gives_the_adapter_models_outputs(ws):
    root, pf, pp = ws["root"], ws["pf"], ws["pp"]
    assert "saved to" in _ok(ws["merge_pf"])["out"]
    pf.set_adapter("default")
    merged = _load_base(root / "merged_pf")
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), _logits(pf), atol=1e-5, rtol=1e-5)
    # PEFT's files: DoRA + modules_to_save, merged with --safe
    _ok(ws["merge_peft"])
    pp.set_adapter("default")
    torch.testing.assert_close(_logits(_load_base(root / "merged_peft")), _logits(pp), atol=1e-5, rtol=1e-5)


def test_merge_a_subfolder_adapter_in_bfloat16(ws):
    _ok(ws["merge_second"])
    merged = _load_base(ws["root"] / "merged_second", dtype="auto")
    assert merged.dtype == torch.bfloat16
    ws["pf"].set_adapter("second")
    torch.testing.assert_close(_logits(merged), _logits(ws["pf"]), atol=0.05, rtol=0.05)


def test_merge_errors(ws):
    _error(ws["merge_no_such_adapter"], 2, "nope is not an adapter folder", "other (pick one with --adapter-name)")
    _error(ws["merge_occupied"], 2, "occupied exists and is not empty", "--force")
    _error(ws["merge_missing_base"], 2, "nobase: no such model folder")
    # a failure of the merge itself: PEFT's lora_bias cannot merge into a layer without a bias
    _error(ws["merge_fails"], 1, "RuntimeError", "lora_bias=True")
    assert os.listdir(ws["root"] / "occupied") == ["keep.txt"]
    assert not any((ws["root"] / m).exists() for m in ("m1", "m2", "m3"))
    assert not [p for p in os.listdir(ws["root"]) if p.endswith(".tmp")]  # no staging folder left behind


# --- quantize -------------------------------------------------------------------------------------------------
def test_quantize_round_trip_without_bitsandbytes(ws):
    import peft_fast
    from peft_fast import load_quantized

    root = ws["root"]
    assert "quantized 14 linear layers" in _ok(ws["quantize_nf4"])["out"]
    cfg = json.loads((root / "q_nf4" / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_quant_type"] == "nf4" and cfg["bnb_4bit_use_double_quant"]
    assert cfg["llm_int8_skip_modules"] == ["lm_head"]
    loaded = load_quantized(str(root / "q_nf4"))
    assert type(loaded.model.layers[0].self_attn.q_proj) is peft_fast.NF4Linear
    assert torch.equal(_logits(loaded), _logits(peft_fast.quantize(_load_base(root / "base"))))

    _ok(ws["quantize_fp4"])
    loaded = load_quantized(str(root / "q_fp4"))
    layer = loaded.model.layers[1].mlp.down_proj
    assert (layer.quant_type, layer.blocksize, layer.compute_dtype) == ("fp4", 128, torch.bfloat16)
    assert not layer.quant_state.nested
    ref = peft_fast.quantize(_load_base(root / "base"), quant_type="fp4", blocksize=128, double_quant=False,
                             compute_dtype=torch.bfloat16)
    assert torch.equal(_logits(loaded), _logits(ref))


def test_quantize_with_the_codes_stored_as_bfloat16(ws):
    """--quant-storage: the codes' bytes in a bf16 tensor (bnb_4bit_quant_storage, for FSDP2), the same model."""
    from peft_fast import load_quantized

    root = ws["root"]
    _ok(ws["quantize_bf16store"])
    cfg = json.loads((root / "q_bf16store" / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_quant_storage"] == "bfloat16"
    loaded, uint8 = load_quantized(str(root / "q_bf16store")), load_quantized(str(root / "q_nf4"))
    layer = loaded.model.layers[1].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.quant_storage == torch.bfloat16
    assert torch.equal(layer.codes(), uint8.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(_logits(loaded), _logits(uint8))
    as_bytes = load_quantized(str(root / "q_bf16store"), quant_storage=torch.uint8)  # the storage is the loader's
    assert as_bytes.model.layers[1].mlp.down_proj.weight.dtype == torch.uint8
    if importlib.util.find_spec("bitsandbytes"):  # transformers + bitsandbytes read the storage from the config
        import bitsandbytes.functional as F

        bnb = _load_base(root / "q_bf16store").model.layers[1].mlp.down_proj
        assert bnb.weight.dtype == torch.bfloat16
        assert torch.equal(F.dequantize_4bit(bnb.weight.data, bnb.weight.quant_state), layer.dequantize())


def test_quantized_checkpoint_loads_with_transformers_and_bitsandbytes(ws, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    from peft_fast import load_quantized

    ours = load_quantized(str(ws["root"] / "q_nf4"))
    bnb = _load_base(ws["root"] / "q_nf4")
    layer = bnb.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit"
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                       ours.model.layers[1].mlp.down_proj.dequantize())
    # bitsandbytes' CPU layer computes in bf16 internally: same weights, bf16-rounded outputs
    torch.testing.assert_close(_logits(bnb), _logits(ours), atol=2e-2, rtol=2e-2)
    # load_quantized reads what transformers + bitsandbytes save, too: the same bytes, the same model
    from qlora_models import load4

    # with the codes stored as uint8, or as a float type (bnb_4bit_quant_storage, the usual FSDP setting)
    for storage in (torch.uint8, torch.bfloat16, torch.float32):
        folder = tmp_path / f"bnb-{storage}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load4(ws["root"] / "base", (torch.float32, torch.float32, True, "nf4"),
                  quant_storage=storage).save_pretrained(folder)
        assert torch.equal(_logits(load_quantized(str(folder))), _logits(ours)), storage


# --- convert --------------------------------------------------------------------------------------------------
def _peft_fast_and_peft_outputs(base, folder, subfolder=None):
    import peft

    import peft_fast

    kw = {"subfolder": subfolder} if subfolder else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peft_fast.PeftModel.from_pretrained(_load_base(base), str(folder), **kw)
        theirs = peft.PeftModel.from_pretrained(_load_base(base), str(folder), **kw)
    return _logits(ours), _logits(theirs)


def test_convert_bin_to_safetensors(ws):
    root, pp = ws["root"], ws["pp"]
    assert "default: adapter_model.bin ->" in _ok(ws["convert_to_st"])["out"]
    assert sorted(os.listdir(root / "conv_st")) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    config = (root / "peft" / "adapter_config.json").read_bytes()
    assert (root / "conv_st" / "adapter_config.json").read_bytes() == config
    for name in ("default", "other"):
        pp.set_adapter(name)
        ours, theirs = _peft_fast_and_peft_outputs(root / "base", root / "conv_st", None if name == "default" else name)
        torch.testing.assert_close(ours, _logits(pp), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs, _logits(pp), atol=1e-5, rtol=1e-5)


def test_convert_safetensors_to_bin(ws):
    root, pf = ws["root"], ws["pf"]
    _ok(ws["convert_to_bin"])
    assert sorted(os.listdir(root / "conv_bin")) == ["adapter_config.json", "adapter_model.bin", "second"]
    assert sorted(os.listdir(root / "conv_bin" / "second")) == ["adapter_config.json", "adapter_model.bin"]
    pf.set_adapter("default")
    ours, theirs = _peft_fast_and_peft_outputs(root / "base", root / "conv_bin")
    torch.testing.assert_close(ours, _logits(pf), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, _logits(pf), atol=1e-5, rtol=1e-5)


def test_convert_output_folder_rules(ws):
    root = ws["root"]
    _ok(ws["convert_force"])  # --force: the stale .bin, which loading would not read first but PEFT might, is gone
    assert sorted(os.listdir(root / "conv_force")) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt",
                                                       "second"]
    _error(ws["convert_occupied"], 2, "occupied exists and is not empty")
    _error(ws["convert_interrupted"], 1, "InterruptedSaveError", "interrupted")
    assert not (root / "conv_int").exists()




def test_convert_reads_every_adapter_before_writing(tmp_path, capsys):
    """A good first adapter and an interrupted second one (its config edited after the save): OUT is not made."""
    import peft_fast
    from peft_fast.cli import main

    torch.manual_seed(0)
    model = peft_fast.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                                     peft_fast.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("second", peft_fast.LoraConfig(r=2, lora_alpha=8, target_modules=["0"]))
    model.save_pretrained(tmp_path / "src")
    config = tmp_path / "src" / "second" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 16}))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "bin"]) == 1
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_an_adapter_trained_with_added_tokens(tmp_path):
    """The base is resized to the vocabulary of the tables saved with the adapter, as training resized it; the
    adapter folder's tokenizer is preferred to the base's."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import peft_fast
    from peft_fast.cli import main

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model.resize_token_embeddings(72)
        model = peft_fast.get_peft_model(model, peft_fast.LoraConfig(r=4, target_modules=["q_proj"],
                                                                     init_lora_weights=False,
                                                                     base_model_name_or_path=str(tmp_path / "base")))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 66, 71, 7]])  # added tokens included
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "adapter_bin"), "--to", "bin"]) == 0
    for adapter in ("adapter", "adapter_bin"):
        out = tmp_path / f"merged_{adapter}"
        assert main(["merge", str(tmp_path / "base"), str(tmp_path / adapter), str(out)]) == 0
        merged = AutoModelForCausalLM.from_pretrained(out)
        assert merged.get_input_embeddings().num_embeddings == 72
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny base folder and an adapter folder with a second adapter in a subfolder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_fast

    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    base.save_pretrained(root / "base")
    model = peft_fast.get_peft_model(base, peft_fast.LoraConfig(r=2, target_modules=["q_proj"],
                                                                init_lora_weights=False))
    model.add_adapter("second", peft_fast.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    return root


def test_merge_into_a_symlinked_folder_and_into_the_current_folder(small, tmp_path, monkeypatch):
    """An existing OUT (a symlink's target, ".", a mount point) is filled in place: the folder itself stays."""
    from peft_fast.cli import main

    real = tmp_path / "scratch"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(["merge", str(small / "base"), str(small / "adapter"), str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (real / "config.json").is_file()
    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert main(["merge", str(small / "base"), str(small / "adapter"), "."]) == 0
    assert here.stat().st_ino == inode and (here / "config.json").is_file()
    assert not [p for p in os.listdir(here) if p.endswith(".tmp")]


def test_merge_refuses_the_base_as_out_and_convert_refuses_a_clash(small, tmp_path, capsys):
    from peft_fast.cli import main

    before = sorted(os.listdir(small / "base"))
    assert main(["merge", str(small / "base"), str(small / "adapter"), str(small / "base"), "--force"]) == 2
    assert "input folder" in capsys.readouterr().err and sorted(os.listdir(small / "base")) == before
    out = tmp_path / "c"
    out.mkdir()
    (out / "second").write_text("a file where the second adapter's folder goes")
    assert main(["convert", str(small / "adapter"), str(out), "--force"]) == 1
    assert "nothing was written" in capsys.readouterr().err and os.listdir(out) == ["second"]


def test_traceback_keeps_the_usage_exit_code(tmp_path, capsys):
    from peft_fast.cli import main

    assert main(["inspect", str(tmp_path / "missing"), "--traceback"]) == 2
    assert "Traceback" in capsys.readouterr().err
