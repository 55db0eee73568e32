"""What PEFT derives from the model and the task before injecting: the task models' heads trained in full
(SEQ_CLS, TOKEN_CLS, QUESTION_ANS), the default target_modules by model type, and the shortening of long target
lists that decides what adapter_config.json lists."""
import copy
import os
import warnings

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForTokenClassification,
    RobertaConfig,
    RobertaForTokenClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from lycoris_pairs import assert_same_files as assert_same_adapter_dir
from tiny_models import assert_close, copy_weights, impl, peft_fast_only, ref

ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=100)


def build(cls, config_cls, **kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config_cls(**kw))


def ids(seed=1):
    return torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def pair(base, **cfg):
    r = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**copy.deepcopy(cfg)))  # PEFT extends the lists
    i = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(**copy.deepcopy(cfg)))
    with torch.no_grad():  # a head that differs from the base's, so a head left untrained or unsaved shows
        for n, p in r.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    copy_weights(r, i)
    return r, i


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


HEAD_CASES = {
    "token-cls-roberta": (lambda: build(RobertaForTokenClassification, RobertaConfig, **ENCODER), "TOKEN_CLS",
                          "classifier", None),
    "token-cls-llama": (lambda: build(LlamaForTokenClassification, LlamaConfig, **LLAMA), "TOKEN_CLS", "score",
                        ["q_proj", "v_proj"]),
    "question-answering-bert": (lambda: build(BertForQuestionAnswering, BertConfig, **ENCODER), "QUESTION_ANS",
                                "qa_outputs", None),
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_task_heads_train_and_save_as_in_peft(case, tmp_path):
    make, task, head, targets = HEAD_CASES[case]
    base = make()
    r, i = pair(base, r=4, task_type=task, target_modules=targets, init_lora_weights=False)
    assert type(i).__name__ == type(r).__name__
    assert trainable(i) == trainable(r)
    assert f"base_model.model.{head}.modules_to_save.default.weight" in trainable(i)
    x = ids()
    torch.manual_seed(0)  # Llama's token classifier keeps a dropout in train mode
    out_r = r(input_ids=x)
    torch.manual_seed(0)
    out_i = i(input_ids=x)
    for name in ("logits", "start_logits", "end_logits"):
        if hasattr(out_r, name):
            assert_close(getattr(out_i, name), getattr(out_r, name))
    sum(v.float().pow(2).sum() for v in out_r.values()).backward()
    sum(v.float().pow(2).sum() for v in out_i.values()).backward()
    grads_r = {n: p.grad for n, p in r.named_parameters() if p.requires_grad}
    for n, p in i.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads_r[n], msg=n)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")  # the head's weights and name are in the file
    back = ref.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "impl").eval()
    r.eval()
    with torch.no_grad():
        for name in ("logits", "start_logits"):
            if hasattr(out_r, name):
                assert_close(getattr(back(input_ids=x), name), getattr(r(input_ids=x), name))


@peft_fast_only
@pytest.mark.parametrize("task,make,head", [
    ("TOKEN_CLS", lambda: build(RobertaForTokenClassification, RobertaConfig, **ENCODER), "classifier"),
    ("QUESTION_ANS", lambda: build(BertForQuestionAnswering, BertConfig, **ENCODER), "qa_outputs"),
])
def test_all_linear_with_a_token_or_qa_head_trains_the_head_in_full(task, make, head):
    """Deliberate difference: PEFT adapts the head with LoRA and then fails making it a modules_to_save (TypeError).
    The head is excluded from `all-linear` instead, as PEFT itself does for SEQ_CLS, and trained in full."""
    base = make()
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(r=4, task_type=task, target_modules="all-linear"))
    model = impl.get_peft_model(copy.deepcopy(base), impl.LoraConfig(r=4, task_type=task, target_modules="all-linear"))
    targets = model.peft_config["default"].target_modules
    assert not any(t == head or t.endswith("." + head) for t in targets), targets
    assert f"base_model.model.{head}.modules_to_save.default.weight" in trainable(model)
    assert any("query.lora_A" in n for n in trainable(model))


