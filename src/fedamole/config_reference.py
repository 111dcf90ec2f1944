"""The configuration reference (`docs/configuration.md`), generated from :class:`Config` itself so
that it cannot drift from what the code accepts: every key, its type, default and description.

    python -m fedamole.config_reference > docs/configuration.md     # `make docs`
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedamole.config import Config

HEADER = """# Configuration reference

Generated from `fedamole.config.Config` by `make docs` (a test fails when this file and the code
disagree). Give settings in a YAML file (`--config`, see `configs/`) and override any key with
`--set section.key=value`; the last value given wins. Unknown keys are refused with the list of
known ones.
"""


def _type_name(annotation: Any) -> str:
    """A reader's spelling of a field's type: choices listed, optional marked."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    return f"`{value}`" if value is not None else "`null`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{key}.")
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_type_name(annotation)} | {_default(field)} | {description} |")
    return rows


TABLE = "| key | type | default | meaning |\n|---|---|---|---|\n"


def reference_markdown() -> str:
    """Every configuration key, section by section, as Markdown tables."""
    top = [n for n, f in Config.model_fields.items() if not _is_section(f)]
    rows = [r for r in _rows(Config, "") if r.split("`")[1] in top]
    parts = [HEADER, "## Top level\n\n" + TABLE + "\n".join(rows)]
    for name, field in Config.model_fields.items():
        if _is_section(field):
            section: type[BaseModel] = field.annotation  # type: ignore[assignment]
            doc = " ".join((section.__doc__ or "").split())
            intro = f"{doc}\n\n" if doc else ""
            parts.append(f"## `{name}`\n\n{intro}" + TABLE + "\n".join(_rows(section, f"{name}.")))
    return "\n\n".join(parts) + "\n"


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


if __name__ == "__main__":
    print(reference_markdown(), end="")
