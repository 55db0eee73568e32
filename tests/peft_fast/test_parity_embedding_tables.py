"""Embedding tables saved with an adapter (PEFT's `save_embedding_layers`), as after adding tokens to the
vocabulary, and PEFT's `key_mapping` when loading a file whose module names differ from the model's."""
import copy
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tiny_models import AGAINST_PEFT, assert_close, base_model, impl, peft_fast_only, ref

NEW_VOCAB = 136  # the tiny Llama's 128 plus eight added tokens
IDS = torch.tensor([[1, 5, 130, 135, 7]])  # new tokens included
TABLES = {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"}


@pytest.fixture
def base_dir(tmp_path):
    base_model("llama").save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def resized(base_dir, seed):
    """The base loaded from its folder with eight tokens added: their rows are new, random per `seed`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(seed)
        model.resize_token_embeddings(NEW_VOCAB)
    return model


def trained(lib, base_dir, **cfg):
    model = lib.get_peft_model(resized(base_dir, 0), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False, **cfg))
    return model.eval()


def tables(folder):
    return {k for k in load_file(os.path.join(folder, "adapter_model.safetensors")) if "lora_" not in k}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("save", ["auto", True, False])
def test_a_resized_vocabulary_is_saved_with_the_adapter_as_in_peft(save, base_dir, tmp_path):
    """"auto" sees the vocabulary differ from the base model's config.json (base_model_name_or_path): the tables
    are saved, and loading writes them into a base resized the same way, so the new tokens' rows come back."""
    models = {lib.__name__: trained(lib, base_dir) for lib in (ref, impl)}
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / name, save_embedding_layers=save)
    assert tables(tmp_path / impl.__name__) == tables(tmp_path / "peft") == (set() if save is False else TABLES)
    for name, model in models.items():
        for lib in (ref, impl):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = lib.PeftModel.from_pretrained(resized(base_dir, 123), tmp_path / name)
            rows = back.get_input_embeddings().weight[128:], model.get_input_embeddings().weight[128:]
            if save is False:  # the new rows are the fresh base's own
                assert not torch.equal(*rows)
            else:
                assert torch.equal(*rows)
                assert_close(logits(back), logits(model))


