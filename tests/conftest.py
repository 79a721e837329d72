"""Shared fixtures: small random models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels are tested on a CPU through Triton's interpreter, which must be chosen before anything
    # (peft, through bitsandbytes) imports triton; see tests/test_triton_kernels.py
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import molora  # noqa: F401  (registers the PEFT type)

VOCAB = 96


class OneProjection(torch.nn.Module):
    """A model made of one ``width x width`` linear projection named ``proj`` (no bias); it takes its input
    ``[B, S, width]`` positionally or as ``input_ids``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(input_ids)


def make_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with 64-wide hidden states; deterministic for a given seed."""
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D projections) with 48-wide hidden states."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def make_opt(seed: int = 0):
    """A 1-layer OPT (its decoder layers feed the MLP tokens flattened to ``[batch * seq, d]``), in eval mode."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        pad_token_id=0,
    )
    return OPTForCausalLM(config).eval()


def make_t5(seed: int = 0):
    """A 1+1-layer T5 encoder-decoder (pad 0, eos 2), in eval mode."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        d_model=32,
        d_ff=48,
        d_kv=8,
        num_layers=1,
        num_heads=4,
        vocab_size=64,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def make_bart(seed: int = 0):
    """A 1+1-layer BART encoder-decoder (pad 1, eos 2), in eval mode."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


MODEL_FACTORIES = {"llama": make_llama, "gpt2": make_gpt2}


def padded(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one batch padded with 0 on ``side``: ``(input_ids, attention_mask)``."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols] = torch.tensor(p)
        mask[i, cols] = 1
    return ids, mask


def greedy(model, ids, mask, n=6, **kwargs):
    """The ``n`` tokens greedy ``generate`` appends to ``ids``."""
    return greedy_output(model, ids, mask, n, **kwargs)[:, ids.shape[1] :]


def greedy_output(model, ids, mask, n=6, **kwargs):
    """What greedy ``generate`` of ``n`` new tokens returns for ``ids`` (without autograd)."""
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs
        )


def greedy_scores(model, ids, mask=None, n=6):
    """Greedy ``generate`` of ``n`` new tokens with every step's scores (``.sequences``, ``.scores``)."""
    return greedy_output(model, ids, mask, n, output_scores=True, return_dict_in_generate=True)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Two sequences of 12 tokens, the first left-padded by 4."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :4] = 0
    attention_mask[0, :4] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_char_tokenizer():
    """A character-level tokenizer (pad=0, bos=1, eos=2) with a minimal chat template; no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tokenizer


CHAR_VOCAB = 100


def text_dataset(n: int = 32):
    """A tiny plain-text SFT dataset with four repeating sentences (easy to learn in a few steps)."""
    from datasets import Dataset

    words = ["red fox", "blue cat", "green owl", "gray wolf"]
    return Dataset.from_list([{"text": f"the {words[i % 4]} sat on mat {i % 4}."} for i in range(n)])


def sft_args(tmp_path, **overrides):
    """``trl.SFTConfig`` for short CPU runs in tests (fp32, no checkpointing, no reports); ``overrides`` win."""
    import trl

    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=16,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        max_length=48,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return trl.SFTConfig(**kwargs)


def interleaved_conversations(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interleaved requests to a prompt-router model: conversation A's second turn continued from A's KV cache right
    away, conversation B, then A's second turn again from a deep copy of A's cache. Returns ``(right_away, other,
    after_b)`` (greedy tokens); ``after_b`` must equal ``right_away``."""
    import copy

    a_ids, a_mask = padded([[5, 17, 33, 8, 41, 12, 60], [70, 22, 9], [44, 3, 81, 27, 19]], "left")
    b_ids, b_mask = padded([[40, 41, 42, 43, 44], [45, 46, 47, 48], [50, 51, 52, 53, 54, 55]], "left")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    first = model.generate(input_ids=a_ids, attention_mask=a_mask, return_dict_in_generate=True, **kwargs)
    turn2 = torch.cat([first.sequences, torch.full((3, 2), 30)], dim=1)
    turn2_mask = torch.cat([a_mask, torch.ones(3, turn2.shape[1] - a_mask.shape[1], dtype=torch.long)], dim=1)
    copied = copy.deepcopy(first.past_key_values)
    right_away = model.generate(input_ids=turn2, attention_mask=turn2_mask, cache=first.past_key_values, **kwargs)
    other = model.generate(input_ids=b_ids, attention_mask=b_mask, **kwargs)  # conversation B
    after_b = model.generate(input_ids=turn2, attention_mask=turn2_mask, cache=copied, **kwargs)
    return right_away, other, after_b
