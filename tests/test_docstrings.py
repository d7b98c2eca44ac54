"""Every exported class documents its arguments and shows a short example, and the examples run (doctest).

Exported: the names in ``__all__`` of pipeline and its public packages that are classes or class-like
factories (``DLRMModel``), and the public classes of the stage modules. The examples run with the names of
their package, ``np``, ``keras``, ``ops`` (keras.ops) and a tiny ETL-shaped ``schema``, ``batch`` and
``train`` (an in-memory merlin Dataset) in scope.
"""

from __future__ import annotations

import doctest
import importlib
import inspect

import keras
import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401

PACKAGES = ["pipeline", "pipeline.models", "pipeline.ops", "pipeline.datasets", "pipeline.inference",
            "pipeline.retrieval"]
# The stage modules have no __all__: their public classes are these.
STAGE_CLASSES = ["pipeline.train.TrainConfig", "pipeline.etl.EtlConfig", "pipeline.serve.ServeConfig",
                 "pipeline.loader.Loader"]
# The examples of these packages run here; the others' need a trained model directory and are only checked
# for being there.
RUN_EXAMPLES = ("pipeline.models", "pipeline.ops", "pipeline.datasets")

# Still to be documented (Args section and example): each owner removes a name from here when it has both.
# Anything exported and not listed here must have both.
UNDOCUMENTED: set[str] = set()


def _exported() -> list[tuple[str, object]]:
    found = {}
    for name in PACKAGES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or (inspect.isfunction(obj) and attr[:1].isupper())) and \
                    obj.__module__.startswith("pipeline"):
                found.setdefault(f"{name}.{attr}", obj)
    for qualified in STAGE_CLASSES:
        module, attr = qualified.rsplit(".", 1)
        found[qualified] = getattr(importlib.import_module(module), attr)
    return sorted(found.items())


EXPORTED = _exported()


def _has_args(doc: str) -> bool:
    return "\nArgs:\n" in f"\n{doc}\n" or "\n    Args:\n" in doc


@pytest.mark.parametrize("name, obj", EXPORTED, ids=[name for name, _ in EXPORTED])
def test_every_exported_class_documents_its_args_and_has_an_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    if name in UNDOCUMENTED:
        pytest.skip("listed in UNDOCUMENTED")
    assert _has_args(doc), f"{name}: no 'Args:' section in its docstring"
    assert ">>>" in doc, f"{name}: no example ('>>>') in its docstring"


def test_the_undocumented_list_names_only_exported_classes():
    assert UNDOCUMENTED <= {name for name, _ in EXPORTED}


@pytest.fixture(scope="module")
def example_globals(tiny_schema, tiny_batch):
    from merlin.io import Dataset

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({name: list(values) if name == "genres" else values[:, 0]
                          for name, values in tiny_batch.items()})
    frame = pd.concat([frame] * 4, ignore_index=True).assign(rating_binary=rng.integers(0, 2, 20),
                                                             rating=rng.integers(1, 6, 20).astype("float32"))
    frame["genres"] = [[int(g) for g in row if g] for row in frame["genres"]]
    return {"np": np, "keras": keras, "ops": keras.ops, "pd": pd, "schema": tiny_schema, "batch": tiny_batch,
            "train": Dataset(frame, schema=tiny_schema)}


RUNNABLE = [(name, obj) for name, obj in EXPORTED if name.rsplit(".", 1)[0] in RUN_EXAMPLES
            and ">>>" in (inspect.getdoc(obj) or "")]


@pytest.mark.parametrize("name, obj", RUNNABLE, ids=[name for name, _ in RUNNABLE])
def test_the_examples_run(name, obj, example_globals):
    package = importlib.import_module(name.rsplit(".", 1)[0])
    globs = {**{attr: getattr(package, attr) for attr in getattr(package, "__all__", [])}, **example_globals}
    keras.utils.set_random_seed(0)
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0, f"{name}: {results.failed} of {results.attempted} failed"
