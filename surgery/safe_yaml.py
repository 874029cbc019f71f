"""YAML from untrusted hands: recipe files and override values, read with limits.

On top of ``yaml.SafeLoader`` (no object construction from tags):

- files must be regular UTF-8 files of at most :data:`MAX_BYTES` (a directory, a device or a
  Latin-1 file is named as such);
- a key given twice in one mapping is an error naming the key and both lines (YAML would keep
  the last one silently);
- nesting deeper than :data:`MAX_DEPTH` is refused (before Python's recursion limit is reached);
- anchors and aliases are expanded with a budget: the document may stand for at most
  :data:`MAX_NODES` nodes once every alias is expanded ("billion laughs" is refused as soon as it
  crosses it, in time linear in the file), and an alias inside its own anchor is refused.

Every problem raises :class:`~surgery.errors.RecipeError` naming the source (and line).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .io import file_kind

MAX_BYTES = 1 << 20  # a recipe is a few kilobytes
MAX_DEPTH = 32  # a recipe nests about six levels
MAX_NODES = 100_000  # after alias expansion; a recipe has a few hundred


class _Refused(yaml.YAMLError):
    """A limit was hit while composing (carries the line)."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader with a nesting limit, an expansion budget and duplicate-key detection."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._weights: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        alias = isinstance(event, yaml.AliasEvent)
        if not alias:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels; a recipe needs far fewer", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            if not alias:
                self._depth -= 1
        if alias:
            if id(node) not in self._weights:
                raise _Refused(f"alias *{event.anchor} is used inside its own anchor (a recursive structure)",
                               event.start_mark)
            return node
        weight = 1 + sum(self._weights[id(child)] for child in _children(node))
        if weight > MAX_NODES:
            raise _Refused(f"anchors and aliases expand to more than {MAX_NODES} values; write the recipe out "
                           "without nesting aliases", node.start_mark)
        self._weights[id(node)] = weight
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node)
        return node


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_duplicate_keys(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], Any] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        ident = (key.tag, key.value)
        if ident in seen:
            first = seen[ident].start_mark.line + 1
            raise _Refused(f"key {key.value!r} appears twice in one mapping (lines {first} and "
                           f"{key.start_mark.line + 1}); keep one", key.start_mark)
        seen[ident] = key


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document from ``text`` with the limits above; errors name ``source``."""
    loader = _GuardedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        raise RecipeError(f"{source}: line {err.mark.line + 1}: {err.message}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def read_text_file(path: Path, what: str = "recipe file") -> str:
    """The UTF-8 text of a small regular file; anything else is a RecipeError saying what it is."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such {what}") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read this {what} ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"{path} is {file_kind(info.st_mode)}, not a {what}")
    if info.st_size > MAX_BYTES:
        raise RecipeError(f"{path} is {info.st_size} bytes; a {what} is a small YAML file (at most {MAX_BYTES} bytes)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read this {what} ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None


def read_yaml_file(path: Path, what: str = "recipe file") -> Any:
    """:func:`read_text_file` then :func:`parse_yaml`."""
    return parse_yaml(read_text_file(path, what), str(path))


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "parse_yaml", "read_text_file", "read_yaml_file"]
