"""The decoder layout: contiguous layer ranges, one per shard, with entry/interior/exit roles.

SHARDS is "preset" (left/mid/right at the 28-layer split points scaled to the depth) or
"name:first-last,..." with inclusive ranges that cover every layer exactly once.
"""
from __future__ import annotations

import dataclasses
import re

from ..errors import BuildError

@dataclasses.dataclass(frozen=True)
class ShardSpec:
    name: str
    first: int  # inclusive
    last: int   # inclusive
    is_entry: bool
    is_exit: bool

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    @property
    def role(self) -> str:
        if self.is_entry and self.is_exit:
            return "entry+exit"
        return "entry" if self.is_entry else "exit" if self.is_exit else "interior"

    @property
    def package_name(self) -> str:
        return f"decoder_shard_{self.name}"


def preset_layout(num_layers: int) -> str:
    """left/mid/right at the 28-layer split points 11 and 20, scaled to the depth."""
    if num_layers < 3:
        names = ["left", "right"][:num_layers] if num_layers == 2 else ["left"]
        return ",".join(f"{n}:{i}-{i}" for i, n in enumerate(names))
    cut1 = max(1, round(num_layers * 11 / 28))
    cut2 = min(num_layers - 1, max(cut1 + 1, round(num_layers * 20 / 28)))
    return f"left:0-{cut1 - 1},mid:{cut1}-{cut2 - 1},right:{cut2}-{num_layers - 1}"


_EXAMPLE = "write name:first-last,... e.g. left:0-10,mid:11-19,right:20-27, or SHARDS=preset"
_SHARD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):([0-9]+)-([0-9]+)$")


def parse_layout(text: str, num_layers: int) -> tuple[ShardSpec, ...]:
    """Parse and validate SHARDS against the model depth; one-line BuildError on any problem."""
    spec_text = preset_layout(num_layers) if text in ("", "preset") else text
    where = f"SHARDS={spec_text!r}"
    items = [item.strip() for item in spec_text.split(",")]
    if not spec_text.strip() or any(not item for item in items):
        raise BuildError(f"{where}: empty shard entry; {_EXAMPLE}")
    parsed = []
    for item in items:
        match = _SHARD_RE.match(item)
        if not match:
            raise BuildError(f"{where}: {item!r} is not name:first-last (one contiguous inclusive range per shard); "
                             f"{_EXAMPLE}")
        name, first, last = match.group(1), int(match.group(2)), int(match.group(3))
        if first > last:
            raise BuildError(f"{where}: shard {name!r} is empty ({first} > {last}); write first <= last (ranges are "
                             "inclusive)")
        if last >= num_layers:
            raise BuildError(f"{where}: shard {name!r} reaches layer {last} but the model has layers 0-{num_layers - 1}; "
                             f"fix SHARDS or use SHARDS=preset")
        parsed.append((name, first, last))
    names = [p[0] for p in parsed]
    for name in names:
        if names.count(name) > 1:
            raise BuildError(f"{where}: shard {name!r} appears twice; give each shard one contiguous range and "
                             "its own name")
    parsed.sort(key=lambda p: p[1])
    expected = 0
    for name, first, last in parsed:
        if first > expected:
            raise BuildError(f"{where}: gap, layers {expected}-{first - 1} belong to no shard; fix SHARDS so the "
                             "ranges cover every layer once")
        if first < expected:
            raise BuildError(f"{where}: overlap, shard {name!r} starts at {first} but layer {first} is already covered; "
                             "fix SHARDS so the ranges cover every layer once")
        expected = last + 1
    if expected != num_layers:
        raise BuildError(f"{where}: gap, layers {expected}-{num_layers - 1} belong to no shard; fix SHARDS so the "
                         "ranges cover every layer once")
    count = len(parsed)
    return tuple(ShardSpec(name, first, last, is_entry=i == 0, is_exit=i == count - 1)
                 for i, (name, first, last) in enumerate(parsed))
