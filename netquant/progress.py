"""Progress reporting for long work (training, calibration, validation, code generation).

Library functions take ``progress``: a callable ``progress(done, total, message)`` or None.
The CLI passes :func:`bar` (a tqdm bar on stderr); the web app passes its own callback that
feeds the live progress bar; None reports through ``logging`` at DEBUG level only.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

Progress = Callable[[int, int, str], None]
log = logging.getLogger(__name__)


def report(progress: Optional[Progress], done: int, total: int, message: str = "") -> None:
    """Send one progress update to ``progress`` (or to the debug log when it is None)."""
    if progress is not None:
        progress(done, total, message)
    else:
        log.debug("%s %d/%d", message, done, total)


def bar(desc: str = "") -> Progress:
    """A progress callback drawing a tqdm bar on stderr (for the CLI)."""
    from tqdm import tqdm

    state = {"bar": None}

    def update(done: int, total: int, message: str = "") -> None:
        b = state["bar"]
        if b is None or b.total != total or done < b.n:
            if b is not None:
                b.close()
            b = state["bar"] = tqdm(total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True)
        if message:
            b.set_postfix_str(message, refresh=False)
        b.update(done - b.n)
        if done >= total:
            b.close()
            state["bar"] = None

    return update
