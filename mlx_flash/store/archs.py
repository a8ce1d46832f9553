"""Per-architecture facts the store needs: where the FFN weights are and how they
fire."""

from dataclasses import dataclass
from typing import Dict, Tuple

from ..errors import FlashError


@dataclass(frozen=True)
class FFNArch:
    """The FFN of one architecture, in Hugging Face weight names.

    `rows` are the input projections (one row per neuron: gate_proj/up_proj, or fc1) and
    `column` the output projection (one column per neuron: down_proj, or fc2).
    """

    prefix: str  # of layer i's FFN weights, formatted with i
    rows: Tuple[str, ...]
    column: str
    activation_key: str  # config key naming the activation
    activations: Dict[str, str]  # config value -> our activation name

    def name(self, layer: int, component: str) -> str:
        return self.prefix.format(layer) + component

    def activation(self, config: dict) -> str:
        value = config.get(self.activation_key, next(iter(self.activations)))
        if value not in self.activations:
            raise FlashError(
                f"activation {value!r} is not supported for {config['model_type']}",
                fix="supported: " + ", ".join(self.activations),
            )
        return self.activations[value]


_GATED_SILU = FFNArch(
    "model.layers.{}.mlp.",
    ("gate_proj", "up_proj"),
    "down_proj",
    "hidden_act",
    {"silu": "silu"},
)

ARCHS: Dict[str, FFNArch] = {
    "llama": _GATED_SILU,
    "mistral": _GATED_SILU,
    "qwen2": _GATED_SILU,
    "qwen3": _GATED_SILU,
    "gemma3_text": FFNArch(
        "model.layers.{}.mlp.",
        ("gate_proj", "up_proj"),
        "down_proj",
        "hidden_activation",
        {"gelu_pytorch_tanh": "gelu_approx", "gelu_approx": "gelu_approx"},
    ),
    "opt": FFNArch(
        "model.decoder.layers.{}.",
        ("fc1",),
        "fc2",
        "activation_function",
        {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_approx"},
    ),
}


def ffn_arch(config: dict, path=None) -> FFNArch:
    """The FFNArch of a config, or a FlashError listing the supported architectures."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise FlashError(
            f"architecture {model_type!r} is not supported",
            path,
            "supported architectures: " + ", ".join(ARCHS),
        )
    return ARCHS[model_type]