def test_an_unchanged_vocabulary_saves_no_tables(base_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = impl.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                    impl.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    assert tables(tmp_path / "a") == set()


def test_save_embedding_layers_false_drops_the_tables_of_a_targeted_embedding(tmp_path):
    """"auto" saves the base table of an adapted embedding (PEFT's rule); False leaves it out, in both libraries."""
    cfg = dict(r=4, target_modules=["q_proj", "embed_tokens"])
    for lib in (ref, impl):
        model = lib.get_peft_model(base_model("llama"), lib.LoraConfig(**cfg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / lib.__name__ / "auto")
            model.save_pretrained(tmp_path / lib.__name__ / "no", save_embedding_layers=False)
    assert tables(tmp_path / impl.__name__ / "auto") == tables(tmp_path / "peft" / "auto") == {
        "base_model.model.model.embed_tokens.base_layer.weight"}
    assert tables(tmp_path / impl.__name__ / "no") == tables(tmp_path / "peft" / "no") == set()


@peft_fast_only
def test_tables_for_a_base_not_resized_are_refused_naming_the_fix(base_dir, tmp_path):
    """PEFT fails in torch's load_state_dict after creating the adapter layers; here nothing changes and the error
    says to resize the base first."""
    trained(impl, base_dir).save_pretrained(tmp_path / "a", save_embedding_layers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = AutoModelForCausalLM.from_pretrained(base_dir)
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match=r"resize_token_embeddings"):
        impl.PeftModel.from_pretrained(plain, tmp_path / "a")
    assert plain.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_key_mapping_renames_the_file_keys_as_in_peft(how, tmp_path):
    """PEFT's key_mapping (regex -> replacement on keys without `base_model.model.`, the first match wins): a file
    written for a model whose attention modules are called `attn` loads onto `self_attn`."""
    from safetensors.torch import save_file

    src = impl.get_peft_model(base_model("llama"), impl.LoraConfig(r=4, target_modules=["q_proj"],
                                                                   init_lora_weights=False))
    src.save_pretrained(tmp_path / "a")
    path = os.path.join(tmp_path / "a", "adapter_model.safetensors")
    renamed = {k.replace(".self_attn.", ".attn."): v for k, v in load_file(path).items()}
    save_file(renamed, path, metadata={"format": "pt"})  # no saved config copy: as PEFT writes it
    mapping = {r"\.attn\.": ".self_attn."}
    ids = torch.tensor([[3, 4, 5]])
    want = logits_of(src.eval(), ids)
    for lib in (ref, impl):
        if how == "from_pretrained":
            model = lib.PeftModel.from_pretrained(base_model("llama"), tmp_path / "a", key_mapping=mapping)
        else:
            model = lib.get_peft_model(base_model("llama"), lib.LoraConfig(r=2, target_modules=["v_proj"]))
            model.load_adapter(tmp_path / "a", adapter_name="b", key_mapping=mapping)
            model.set_adapter("b")
        assert_close(logits_of(model.eval(), ids), want)
    if not AGAINST_PEFT:  # PEFT warns about the keys it cannot place and loads the rest
        with pytest.raises(ValueError, match="match no adapter layer"):
            impl.PeftModel.from_pretrained(base_model("llama"), tmp_path / "a")


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("extra", [dict(modules_to_save=["embed_tokens", "lm_head"]),
                                   dict(modules_to_save=["lm_head"]),
                                   dict(trainable_token_indices=[130, 131])],
                         ids=["both-tables-trained", "head-trained", "trainable-tokens"])
def test_resized_tables_under_trained_copies_or_rows_as_in_peft(extra, base_dir, tmp_path):
    """The usual recipe for added tokens trains the tables whole (modules_to_save) or their new rows: PEFT then
    saves each wrapped table's original under `original_module` (or `token_adapter.base_layer`) beside the copy,
    and loading writes it back, so the model with adapters disabled is the resized base too."""
    assert_round_trips_as_in_peft(base_dir, tmp_path, **extra)


def assert_round_trips_as_in_peft(base_dir, tmp_path, **extra):
    """Each library's adapter over the resized base saves the same tables as PEFT's, and both files load in both
    libraries onto a base resized afresh, with and without the adapters."""
    models = {lib.__name__: trained(lib, base_dir, **extra) for lib in (ref, impl)}
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp_path / name)
    assert tables(tmp_path / impl.__name__) == tables(tmp_path / "peft")
    for name, model in models.items():
        for lib in (ref, impl):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = lib.PeftModel.from_pretrained(resized(base_dir, 123), tmp_path / name)
            assert_close(logits(back), logits(model))
            with back.disable_adapter(), model.disable_adapter():
                assert_close(logits(back), logits(model))


def test_auto_peft_model_passes_key_mapping_to_the_adapter(base_dir, tmp_path):
    from safetensors.torch import save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = impl.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                  impl.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    src.save_pretrained(tmp_path / "a")
    path = os.path.join(tmp_path / "a", "adapter_model.safetensors")
    save_file({k.replace(".self_attn.", ".attn."): v for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})
    ids = torch.tensor([[3, 4, 5]])
    for lib in (ref, impl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"),
                                                                 key_mapping={r"\.attn\.": ".self_attn."})
        assert_close(logits_of(model.eval(), ids), logits_of(src.eval(), ids))


def test_trainable_tokens_of_tied_tables_after_a_resize_as_in_peft(tmp_path):
    """Tied embeddings (Qwen, Gemma, small Llamas) with added tokens trained as rows: PEFT also saves the tied
    output layer's rows (the embedding's) with the tables; both files load in both libraries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=128, tie_word_embeddings=True)
                     ).save_pretrained(tmp_path / "base")
    assert_round_trips_as_in_peft(str(tmp_path / "base"), tmp_path, trainable_token_indices=[130, 131])
