"""docs/CONFIG.md, generated from the schema in app_dist/config.py.

    python -m app_dist.config_reference --write     # regenerate docs/CONFIG.md
    python -m app_dist.config_reference --check     # exit 1 if docs/CONFIG.md is stale

Every key of every settings dataclass reachable from `Config`, in schema order, with its
type, its default, the comments written beside or above it in config.py, and the rules
`validate` (and the helpers it calls) enforces on it: `_one_of(key, value, CHOICES)` and
`_require(ok, key, value, rule)` calls with a literal key are read from the source, so the
reference cannot drift from the code. tests/test_docs.py fails when the file is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

from app_dist import config as schema
from app_dist.foundations.commands import ArgumentParser, command

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
REGENERATE = "python -m app_dist.config_reference --write"


def _comments_by_line(source: str) -> dict[int, str]:
    """line number -> the text of the comment on that line."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


def _comment_block_above(line: int, lines: list[str], comments: dict[int, str]) -> list[str]:
    """The comment lines directly above line `line` (1-based), top to bottom."""
    block = []
    line -= 1
    while line >= 1 and lines[line - 1].strip().startswith("#"):
        block.insert(0, comments[line])
        line -= 1
    return block


def class_comments(source: str) -> dict[str, str]:
    """class name -> the comment block above the class (and its decorators)."""
    comments = _comments_by_line(source)
    lines = source.splitlines()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found[node.name] = " ".join(_comment_block_above(first, lines, comments))
    return found


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment block just above the field joined with the
    comment at the end of its line."""
    comments = _comments_by_line(source)
    lines = source.splitlines()
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)):
                continue
            above = _comment_block_above(statement.lineno, lines, comments)
            parts = above + ([comments[statement.lineno]] if statement.lineno in comments
                             else [])
            found[(node.name, statement.target.id)] = " ".join(parts)
    return found


def validation_rules(source: str) -> dict[str, list[str]]:
    """Dotted key -> the rules the validation helpers state for it, in source order."""
    rules: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        args = node.args
        if node.func.id == "_one_of" and len(args) == 3 and isinstance(args[0], ast.Constant) \
                and isinstance(args[2], ast.Name):
            choices = getattr(schema, args[2].id)
            rule = "one of " + ", ".join(f"`{choice}`" for choice in choices)
            rules.setdefault(args[0].value, []).append(rule)
        elif node.func.id == "_require" and len(args) == 4 \
                and isinstance(args[1], ast.Constant) and isinstance(args[3], ast.Constant):
            rules.setdefault(args[1].value, []).append(str(args[3].value))
    return rules


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _format_value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    return f"`{value}`"


def _annotation(owner: type, name: str, source: str) -> str:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == owner.__name__:
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and \
                        isinstance(statement.target, ast.Name) and statement.target.id == name:
                    return ast.unparse(statement.annotation)
    return "?"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _sections(owner: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) for `owner` and every settings dataclass below it."""
    found = [(prefix, owner)]
    for spec in dataclasses.fields(owner):
        default = _default(spec)
        if dataclasses.is_dataclass(default):
            found += _sections(type(default), f"{prefix}{spec.name}.")
    return found


def render() -> str:
    """The full text of docs/CONFIG.md."""
    source = inspect.getsource(schema)
    comments = field_comments(source)
    intros = class_comments(source)
    rules = validation_rules(source)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from app_dist/config.py by `{REGENERATE}`; do not edit by hand. "
        "tests/test_docs.py fails when this file is stale. -->",
        "",
        "A run's settings are the schema defaults below, overlaid by a YAML file "
        "(`--config configs/NAME.yaml`) and then by `key=value` overrides on the command "
        "line, e.g. `prune.method=osp train.epochs=2 log.wandb.mode=online`. Unknown keys, "
        "wrong types and the rule violations listed here stop the run before any process "
        "starts, with one line naming the key (exit code 2). The resolved config is saved as "
        "`RUN_DIR/config.yaml`.",
        "",
    ]
    for prefix, owner in _sections(schema.Config, ""):
        if not prefix:
            continue
        keys = [spec for spec in dataclasses.fields(owner)
                if not dataclasses.is_dataclass(_default(spec))]
        if not keys:
            continue
        out += [f"## `{prefix.rstrip('.')}`", ""]
        if owner.__doc__ and not owner.__doc__.startswith(f"{owner.__name__}("):
            out += [inspect.cleandoc(owner.__doc__), ""]
        if intros.get(owner.__name__):
            out += [intros[owner.__name__], ""]
        out += ["| key | type | default | meaning | accepted values |", "|---|---|---|---|---|"]
        for spec in keys:
            key = f"{prefix}{spec.name}"
            out.append("| " + " | ".join([
                f"`{key}`", f"`{_annotation(owner, spec.name, source)}`",
                _format_value(_default(spec)),
                _escape(comments.get((owner.__name__, spec.name), "")),
                _escape("; ".join(rules.get(key, []))),
            ]) + " |")
        out.append("")
    return "\n".join(out)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m app_dist.config_reference",
                            description="Generate docs/CONFIG.md from the schema.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {OUTPUT}")
    action.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    text = render()
    if args.write:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
    elif args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"error: {OUTPUT} is stale; regenerate it with `{REGENERATE}`",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
