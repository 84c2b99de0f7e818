"""Typed YAML settings: a file and `key=value` overrides merged onto a dataclass schema.

The training config, sweep files and experiment files are all read here, so each of them
fails the same way: one `ConfigError` line that names the file, and the key when there is one
("sweep key 'scheduler.kind' in sweeps/x.yaml: ..."). `family` is the word that starts those
lines: config, sweep or experiment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app_dist.foundations.errors import ConfigError, one_line

Schema = TypeVar("Schema")


def load_structured(schema: type[Schema], path: str | Path | None,
                    overrides: Sequence[str] = (), *, family: str) -> Schema:
    """`schema`'s defaults <- the YAML file at `path` (none: defaults only) <- `key=value`
    overrides, as an instance of `schema`. Unknown keys, wrong types and unreadable files
    raise ConfigError; the values themselves are the caller's to validate."""
    path = Path(path) if path is not None else None
    merged = OmegaConf.structured(schema)
    # Where a bad key came from: the file, or the command line's override that set it.
    where = f" in {path}" if path is not None else ""
    layer: DictConfig | None = None
    try:
        if path is not None:
            layer = read_mapping(path, family)
            merged = OmegaConf.merge(merged, layer)
        for override in overrides:
            if "=" not in override:
                raise ConfigError(f"override '{override}' is not of the form key=value")
            where = f" (override '{override}')"
            layer = OmegaConf.from_dotlist([_ratio_as_text(override)])
            merged = OmegaConf.merge(merged, layer)
        where = f" in {path}" if path is not None else ""
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        named = (f"{family} key '{key}'{where}" if key
                 else f"{family} file {path}" if path is not None else family)
        raise ConfigError(f"{named}: {str(error).splitlines()[0]}") from None
    except TypeError:  # OmegaConf's "Cannot merge incompatible container types", unnamed
        key, expected = _mismatched_container(OmegaConf.structured(schema), layer)
        raise ConfigError(f"{family} key '{key}'{where}: must be {expected}") from None


def _mismatched_container(schema: DictConfig, layer: DictConfig | None,
                          prefix: str = "") -> tuple[str, str]:
    """The first key of `layer` given as a mapping where `schema` has a list or the other
    way round (e.g. `overrides: {a: 1}` for a list of key=value), and what it must be."""
    for key, value in (layer or {}).items():
        name = f"{prefix}{key}"
        expected = schema.get(key) if isinstance(schema, DictConfig) else None
        if isinstance(expected, ListConfig) and isinstance(value, DictConfig):
            return name, "a list, not a mapping"
        if isinstance(expected, DictConfig) and isinstance(value, ListConfig):
            return name, "a mapping, not a list"
        if isinstance(expected, DictConfig) and isinstance(value, DictConfig):
            found = _mismatched_container(expected, value, f"{name}.")
            if found[0]:
                return found
    return "", "of another type"


_RATIO = re.compile(r"^([^=]+)=(\d+:\d+)$")


def _ratio_as_text(override: str) -> str:
    """`key=2:4` with the value quoted: YAML 1.1 (OmegaConf's parser) reads an unquoted 2:4
    as the base-60 integer 124. No setting takes base-60 numbers; N:M patterns
    (prune.structure) are written this way."""
    found = _RATIO.match(override)
    return f'{found.group(1)}="{found.group(2)}"' if found else override


def read_mapping(path: Path, family: str) -> DictConfig:
    """The YAML file at `path` as a mapping; ConfigError saying what is wrong with the file
    (missing, not a file, not YAML, a duplicate key, a top level that is not `key: value`)."""
    culprit = f"{family} file {path}"
    if not path.exists():
        raise ConfigError(f"{culprit} does not exist")
    if path.is_dir():
        raise ConfigError(f"{culprit} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"{culprit} is not a regular file (a device or pipe); pass a YAML "
                          "file")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as error:
        raise ConfigError(f"{culprit}{_yaml_problem(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{culprit}: not valid YAML ({one_line(error)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{culprit} is not UTF-8 text; pass a YAML file") from None
    except OSError as error:
        raise ConfigError(f"{culprit} cannot be read ({error.strerror or error})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{culprit}: the top level is a list, but it must be a mapping of "
                          "`key: value` lines")
    if not loaded:  # an empty file or only comments: surely not the file meant
        raise ConfigError(f"{culprit} is empty; it must hold `key: value` lines")
    return loaded


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """', line N: what is wrong' from a YAML parser error."""
    problem = error.problem or error.context or ""
    if problem.startswith("found duplicate key "):
        problem = f"duplicate key '{problem.removeprefix('found duplicate key ')}'"
    else:
        problem = f"not valid YAML ({problem})" if problem else "not valid YAML"
    mark = error.problem_mark or error.context_mark
    return f", line {mark.line + 1}: {problem}" if mark is not None else f": {problem}"


def key_rule_checker(family: str, path: Path | None = None
                     ) -> Callable[[bool, str, Any, str], None]:
    """`require(ok, key, value, rule)`: raises ConfigError "FAMILY key 'KEY' = VALUE: RULE"
    (with "in PATH" after the key when given) unless `ok`."""

    def require(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            where = f" in {path}" if path is not None else ""
            raise ConfigError(f"{family} key '{key}'{where} = {value!r}: {rule}")

    return require
