"""What the user sees while a model or an SAE is asked of the Hugging Face hub.

A hub call can wait many seconds (a download, or huggingface_hub's retries before an error):
one line says first what is awaited, and huggingface_hub's own retry lines and warnings are
kept from the user, whose run ends in one line of ours where the call fails.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def say_hub_wait(what: str) -> None:
    """One line on stderr before the hub is asked for `what`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        line = f"looking for {what} in the Hugging Face cache (HF_HUB_OFFLINE is set)"
    else:
        line = f"resolving {what} on the Hugging Face hub"
    print(f"sae-acceptance: {line}...", file=sys.stderr, flush=True)


@contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's logging (its retry lines) and every warning held back during the call.

    Through huggingface_hub's own verbosity: its logging module sets the library's level when
    first imported, which a level set on the logger before that import would not survive."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hub_logging.set_verbosity(level)
