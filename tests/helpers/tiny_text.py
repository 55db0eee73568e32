"""A character-level tokenizer and a tiny Llama built in code, for the Trainer and TRL tests (nothing downloaded)."""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "[BOS]"]
VOCAB = SPECIALS + [chr(c) for c in range(97, 123)] + [" ", ".", ","]
SENTENCES = ["the cat sat on the mat.", "a dog ran, the cat sat.", "on the mat a cat.", "the dog sat on a mat."]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                   bos_token="[BOS]")


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=2, bos_token_id=3)
    return LlamaForCausalLM(cfg)


def text_dataset(n: int = 8):
    from datasets import Dataset

    return Dataset.from_dict({"text": [SENTENCES[i % len(SENTENCES)] for i in range(n)]})


class TokenRows(torch.utils.data.Dataset):
    """Tokenized sentences as input_ids/labels rows of one length, for transformers.Trainer."""

    def __init__(self, n: int = 8, length: int = 16):
        tok = tokenizer()
        self.rows = [torch.tensor(tok(SENTENCES[i % len(SENTENCES)]).input_ids[:length]) for i in range(n)]
        self.rows = [torch.nn.functional.pad(r, (0, length - len(r))) for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}
