"""Read a policy file's YAML into plain data, remembering the line of every field.

Why YAML, read this way: a policy is nested (teams, their keys, lists of
content rules) and is reviewed by people, so it should read as an outline;
PyYAML's composer keeps the line of every node, so each error can point at
the line to fix, which the standard library's TOML parser cannot do. What
makes YAML risky for a security document is refused here: only the safe
loader's plain types, no anchors or aliases (no "billion laughs", no value
silently shared between two teams), and no key given twice in one mapping
(PyYAML would keep the last one without a word).
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import yaml

from policy.errors import PolicyError

Path = tuple[str | int, ...]


def dotted(path: Path) -> str:
    """`("teams", "risk", "content", 0)` → `teams.risk.content[0]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# The last step of a dotted path: `.name` or `[3]`.
_LAST_STEP = re.compile(r"(?:\.[^.\[]*|\[\d+\])$|^[^.\[]*$")


@dataclass(frozen=True)
class Source:
    """A policy file's data, and the line (1-based) where each path starts, by dotted path."""

    name: str
    data: Any
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int | None:
        """The line of `path` (`teams.risk.content[0]`), or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = _LAST_STEP.sub("", path, count=1)
        return self.lines.get("")

    def error(self, path: Path, message: str) -> PolicyError:
        where = dotted(path)
        return PolicyError(self.name, message, line=self.line_of(where), field=where or None)


def read_yaml(text: str, name: str) -> Source:
    loader = yaml.SafeLoader(text)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise PolicyError(name, "anchors and aliases (&, *) are not allowed in a policy", line=mark.line + 1)
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise PolicyError(name, f"not valid YAML: {exc.problem or exc}", line=line) from None
    except yaml.YAMLError as exc:
        raise PolicyError(name, f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if node is None:
        raise PolicyError(name, "the policy file is empty")
    lines: dict[str, int] = {}
    data = _plain(loader, node, (), lines, name)
    return Source(name, data, lines)


def _plain(loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: dict[str, int], name: str) -> Any:
    lines[dotted(path)] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Hashable, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise PolicyError(name, f"a key must be text, not {key!r}", line=key_node.start_mark.line + 1)
            key = str(key)
            if key in out:
                raise PolicyError(
                    name, f"{key!r} is given twice", line=key_node.start_mark.line + 1, field=dotted((*path, key))
                )
            out[key] = _plain(loader, value_node, (*path, key), lines, name)
            lines[dotted((*path, key))] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(loader, item, (*path, i), lines, name) for i, item in enumerate(node.value)]
    return loader.construct_object(node)
