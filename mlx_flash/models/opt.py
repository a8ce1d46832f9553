"""OPT (facebook/opt-*) in mlx-lm's style, loadable from Hugging Face checkpoints.

Load with ``mlx_lm.utils.load_model(path, get_model_classes=lambda config: (Model,
ModelArgs))``. Module paths follow Hugging Face's names except that each layer's FFN
is one swappable submodule, ``layers[i].mlp`` with children ``fc1`` and ``fc2``.
"""

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)

from ..errors import FlashError

# Hugging Face's ACT2FN names; gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation, quick_gelu is x * sigmoid(1.702 x).
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "quick_gelu": nn.gelu_fast_approx,
    "silu": nn.silu,
    "swish": nn.silu,
}

# OPT's learned positions are shifted by 2, a fairseq legacy kept by Hugging Face.
POSITION_OFFSET = 2


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    ffn_dim: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: Optional[int] = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.activation_function not in ACTIVATIONS:
            raise FlashError(
                f"OPT activation_function {self.activation_function!r} is not "
                "supported",
                fix=f"use one of {sorted(ACTIVATIONS)} in config.json",
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise FlashError(
                f"OPT hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}",
                fix="check config.json against the checkpoint",
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.scale = (dim // self.n_heads) ** -0.5
        bias = args.enable_bias
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def __call__(
        self,
        x: mx.array,
        mask: Optional[mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        B, L, D = x.shape

        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)

        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.out_proj(output)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, args.hidden_size, bias=args.enable_bias)
        self.act = ACTIVATIONS[args.activation_function]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, affine = args.hidden_size, args.layer_norm_elementwise_affine
        self.do_layer_norm_before = args.do_layer_norm_before
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(dim, affine=affine)
        self.mlp = MLP(args)
        self.final_layer_norm = nn.LayerNorm(dim, affine=affine)

    def __call__(
        self,
        x: mx.array,
        mask: Optional[mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        if self.do_layer_norm_before:
            h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
            return h + self.mlp(self.final_layer_norm(h))
        # opt-350m normalizes after each residual add instead.
        h = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache))
        return self.final_layer_norm(h + self.mlp(h))


class OPTDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, embed_dim = args.hidden_size, args.word_embed_proj_dim
        affine = args.layer_norm_elementwise_affine
        self.embed_tokens = nn.Embedding(args.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(
            args.max_position_embeddings + POSITION_OFFSET, dim
        )
        if embed_dim != dim:
            self.project_in = nn.Linear(embed_dim, dim, bias=False)
            self.project_out = nn.Linear(dim, embed_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        # Hugging Face builds the final norm only for pre-LN models, and
        # _remove_final_layer_norm drops it for checkpoints tuned before v4.20.1.
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(dim, affine=affine)
        else:
            self.final_layer_norm = None
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        if input_embeddings is not None:
            h = input_embeddings
        else:
            h = self.embed_tokens(inputs)
        if self.project_in is not None:
            h = self.project_in(h)

        if cache is None:
            cache = [None] * len(self.layers)

        # The cache offset is an int, or a (B,) array for a left-padded batch whose
        # padding gets position -1 as in Hugging Face.
        offset = mx.array(0 if cache[0] is None else cache[0].offset)
        positions = mx.arange(h.shape[1]) + offset[..., None]  # (L,) or (B, L)
        h = h + self.embed_positions(mx.maximum(positions, -1) + POSITION_OFFSET)

        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)

        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = OPTDecoder(args)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        return self.decoder(inputs, cache, input_embeddings)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(
                args.word_embed_proj_dim, args.vocab_size, bias=False
            )

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.decoder.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map Hugging Face OPT weight names onto this module tree.

        Adds the ``model.`` prefix that the original facebook/opt-* checkpoints lack,
        moves ``layers.{i}.fc1``/``fc2`` under ``layers.{i}.mlp`` (idempotent, so
        weights saved from this class load again), and drops a tied ``lm_head``.
        """
        sanitized = {}
        for key, value in weights.items():
            if key.startswith("decoder."):
                key = "model." + key
            key = re.sub(r"(\.layers\.\d+)\.(fc[12])\.", r"\1.mlp.\2.", key)
            sanitized[key] = value
        if self.args.tie_word_embeddings:
            sanitized.pop("lm_head.weight", None)
        if self.model.decoder.final_layer_norm is None:
            for name in ("weight", "bias"):
                sanitized.pop(f"model.decoder.final_layer_norm.{name}", None)
        return sanitized

    @property
    def layers(self):
        return self.model.decoder.layers
