"""Hook names, parsed in one place.

A hookpoint is named the TransformerLens way (`blocks.3.hook_resid_post`,
`blocks.3.attn.hook_z`): a block index and what inside the block. `HookPoint`
is that name as a value, so no other module splits strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HookPoint:
    """`name` as given; `layer` the block index (None outside the blocks); `kind` what follows
    `blocks.L.` (`hook_resid_post`, `attn.hook_z`, ...), or the whole name outside the blocks."""

    name: str
    layer: int | None
    kind: str

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        """A hook name split into its block and kind (`blocks.3.hook_resid_post`); a name outside the blocks has no layer."""
        match = _BLOCK.match(name)
        if match is None:
            return cls(name, None, name)
        return cls(name, int(match.group(1)), match.group(2))

    @classmethod
    def at(cls, layer: int, kind: str = "hook_resid_post") -> HookPoint:
        """The hook `kind` of block `layer`: `HookPoint.at(3)` is `blocks.3.hook_resid_post`."""
        return cls(f"blocks.{layer}.{kind}", layer, kind)

    @property
    def in_block(self) -> bool:
        """Whether the hook is inside a numbered block."""
        return self.layer is not None

    @property
    def is_resid_pre(self) -> bool:
        """Whether this is a block's residual stream input."""
        return self.kind == "hook_resid_pre"

    @property
    def is_resid_post(self) -> bool:
        """Whether this is a block's residual stream output."""
        return self.kind == "hook_resid_post"

    @property
    def short_kind(self) -> str:
        """`hook_resid_post` -> `resid_post`, `attn.hook_z` -> `attn.z`: for labels and tables."""
        return self.kind.replace("hook_", "")

    def __str__(self) -> str:
        return self.name


def hook_layer(name: str) -> int | None:
    """Block index of `blocks.L.…` hooks; None for hooks outside the blocks."""
    return HookPoint.parse(name).layer