@pytest.mark.parametrize("model_cls,make", [
    ("PeftModelForSequenceClassification", lambda: build(BertForSequenceClassification, BertConfig, **ENCODER)),
    ("PeftModelForTokenClassification", lambda: build(RobertaForTokenClassification, RobertaConfig, **ENCODER)),
    ("PeftModelForQuestionAnswering", lambda: build(BertForQuestionAnswering, BertConfig, **ENCODER)),
])
def test_add_adapter_to_a_task_model_trains_its_head_whatever_the_new_config_says(model_cls, make):
    base = make()
    task = {"PeftModelForSequenceClassification": "SEQ_CLS", "PeftModelForTokenClassification": "TOKEN_CLS",
            "PeftModelForQuestionAnswering": "QUESTION_ANS"}[model_cls]
    models = []
    for lib in (ref, impl):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, task_type=task))
        assert type(model).__name__ == model_cls
        added = lib.LoraConfig(r=2, target_modules=["query"])  # no task type
        model.add_adapter("two", added)
        model.set_adapter("two")
        models.append(model)
        assert set(model.peft_config["two"].modules_to_save) == set(models[0].peft_config["two"].modules_to_save)
    assert trainable(models[1]) == trainable(models[0])
    assert any(".modules_to_save.two." in n for n in trainable(models[1]))


@peft_fast_only
def test_add_adapter_leaves_the_callers_config_alone():
    """Deliberate difference: PEFT's task models extend the caller's modules_to_save list in place."""
    model = impl.get_peft_model(build(BertForSequenceClassification, BertConfig, **ENCODER),
                                impl.LoraConfig(r=4, task_type="SEQ_CLS"))
    added = impl.LoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler"])
    model.add_adapter("two", added)
    assert added.modules_to_save == ["pooler"]
    assert set(model.peft_config["two"].modules_to_save) == {"pooler", "classifier", "score"}


# --------------------------------------------------------------------------------- default target_modules
@pytest.mark.parametrize("make,expected", [
    (lambda: build(XLMRobertaForSequenceClassification, XLMRobertaConfig, **ENCODER), {"query", "value"}),
    (lambda: build(DebertaV2ForSequenceClassification, DebertaV2Config, **ENCODER), {"query_proj", "value_proj"}),
])
def test_default_targets_of_common_classifier_bases(make, expected, tmp_path):
    base = make()
    r, i = pair(base, r=4, task_type="SEQ_CLS", init_lora_weights=False)
    assert set(i.peft_config["default"].target_modules) == set(r.peft_config["default"].target_modules) == expected
    assert trainable(i) == trainable(r)
    r.eval()
    i.eval()
    x = ids()
    with torch.no_grad():
        assert_close(i(input_ids=x).logits, r(input_ids=x).logits)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")


@peft_fast_only
@pytest.mark.parametrize("tuner", ["LORA", "LOHA", "LOKR", "IA3", "VERA", "OFT", "ADALORA"])
def test_default_target_tables_are_peft_s(tuner):
    """Every model type PEFT has a default for has the same one here (PEFT's tables are the oracle)."""
    from peft.utils import constants

    from peft_fast.tuners import registry

    ours = registry.get(tuner).model_cls.default_targets
    theirs = getattr(constants, f"TRANSFORMERS_MODELS_TO_{tuner}_TARGET_MODULES_MAPPING")
    norm = {k: v if isinstance(v, str) else sorted(v) for k, v in theirs.items()}
    assert {k: v if isinstance(v, str) else sorted(v) for k, v in ours.items()} == norm


