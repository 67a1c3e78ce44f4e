"""Field types shared by the definition schema and the checks."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression {value!r}: {exc}") from None
    return value


#: A string that must compile as a Python regular expression.
Regex = Annotated[str, AfterValidator(_compiles)]
