"""What every job config shares: a strict base model, a safe run-name type, the YAML reader,
dotted ``key=value`` overrides, and the error message that names the bad key.

Each job's config (:mod:`jobs.config`, :mod:`jobs.sweep_config`, :mod:`jobs.ensemble`, the
comparisons) is a :class:`StrictModel` read by :func:`read_yaml_mapping`, overridden by
:func:`apply_overrides` and validated by :func:`validate`, so a typo fails the same way in
every job: with its dotted name and the keys that are valid there.
"""

from __future__ import annotations

import difflib
import os
import types
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config is invalid; the message names every bad key and what is valid there."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated (on assignment too)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def field_annotation(cls, name: str, value: Any) -> Any:
        """The type of field ``name`` holding ``value``, for naming the valid keys of a section.

        A field whose model depends on its value (``JobConfig.method``) overrides this.
        """
        return cls.model_fields[name].annotation

    def dump(self) -> dict[str, Any]:
        """Plain dict of JSON types (validates back into the same config)."""
        return self.model_dump(mode="json")


def _folder_name(value: str) -> str:
    if not value or any(c in value for c in "/\\ ") or value.startswith("."):
        raise ValueError(f"name {value!r} must be a non-empty folder name without slashes or spaces")
    return value


#: A run or sweep name: it becomes a folder, so no slashes, spaces or leading dot.
SafeName = Annotated[str, AfterValidator(_folder_name)]


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping.

    Args:
        path: The file.
        what: What the file is, for the messages ("sweep config", "base config", ...).

    Raises:
        ConfigError: Missing file, bad YAML, or a top level that is not a mapping.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping")
    return data


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (``0.1``, ``true``, ``[1, 2]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"]["c"] = value`` for ``key="a.b.c"``, creating sections as needed.

    Raises:
        ConfigError: A part of the key holds a value, not a section.
    """
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def get_dotted(data: dict[str, Any], key: str) -> Any:
    """``data["a"]["b"]["c"]`` for ``key="a.b.c"``."""
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place; returned too).

    Raises:
        ConfigError: An override without ``=``, or one that goes through a value.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        try:
            set_dotted(data, key, parse_value(raw))
        except ConfigError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    return data


def validate(model: type[M], data: dict[str, Any], title: str = "invalid config",
             error: type[ConfigError] = ConfigError) -> M:
    """``model.model_validate(data)``, its errors explained by :func:`format_validation_error`.

    Raises:
        ConfigError: (``error``) Naming every bad key and value.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(exc, model, data, title)) from None


# --- explaining pydantic's errors ----------------------------------------------------------------


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of ``A | B``, ``Optional[A]`` and ``Annotated[A | B, ...]`` (else just the annotation)."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for arg in get_args(annotation) if arg is not type(None) for a in _members(arg))
    return (annotation,)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field_annotation(model: type[BaseModel], name: str, value: Any) -> Any:
    if issubclass(model, StrictModel):
        return model.field_annotation(name, value)
    return model.model_fields[name].annotation


def _tagged(member: Any, tag: Any) -> bool:
    """Whether ``tag`` (a part of an error location inside a union) names this alternative."""
    if _is_model(member):
        return tag == member.__name__ or any(f.default == tag for f in member.model_fields.values())
    return False


def _walk(model: type[BaseModel] | None, loc: tuple[Any, ...], data: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Follow an error location through the model and the data.

    Returns:
        The location as ``(kind, part)`` steps (``field``, ``index`` or ``key``; union tags are
        dropped) and the type at its end (``typing.Any`` where it is not known).
    """
    steps: list[tuple[str, Any]] = []
    annotation: Any = model if model is not None else Any
    node = data
    for part in loc:
        members = _members(annotation)
        chosen = [m for m in members if _tagged(m, part)] if len(members) > 1 else []
        if chosen:  # a union tag: the location goes on inside that alternative
            annotation = chosen[0]
            continue
        annotation = next((m for m in members if _is_model(m) and part in m.model_fields), members[0])
        origin = get_origin(annotation)
        args = get_args(annotation)
        child = node.get(part) if isinstance(node, dict) else None
        if _is_model(annotation) and part in annotation.model_fields:
            steps.append(("field", part))
            annotation = _field_annotation(annotation, part, child)
        elif isinstance(part, int):
            steps.append(("index", part))
            annotation = args[0] if origin in (list, tuple, set) and args else Any
            child = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
        elif origin is dict:
            steps.append(("key", part))
            annotation = args[1] if len(args) == 2 else Any
        elif annotation is Any or _is_model(annotation):
            steps.append(("field", part))
            annotation = Any
        else:  # a tag of a scalar union member ("bool", "literal['auto']"): says nothing the message does not
            continue
        node = child
    return steps, annotation


def _where(steps: list[tuple[str, Any]]) -> str:
    """``train.lr``, ``backbones[0].spec``, ``space key 'train.lr' (low)``: a location people can read."""
    text = ""
    for i, (kind, part) in enumerate(steps):
        if kind == "index":
            text += f"[{part}]"
        elif kind == "field":
            text += f".{part}" if text else str(part)
        elif text and not any(k == "key" for k, _ in steps[:i]):
            # The first dict key (often dotted itself, like a sweep's space keys) reads as words.
            rest = _where(steps[i + 1:])
            return f"{text} key {part!r}" + (f" ({rest})" if rest else "")
        else:
            text += f"[{part!r}]"
    return text


def format_validation_error(exc: ValidationError, model: type[BaseModel] | None = None,
                            data: dict[str, Any] | None = None, title: str = "invalid config") -> str:
    """Explain a pydantic error: each bad key by its dotted name, for an unknown key the valid ones.

    Args:
        exc: The error of ``model.model_validate(data)``.
        model: The validated model (``None``: the valid keys are not listed).
        data: What was validated (picks the model of a section whose type depends on its value).
        title: The first line.
    """
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden" and loc:
            parent, section = _walk(model, loc[:-1], data or {})
            valid = sorted(section.model_fields) if _is_model(section) else []
            leaf = str(loc[-1])
            close = [v for v in valid if v.startswith(leaf)][:1] or difflib.get_close_matches(leaf, valid, n=1)
            if any(kind == "key" for kind, _ in parent):  # "space key 'train.lr': unknown key 'lowx'"
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                line = f"{_where(parent)}: unknown key {loc[-1]!r}{hint}"
            else:  # "unknown key 'train.lrr' (did you mean 'train.lr'?)"
                hint = f" (did you mean {_where([*parent, ('field', close[0])])!r}?)" if close else ""
                line = f"unknown key {_where([*parent, ('field', loc[-1])])!r}{hint}"
            lines.append(line + (f"; valid keys here: {', '.join(valid)}" if valid else ""))
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_where(_walk(model, loc, data or {})[0]) or '<root>'}: {message}{shown}")
    return f"{title}:\n  " + "\n  ".join(lines)

