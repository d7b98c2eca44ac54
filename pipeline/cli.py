"""Command line: ``python -m pipeline {etl,train,predict,serve} ...``.

Each stage module owns its arguments (``add_arguments(parser)``) and its entry point
(``main(args) -> int``); this module only dispatches, importing only the chosen stage so that
``etl`` does not pay for importing TensorFlow. A ``PipelineError`` becomes a one-line message
on stderr and exit status 2 (the CLI entry point is the one place that prints).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import PipelineError

STAGES = {
    "etl": ("pipeline.etl", "raw MovieLens -> NVTabular workflow -> parquet + schema + saved workflow"),
    "train": ("pipeline.train", "ETL output -> schema-built model -> fit -> saved model + metrics"),
    "predict": ("pipeline.inference", "raw (userId, movieId) rows -> saved workflow -> saved model -> scores"),
    "serve": ("pipeline.serve", "HTTP API over the saved workflow and model"),
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
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except PipelineError as err:
        logging.getLogger("pipeline").debug("stage failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