class _Gemma4Like(nn.Module):
    """gemma4's default is a regex over the text model's attention, leaving the vision tower's alone."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "gemma4", "tie_word_embeddings": False,
                                          "to_dict": lambda self: {"model_type": "gemma4"}})()
        block = lambda: nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)})  # noqa: E731
        self.model = nn.Module()
        self.model.language_model = nn.Module()
        self.model.language_model.layers = nn.ModuleList([nn.ModuleDict({"self_attn": block()})])
        self.model.vision_tower = nn.ModuleDict({"attn": block()})

    def forward(self, x):
        attn = self.model.language_model.layers[0]["self_attn"]
        return attn["v_proj"](attn["q_proj"](x)) + self.model.vision_tower["attn"]["q_proj"](x)


def test_gemma4_default_targets_are_peft_s_regex():
    torch.manual_seed(0)
    base = _Gemma4Like()
    adapted = {}
    for lib in (ref, impl):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2))
        adapted[lib.__name__] = sorted(n for n, p in model.named_parameters() if "lora_A" in n)
    assert adapted["peft"] == adapted[impl.__name__]
    assert adapted["peft"] and not any("vision_tower" in n for n in adapted["peft"])


# --------------------------------------------------------------------------------- long target lists
def _llama3():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_hidden_layers": 3}))


@pytest.mark.parametrize("targets", ["all-linear", "paths", "paths-but-one"])
def test_long_target_lists_are_shortened_as_in_peft(targets, tmp_path):
    """PEFT replaces a list of 20 names or more by the suffixes that tell them apart from the other modules:
    adapter_config.json lists `q_proj`, ... instead of every layer's path (3 layers x 7 projections here)."""
    base = _llama3()
    paths = sorted(n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    chosen = {"all-linear": "all-linear", "paths": paths, "paths-but-one": paths[1:]}[targets]
    r, i = pair(base, r=2, target_modules=chosen, init_lora_weights=False)
    got, want = i.peft_config["default"].target_modules, r.peft_config["default"].target_modules
    assert sorted(got) == sorted(want)
    if targets != "paths-but-one":  # one layer's down_proj left out: the other two keep their paths
        assert len(want) == 7
    assert trainable(i) == trainable(r)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")
    r.add_adapter("two", ref.LoraConfig(r=2, target_modules="all-linear"))  # beside an existing adapter's modules
    i.add_adapter("two", impl.LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(i.peft_config["two"].target_modules) == sorted(r.peft_config["two"].target_modules)
    assert sorted(n for n, _ in i.named_parameters()) == sorted(n for n, _ in r.named_parameters())


def test_a_short_target_list_and_ia3_keep_their_names():
    base = _llama3()
    paths = sorted(n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    r, i = pair(base, r=2, target_modules=paths[:19])
    assert sorted(i.peft_config["default"].target_modules) == sorted(r.peft_config["default"].target_modules)
    assert len(i.peft_config["default"].target_modules) == 19
    cfg = dict(target_modules=paths, feedforward_modules=[p for p in paths if "mlp" in p])
    ia3_r = ref.get_peft_model(copy.deepcopy(base), ref.IA3Config(**cfg))
    ia3_i = impl.get_peft_model(copy.deepcopy(base), impl.IA3Config(**cfg))
    assert sorted(ia3_i.peft_config["default"].target_modules) == sorted(ia3_r.peft_config["default"].target_modules)
    assert len(ia3_i.peft_config["default"].target_modules) == len(paths)


def test_loading_a_file_listing_every_path_matches_peft(tmp_path):
    """A config written with every path (by an older PEFT, or by hand) loads onto the same modules, and the
    loaded config is shortened as PEFT shortens it."""
    base = _llama3()
    paths = sorted(n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    r, _ = pair(base, r=2, target_modules=paths, init_lora_weights=False)
    r.save_pretrained(tmp_path)
    import json

    cfg_path = os.path.join(tmp_path, "adapter_config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["target_modules"] = paths
    with open(cfg_path, "w") as f:
        json.dump(saved, f)
    back_r = ref.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    back_i = impl.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert sorted(back_i.peft_config["default"].target_modules) == sorted(back_r.peft_config["default"].target_modules)
    x = ids()
    with torch.no_grad():
        assert_close(back_i(input_ids=x).logits, back_r(input_ids=x).logits)


@pytest.mark.parametrize("entry", ["PeftModel", "inject_adapter_in_model"])
def test_only_task_models_add_their_heads(entry):
    """As in PEFT: the heads come with the task model class (get_peft_model picks it from task_type), not with the
    config's task_type alone."""
    base = build(BertForSequenceClassification, BertConfig, **ENCODER)
    names = {}
    for lib in (ref, impl):
        cfg = lib.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query"])
        if entry == "PeftModel":
            model = lib.PeftModel(copy.deepcopy(base), cfg)
        else:
            model = lib.inject_adapter_in_model(cfg, copy.deepcopy(base))
        names[lib.__name__] = sorted(n for n, _ in model.named_modules())
    assert names[impl.__name__] == names["peft"]
    assert not any("modules_to_save" in n for n in names["peft"])


def test_a_head_already_listed_is_listed_twice_as_in_peft(tmp_path):
    base = build(BertForSequenceClassification, BertConfig, **ENCODER)
    r, i = pair(base, r=4, task_type="SEQ_CLS", modules_to_save=["classifier"])
    assert i.peft_config["default"].modules_to_save == r.peft_config["default"].modules_to_save
    assert trainable(i) == trainable(r)
    r.save_pretrained(tmp_path / "ref")
    i.save_pretrained(tmp_path / "impl")
    assert_same_adapter_dir(tmp_path / "impl", tmp_path / "ref")
