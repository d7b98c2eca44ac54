"""Command line: ``python -m pipeline {etl,train,predict,serve,export} ...``.

Each stage module owns its arguments (``add_arguments(parser)``) and its entry point (``main(args)``,
returning its summary dict, or an exit status); this module only dispatches, importing only the chosen stage
so that ``etl`` does not pay for importing TensorFlow. The summary is printed as JSON on stdout and is the
only thing there (``... | jq`` works): logs, progress bars and Keras' progress go to stderr, and third-party
noise is folded into one line (``pipeline.console``; ``--verbose`` shows it). A ``PipelineError`` or an
``OSError`` (a full or read-only disk, a missing directory) becomes a one-line message on stderr and exit
status 2 (the CLI entry point is the one place that prints). SIGTERM unwinds like Ctrl-C, so a stage's
temporary output is removed and the previous output stays in place.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import signal
import sys

from pipeline.errors import PipelineError

STAGES = {
    "etl": ("pipeline.etl", "raw MovieLens -> NVTabular workflow -> parquet + schema + saved workflow"),
    "train": ("pipeline.train", "ETL output -> schema-built model -> fit -> saved model + metrics"),
    "predict": ("pipeline.inference.batch", "raw (userId, movieId) rows -> saved workflow -> saved model -> scores"),
    "serve": ("pipeline.serve", "HTTP API over the saved workflow and model"),
    "export": ("pipeline.export", "saved workflow + model -> one TF SavedModel scoring raw (userId, movieId)"),
    "evaluate": ("pipeline.evaluate", "models -> Recall@10/50, NDCG@10, MAP@10 on the valid split, next to popularity"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every default shown, except the empty ones (``None``, an off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser. Only ``stage``'s module is imported to add its arguments (imports are slow)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and every third-party notice")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, (module_name, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        # also after the stage name (`train ... --verbose`); SUPPRESS keeps a global -v when absent here
        stage_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                  help="debug logging and every third-party notice")
        if name == stage:
            importlib.import_module(module_name).add_arguments(stage_parser)
        stage_parser.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if a in STAGES), None)
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    from pipeline import console

    console.configure(args.verbose)
    for note in getattr(args, "deprecations", None) or []:
        logging.getLogger("pipeline").warning(note)
    signal.signal(signal.SIGTERM, _terminate)
    module = importlib.import_module(args._module)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras' progress bars write to stdout
            result = module.main(args)
    except PipelineError as err:
        logging.getLogger("pipeline").debug("stage failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        logging.getLogger("pipeline").debug("stage failed", exc_info=True)
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        _collect_quietly()
        return 2
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
        return 0
    return int(result or 0)


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
