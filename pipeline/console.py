"""What the command line shows: logs and progress on stderr, third-party noise folded into one line.

A stage's result (its JSON summary) is the only thing on stdout, so ``python -m pipeline train ... | jq``
works. Some of our dependencies warn on every run about things a user can do nothing about (merlin's
"CPU mode ... extremely limited support", its TensorFlow / PyTorch / Triton dtype-mapping notices, dask's
legacy-DataFrame deprecation that merlin-core 23.8 requires, the scheduler's and workers' INFO chatter
with ``--workers``); ``configure`` hides those, says so once, and ``--verbose`` shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# Message prefixes of third-party warnings that ask nothing of our users (see the module docstring).
THIRD_PARTY_WARNINGS = (
    "Initializing an NVTabular Dataset in CPU mode",
    "Changing an NVTabular Dataset to CPU mode",
    "The legacy Dask DataFrame implementation is deprecated",
    "Tensorflow dtype mappings did not load",
    "PyTorch dtype mappings did not load",
    "Triton dtype mappings did not load",
)
# Loggers whose INFO lines describe the machinery, not the user's job (warnings and errors still show).
CHATTY_LOGGERS = ("distributed", "tensorflow", "absl")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("pipeline")
_quiet = False  # configure() hides third-party noise once per process


class _Hidden:
    """Counts what was hidden and says so once, the first time."""

    def __init__(self) -> None:
        self.count = 0

    def note(self) -> None:
        self.count += 1
        if self.count == 1:
            logger.info("hiding third-party notices that need no action (merlin CPU mode, dask deprecations, "
                        "Dask cluster INFO lines); --verbose shows them")


class _QuietThirdParty(logging.Filter):
    def __init__(self, hidden: _Hidden):
        super().__init__()
        self.hidden = hidden

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.split(".")[0] in CHATTY_LOGGERS:
            self.hidden.note()
            return False
        return True


def configure(verbose: bool = False) -> None:
    """Log to stderr (DEBUG with ``verbose``, else INFO) and, unless ``verbose``, hide third-party noise in
    this process and in the processes it starts (Dask workers read the environment)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S",
                        stream=sys.stderr)
    global _quiet
    if verbose or _quiet:
        return
    _quiet = True
    hidden = _Hidden()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietThirdParty(hidden))
    # Worker processes: Python applies PYTHONWARNINGS and dask its DASK_* variables at start-up.
    os.environ["PYTHONWARNINGS"] = ",".join(f"ignore:{m}" for m in THIRD_PARTY_WARNINGS)
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    import dask

    dask.config.set({"logging.distributed": "warning"})
    pattern = re.compile("|".join(re.escape(m) for m in THIRD_PARTY_WARNINGS))
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if pattern.match(str(message)):
            hidden.note()
            return
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
