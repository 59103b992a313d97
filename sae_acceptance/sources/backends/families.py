"""Where a Hugging Face architecture keeps its decoder layers, and TransformerLens hook names as module paths.

One table serves both directions: an SAE named with TransformerLens hooks runs on the
Hugging Face backend (`blocks.3.hook_mlp_out` -> `gpt_neox.layers.3.mlp`), and one named
by module path runs on TransformerLens (`model.layers.3` -> `blocks.3.hook_resid_post`).
A module path names the module's output; `.input` names its first input (`.output` is
accepted and means the output). `hook_z` is the input of the attention's output
projection: the heads' outputs concatenated, the layout TransformerLens flattens to.

An SAE placed at Hugging Face points (`model.layers.3.pre_feedforward_layernorm.output`)
runs on TransformerLens only where a hook there is exactly that activation, and an SAE at
a TransformerLens point that no module has (`blocks.3.ln2.hook_normalized`, the norm before
its gain) only on TransformerLens: `backends_for` tells which, model-independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_acceptance.config import BACKENDS
from sae_acceptance.hooks import HookPoint

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


# Gemma 2 and 3 normalise each sublayer's output before adding it: TransformerLens' *_out hooks
_GEMMA_KINDS = {
    **_LLAMA_KINDS,
    "hook_mlp_out": "post_feedforward_layernorm",
    "hook_attn_out": "post_attention_layernorm",
}

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
    Family("gemma2", ("Gemma2ForCausalLM",), "model.layers", "model.norm", _GEMMA_KINDS),
    Family("gemma3", ("Gemma3ForCausalLM",), "model.layers", "model.norm", _GEMMA_KINDS),
)
LIBRARIES = tuple(name for name in BACKENDS if name != "auto")  # the backends that run a model


def family_of(architecture: str | None) -> Family | None:
    """The family of a Hugging Face architecture name (`config.architectures[0]`), if known."""
    return next((f for f in FAMILIES if architecture in f.architectures), None)


def inside_layer(path: str, family: Family) -> tuple[int, str] | None:
    """(layer, path inside it) of a module path into `family`'s decoder layers (or, as sparsify
    names them, relative to their list: `layers.3`); `.output` dropped, `.input` kept."""
    path = path.removesuffix(".output")
    container = family.layers.rsplit(".", 1)[-1]
    for prefix in (family.layers + ".", container + "."):
        if path.startswith(prefix):
            head, _, inner = path[len(prefix) :].partition(".")
            return (int(head), inner) if head.isdigit() else None
    return None


def is_module_point(hook: str) -> bool:
    """Whether `hook` is a module path into the decoder layers of some known family."""
    return any(inside_layer(hook, f) is not None for f in FAMILIES)


def tl_equivalent(path: str) -> str | None:
    """The TransformerLens hook that is exactly module point `path` on every known family whose
    layers `path` names (`model.layers.3` -> `blocks.3.hook_resid_post`); None where they differ
    (`model.layers.3.mlp` is `hook_mlp_out` on Llama, not on Gemma) or none is."""
    found = {(at[0], f.tl_kind(at[1])) for f in FAMILIES if (at := inside_layer(path, f)) is not None}
    if len(found) != 1:
        return None
    layer, kind = found.pop()
    return None if kind is None else str(HookPoint.at(layer, kind))


def same_point(a: str, b: str) -> bool:
    """Whether two hook names are one activation on every known family, in either naming
    (`gpt_neox.layers.0` and `blocks.0.hook_resid_post`)."""

    def as_tl(hook: str) -> str | None:
        return tl_equivalent(hook) if is_module_point(hook) else hook

    return a == b or (as_tl(a) is not None and as_tl(a) == as_tl(b))


def backends_for(*hooks: str | None) -> tuple[str, ...]:
    """The backends (`LIBRARIES`) that can read and write exactly at every one of `hooks`: a module
    point needs an exactly equal TransformerLens hook for TransformerLens; a TransformerLens point
    inside a block needs a module some family maps it to for Hugging Face."""
    able = dict.fromkeys(LIBRARIES, True)
    for hook in filter(None, hooks):
        point = HookPoint.parse(hook)
        if point.in_block:
            able["hf"] &= any(point.kind in f.kinds for f in FAMILIES)
        elif is_module_point(hook):
            able["transformer_lens"] &= tl_equivalent(hook) is not None
    return tuple(name for name, ok in able.items() if ok)


def backend_for(asked: str, *hooks: str | None) -> str:
    """The backend to load for an SAE at `hooks` when the config asks for `asked`: `auto` becomes
    the only backend that can evaluate it, where only one can; any other choice stands (the
    backend then refuses the hook in one line naming the one that can)."""
    able = backends_for(*hooks)
    return able[0] if asked == "auto" and len(able) == 1 else asked
