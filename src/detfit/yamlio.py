"""YAML from users (settings files, ``--set`` values, dataset files), read with bounded memory.

``yaml.safe_load`` runs no code, but it expands aliases: a "billion laughs" file of a few hundred
bytes (each level an anchor listing the one before nine times) becomes a structure of 10^9 items,
a MemoryError, or an error message of gigabytes when the value is printed. PyYAML's composer is
also recursive, so thousands of nested brackets end in a RecursionError. Here the document is
composed first (aliases stay shared nodes, nothing is expanded), its expanded size and depth are
measured on that graph, and only a document within the limits is constructed.
"""

from __future__ import annotations

from typing import Any

import yaml

from detfit.errors import DetfitError

MAX_BYTES = 1 << 20  # a settings or dataset file is a few KB
MAX_VALUES = 100_000  # values once aliases are expanded (a run's config.yaml has about 100)
MAX_DEPTH = 32  # nesting levels (config.yaml uses 3)
EXCERPT = 80  # characters of a user's value quoted in a message


def excerpt(value: Any, limit: int = EXCERPT) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages stay one short line whatever the
    value (the repr of a huge structure is built only as far as needed for small ones)."""
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) < 50 else None
    if text is None:
        text = f"{type(value).__name__} of {len(value)} items"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _measure(node: yaml.Node, where: str, error: type[DetfitError]) -> None:
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, height)

    def size(n: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise error(f"{where}: nested more than {MAX_DEPTH} levels deep")
        if id(n) in memo:
            values, height = memo[id(n)]
            if depth + height > MAX_DEPTH:
                raise error(f"{where}: nested more than {MAX_DEPTH} levels deep")
            return memo[id(n)]
        if isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [x for pair in n.value for x in pair]
        else:
            children = []
        values, height = 1, 0
        for child in children:
            v, h = size(child, depth + 1)
            values, height = values + v, max(height, h + 1)
            if values > MAX_VALUES:
                raise error(
                    f"{where}: expands to more than {MAX_VALUES} values (YAML aliases repeating "
                    "aliases?); refused before expanding it"
                )
        memo[id(n)] = (values, height)
        return values, height

    size(node, 0)


def load_yaml(text: str, where: str, error: type[DetfitError] = DetfitError) -> Any:
    """``yaml.safe_load(text)`` within the limits above, else ``error`` in one line naming
    ``where`` (a file, ``--set KEY``). Invalid YAML raises ``yaml.YAMLError``, for the caller
    to word."""
    if len(text) > MAX_BYTES:
        raise error(f"{where}: {len(text) / 2**20:.1f} MB of YAML; at most {MAX_BYTES >> 20} MB")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        _measure(node, where, error)
        return yaml.safe_load(text)
    except RecursionError:
        raise error(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
