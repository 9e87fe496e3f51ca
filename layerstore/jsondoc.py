"""JSON from outside (manifests, indexes, tag lists, token responses) parsed with one clear failure.

`json.loads` raises RecursionError on a document nested a few thousand levels deep and
ValueError on anything malformed; both become one error that names the document.
"""

from __future__ import annotations

import json
from typing import Any

from layerstore.errors import FormatError, LiftoffError


def load_json(data: bytes | bytearray | str, what: str, error: type[LiftoffError] = FormatError) -> Any:
    """The parsed document; `error` (FormatError by default) naming `what` if it is not JSON or is nested too deeply."""
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply: corrupt or hostile document") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise error(f"{what}: not valid JSON ({str(e)[:200]})") from None
