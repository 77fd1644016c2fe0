"""Run directories on local disk or behind a URI (s3://, gs://, any pyarrow.fs filesystem)."""

from __future__ import annotations

import re

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str) -> bool:
    """s3://bucket/x, gs://bucket/x, file:///x ... (a Windows drive letter is not a scheme)."""
    return bool(_URI.match(str(path)))
