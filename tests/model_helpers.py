"""Tiny transformers models built from configs with random weights (no downloads), and custom modules."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A custom model with nn.Linear layers, in and out of a block list."""

    def __init__(self, width=23, hidden=37, out=11, bias=True):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"up": nn.Linear(width, hidden, bias=bias), "down": nn.Linear(hidden, width, bias=bias)})
             for _ in range(2)]
        )
        self.head = nn.Linear(width, out)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.head(x)


class Conv1DMLP(nn.Module):
    """transformers' Conv1D (weight stored (in, out)), as GPT-2 uses it."""

    def __init__(self, width=19, hidden=29):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = Conv1D(hidden, width)
        self.proj = Conv1D(width, hidden)

    def forward(self, x):
        return self.proj(torch.tanh(self.fc(x)))


def tiny_transformer(family: str) -> nn.Module:
    """A two-layer model of the given family with hidden size 32."""
    import transformers as tf

    common = dict(vocab_size=97)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(config)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common))
    if family == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64, **common)
        return tf.OPTForCausalLM(config)
    if family == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common))
    if family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, **common)
        return tf.GPTNeoXForCausalLM(config)
    if family == "bert":
        config = tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64, **common)
        return tf.BertModel(config)
    if family == "t5":
        config = tf.T5Config(d_model=32, d_ff=48, d_kv=8, num_layers=2, num_heads=4, **common)
        return tf.T5ForConditionalGeneration(config)
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "opt", "bloom", "gpt_neox", "bert", "t5"]


def run_transformer(model: nn.Module, family: str, embeds: torch.Tensor) -> torch.Tensor:
    """Forward with ``inputs_embeds`` (so the input gradient is defined); returns the main output tensor."""
    if family == "t5":
        out = model(inputs_embeds=embeds, decoder_inputs_embeds=embeds[:, :5])
        return out.logits
    out = model(inputs_embeds=embeds)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
