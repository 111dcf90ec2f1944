"""The one record type every data source is converted into, and the error raised for bad data."""

from __future__ import annotations

from dataclasses import dataclass

from fedamole.errors import UserError

UNLABELLED = "default"  # the label of an example whose source names no label (category)


@dataclass(frozen=True)
class Example:
    """An instruction-tuning example.

    `label` is the category/task/class used to partition data over clients and to report
    (`UNLABELLED` when the source has none);
    `choices` are the answer options of a classification example (scored by loss, not generated);
    examples sharing a `group` (e.g. an SNLI premise) are never put in different splits of a
    client (label-defined partitions may put them on different clients).
    """

    instruction: str
    input: str
    output: str
    label: str
    choices: tuple[str, ...] | None = None
    group: str | None = None
    source: str = ""


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the file, the line/row and what to do."""
