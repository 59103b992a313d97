"""Where a Hugging Face architecture keeps its decoder layers, and TransformerLens hook names as module paths.

One table serves both directions: an SAE named with TransformerLens hooks runs on the
Hugging Face backend (`blocks.3.hook_mlp_out` -> `gpt_neox.layers.3.mlp`), and one named
by module path runs on TransformerLens (`model.layers.3` -> `blocks.3.hook_resid_post`).
A module path names the module's output; `.input` names its first input (`.output` is
accepted and means the output). `hook_z` is the input of the attention's output
projection: the heads' outputs concatenated, the layout TransformerLens flattens to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYER_OUTPUT, LAYER_INPUT = "", "input"

_LLAMA_KINDS = {
    "hook_resid_post": LAYER_OUTPUT,
    "hook_resid_pre": LAYER_INPUT,
    "hook_mlp_out": "mlp",
    "attn.hook_z": "self_attn.o_proj.input",
    "hook_attn_out": "self_attn.o_proj",
}


@dataclass(frozen=True)
class Family:
    """`layers` and `final_norm` are module paths from the causal LM's root; `kinds` maps a
    TransformerLens hook kind to a path inside layer L (`""`: the layer's output)."""

    name: str
    architectures: tuple[str, ...]
    layers: str
    final_norm: str
    kinds: dict[str, str] = field(default_factory=dict)

    def module_path(self, layer: int, kind: str) -> str | None:
        """`blocks.L.<kind>` as a module path, or None where this family has no such module."""
        inner = self.kinds.get(kind)
        if inner is None:
            return None
        return f"{self.layers}.{layer}" + (f".{inner}" if inner else "")

    def tl_kind(self, inner: str) -> str | None:
        """The TransformerLens kind of a path inside a layer (`mlp` -> `hook_mlp_out`)."""
        return next((k for k, v in self.kinds.items() if v == inner), None)


FAMILIES = (
    Family(
        "gpt_neox",
        ("GPTNeoXForCausalLM",),
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        {
            "hook_resid_post": LAYER_OUTPUT,
            "hook_resid_pre": LAYER_INPUT,
            "hook_mlp_out": "mlp",
            "attn.hook_z": "attention.dense.input",
            "hook_attn_out": "attention.dense",
        },
    ),
    Family(
        "gpt2",
        ("GPT2LMHeadModel",),
        "transformer.h",
        "transformer.ln_f",
        {
            "hook_resid_post": LAYER_OUTPUT,
            "hook_resid_pre": LAYER_INPUT,
            "hook_mlp_out": "mlp",
            "attn.hook_z": "attn.c_proj.input",
            "hook_attn_out": "attn.c_proj",
        },
    ),
    Family(
        "llama",
        ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
        "model.layers",
        "model.norm",
        _LLAMA_KINDS,
    ),
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        "model.layers",
        "model.norm",
        {
            **_LLAMA_KINDS,
            # Gemma 2 normalises each sublayer's output before adding it: TransformerLens' *_out hooks
            "hook_mlp_out": "post_feedforward_layernorm",
            "hook_attn_out": "post_attention_layernorm",
        },
    ),
)


def family_of(architecture: str | None) -> Family | None:
    """The family of a Hugging Face architecture name (`config.architectures[0]`), if known."""
    return next((f for f in FAMILIES if architecture in f.architectures), None)
