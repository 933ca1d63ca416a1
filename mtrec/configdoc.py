"""Text about the config schema: one-line validation errors and the reference page.

Both walk the same pydantic models (`mtrec.config.MtrecConfig`, `mtrec.spec.ModelSpec`):
`validate` turns pydantic's errors into one line naming the key, the value and the fix;
`reference_markdown` is ``docs/configuration.md`` (``python -m mtrec.configdoc > docs/configuration.md``;
a test keeps it in sync).
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ValidationError

from mtrec.errors import ConfigError
from mtrec.spec import ARCH_CONFIGS, ARCH_NAMES, arch_name

M = TypeVar("M", bound=BaseModel)


def validate(cls: type[M], data: dict[str, Any], label: str = "config") -> M:
    """`cls.model_validate(data)`, its errors as one line.

    Raises:
        ConfigError: one line naming the key, the value received and the fix.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, label, cls)) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic puts the discriminator value into the location: ('model', 'esmm', 'tower') -> model.tower
    arch_values = set(ARCH_NAMES) | {f"Literal['{a}']" for a in ARCH_NAMES}
    return tuple(p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "model" and p in arch_values))


def _model_at(loc: tuple[Any, ...], data: Any, root: type[BaseModel]) -> type[BaseModel] | None:
    """The config model class that owns the last key of `loc` (for listing allowed keys)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        if part == "model":
            arch = data.get("model", {}).get("arch") if isinstance(data, dict) else None
            cls = {arch_name(m): m for m in ARCH_CONFIGS}.get(arch)
            continue
        cls = _unwrap(ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    """list[X] -> X, X | None -> X."""
    for _ in range(3):
        origin = typing.get_origin(ann)
        if origin in (list, dict):
            ann = typing.get_args(ann)[-1]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = args[0] if len(args) == 1 else ann
            if len(args) != 1:
                break
        else:
            break
    return ann


def _one_line(err: ValidationError, label: str, root: type[BaseModel]) -> str:
    errors = err.errors()
    first = errors[0]
    loc = _strip_union_tags(tuple(first["loc"]))
    key = _dotted(loc)
    more = f" (+{len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    value = first.get("input")
    kind = first["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc, _root_input(err), root)
        allowed = sorted(owner.model_fields) if owner else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean `{guess[0]}`? " if guess else ""
        allowed_txt = f"allowed keys here: {', '.join(allowed)}; " if allowed else ""
        return f"config {label}: unknown key `{key}`; {hint}{allowed_txt}remove or rename it{more}"
    if kind == "missing":
        return f"config {label}: missing required key `{key}`; add it (see docs/configuration.md){more}"
    if kind == "union_tag_not_found":
        return f"config {label}: missing required key `{key}.arch`; use one of {', '.join(ARCH_NAMES)}{more}"
    if kind == "union_tag_invalid":
        choices = ", ".join(ARCH_NAMES)
        got = first.get("ctx", {}).get("tag", value)
        return f"config {label}: `{key}.arch` is {got!r}; use one of {choices}{more}"
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        where = f"`{key}`: " if loc else ""
        return f"config {label}: {where}{msg}{more}"
    return f"config {label}: `{key}` got {_short(value)} ({msg}); fix the value (see docs/configuration.md){more}"


def _root_input(err: ValidationError) -> Any:
    # ValidationError does not keep the root input; the owner lookup only needs `model.arch`.
    for e in err.errors():
        if tuple(e["loc"][:1]) == ("model",) and isinstance(e.get("input"), dict) and "arch" in e["input"]:
            return {"model": e["input"]}
    for e in err.errors():
        loc = e["loc"]
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in ARCH_NAMES:
            return {"model": {"arch": loc[1]}}
    return {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------
# reference documentation (docs/configuration.md is this function's output)


def reference_markdown() -> str:
    """Every config key with its type, default and description, as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m mtrec.configdoc > docs/configuration.md`; a test keeps it in sync. -->",
        "",
        "One YAML file configures a model and its jobs. Unknown keys are errors. Shipped examples:",
        "`mtrec/configs/esmm.yaml`, `esm2.yaml`, `mmoe.yaml` (use `--config esmm` to refer to one).",
        "CLI overrides: `--logs` sets `job.logs`, `--workdir` sets `job.workdir`.",
        "",
    ]

    done: set[str] = set()

    def section(title: str, cls: type[BaseModel], prefix: str) -> None:
        if title in done:  # e.g. model.shallow_tower, shared by every arch
            return
        done.add(title)
        lines.extend([f"## `{title}`", "", "| key | type | default | description |", "|---|---|---|---|"])
        nested: list[tuple[str, type[BaseModel], str]] = []
        for name, field in cls.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            sub = _unwrap(ann)
            lines.append(f"| `{key}` | {_type_name(ann)} | {_default(field)} | {field.description or ''} |")
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                is_list = typing.get_origin(ann) is list
                nested.append((f"{key}[]" if is_list else key, sub, f"{key}[]." if is_list else f"{key}."))
        lines.append("")
        for t, c, p in nested:
            section(t, c, p)

    from mtrec.config import MtrecConfig

    section("(top level)", MtrecConfig, "")
    for m in ARCH_CONFIGS:
        section(f"model (arch: {arch_name(m)})", m, "model.")
    return "\n".join(lines).rstrip() + "\n"


def _type_name(ann: Any) -> str:
    if isinstance(ann, type) and issubclass(ann, Enum):
        return " \\| ".join(m.value for m in ann)
    if isinstance(ann, type):
        return ann.__name__ if not issubclass(ann, BaseModel) else "mapping"
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is Literal:
        return " \\| ".join(str(getattr(a, "value", a)) for a in args)
    if origin in (Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        if all(isinstance(p, type) and issubclass(p, BaseModel) for p in parts) and len(parts) > 1:
            return "mapping (by `arch`)"
        return " or ".join(_type_name(p) for p in parts) + (" or null" if type(None) in args else "")
    if origin is Annotated:
        return _type_name(args[0])
    return str(ann)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list):
        value = [getattr(v, "value", v) for v in value]
    return f"`{json.dumps(value)}`"


def reference_keys() -> set[str]:
    """Every documented key path (as in the reference tables), for the docs-sync test."""
    return {line.split("`")[1] for line in reference_markdown().splitlines() if line.startswith("| `")}


if __name__ == "__main__":
    print(reference_markdown(), end="")
