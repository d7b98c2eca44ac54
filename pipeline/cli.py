"""Command line: ``python -m pipeline {etl,train,predict,serve} ...``.

Each stage module owns its arguments (``add_arguments(parser)``) and its entry point
(``main(args) -> int``); this module only dispatches, importing only the chosen stage so that
``etl`` does not pay for importing TensorFlow. A ``PipelineError`` or an ``OSError`` (a full or
read-only disk, a missing directory) becomes a one-line message on stderr and exit status 2 (the CLI
entry point is the one place that prints). SIGTERM unwinds like Ctrl-C, so a stage's temporary
output is removed and the previous output stays in place.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from pipeline.errors import PipelineError

STAGES = {
    "etl": ("pipeline.etl", "raw MovieLens -> NVTabular workflow -> parquet + schema + saved workflow"),
    "train": ("pipeline.train", "ETL output -> schema-built model -> fit -> saved model + metrics"),
    "predict": ("pipeline.inference", "raw (userId, movieId) rows -> saved workflow -> saved model -> scores"),
    "serve": ("pipeline.serve", "HTTP API over the saved workflow and model"),
    "export": ("pipeline.export", "saved workflow + model -> one TF SavedModel scoring raw (userId, movieId)"),
    "evaluate": ("pipeline.evaluate", "models -> Recall@10/50, NDCG@10, MAP@10 on the valid split, next to popularity"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. Only ``stage``'s module is imported to add its arguments (imports are slow)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, (module_name, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:
            importlib.import_module(module_name).add_arguments(stage_parser)
        stage_parser.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if a in STAGES), None)
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    signal.signal(signal.SIGTERM, _terminate)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except PipelineError as err:
        logging.getLogger("pipeline").debug("stage failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        logging.getLogger("pipeline").debug("stage failed", exc_info=True)
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        _collect_quietly()
        return 2


def _collect_quietly() -> None:
    """Finalize what the failed stage left (e.g. pyarrow writers whose ``__del__`` fails again on the full
    disk) with their "Exception ignored" tracebacks sent to the debug log, not the user's terminal. The
    hook stays for the rest of the process: some of those objects are only finalized at exit."""
    import gc

    sys.unraisablehook = lambda unraisable: logging.getLogger("pipeline").debug(
        "ignored during cleanup: %r", unraisable.exc_value)
    gc.collect()


def describe_os_error(err: OSError) -> str:
    """``'cannot write /out/x: No space left on device'``-style text for an operating-system error."""
    files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    reason = err.strerror or str(err)
    return f"{files}: {reason}" if files else reason


def _terminate(signum, frame):
    # Unwind as an exception so `finally` / atomic outputs clean up; 128 + SIGTERM is the shell's status.
    raise SystemExit(128 + signum)
