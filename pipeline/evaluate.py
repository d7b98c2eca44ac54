"""Evaluate stage: top-k ranking metrics of trained models on the valid split's held-out positives.

``python -m pipeline evaluate --data ETL_DIR --model-dir MODEL_DIR [--model-dir ANOTHER] --out FILE.json`` ranks
every movie of the saved workflow for each valid user with at least one held-out positive (``rating_binary ==
1``), the movies the user rated in training excluded, and reports Recall@10, Recall@50, NDCG@10 and MAP@10
(``pipeline.retrieval.ranking``) for, each under its own name in the JSON:

- ``popularity``: every movie by its number of training positives (always, as the baseline);
- each ranking model dir (DLRM, DCN, ...) under its architecture's name (``dlrm``): ``Predictor.recommend``
  scoring every movie;
- each two-tower model dir under ``two-tower``: its item index over the whole catalog;
- ``two-stage`` when a two-tower and a ranking model are both given: ``--candidates`` movies retrieved by the
  two-tower, ranked by the ranking model (what ``serve --retrieval`` answers).

Every ranker sees the same users (``--max-users``: a seeded sample of them). The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

logger = logging.getLogger(__name__)

TWO_TOWER = "two-tower"


def model_kind(model_dir: Path) -> str:
    """The architecture a model dir was trained as (its config.json ``model``), e.g. ``dlrm`` or ``two-tower``."""
    from pipeline.errors import ArtifactError

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise ArtifactError(f"{config} is missing: is {model_dir} a model dir written by `python -m pipeline train`?")
    try:
        return str(json.loads(config.read_text()).get("model") or "model")
    except ValueError as err:
        raise ArtifactError(f"{config} is not valid JSON ({err})") from err


def evaluate_models(data_dir: str | Path, model_dirs: list[str | Path], *, candidates: int = 200,
                    max_users: int | None = None, seed: int = 0, progress: bool = True,
                    popularity_weight: float | str = 0.0, retrieval_weight: float | str = 0.0) -> dict[str, Any]:
    """The ranking metrics of popularity and of every model in ``model_dirs`` (plus two-stage when there are a
    two-tower and a ranking model) on ``data_dir``'s valid split; returns the report written by the CLI.

    ``popularity_weight`` ``w``, ``retrieval_weight`` ``v``: two-stage ranks by ``log(ranker score) + w * log(1 +
    training ratings) + v * two-tower score`` (``pipeline.retrieval.popularity``); ``"auto"`` picks them on held-out
    training positives, never on valid."""
    import pipeline  # noqa: F401  (dask settings before merlin)
    from pipeline.inference import Predictor
    from pipeline.retrieval.ranking import (
        CUTOFFS,
        HeldOut,
        evaluate_rankers,
        popularity_ranker,
        rank_all_ranker,
        retrieval_ranker,
        two_stage_ranker,
    )
    from pipeline.retrieval.retriever import Retriever

    if not model_dirs:
        raise UsageError("--model-dir: give at least one model dir")
    if candidates < 1:
        raise UsageError(f"--candidates must be positive, got {candidates}")
    if max_users is not None and max_users < 1:
        raise UsageError(f"--max-users must be positive, got {max_users}")
    started = time.perf_counter()
    retrievers, rankers, names = [], [], {}
    for model_dir in model_dirs:
        kind = model_kind(Path(model_dir))
        name = kind if kind not in names else f"{kind}:{model_dir}"
        names[name] = str(model_dir)
        if kind == TWO_TOWER:
            retrievers.append((name, Retriever.load(data_dir, model_dir)))
        else:
            rankers.append((name, Predictor.load(data_dir, model_dir)))
    first = retrievers[0][1].predictor if retrievers else rankers[0][1]
    held_out = HeldOut.load(data_dir, first).sample(max_users, seed)
    ranked = {"popularity": popularity_ranker(first)}
    for name, predictor in rankers:
        ranked[name] = rank_all_ranker(predictor)
    for name, retriever in retrievers:
        ranked[name] = retrieval_ranker(retriever)
    two_stage = None
    if retrievers and rankers:
        from pipeline.retrieval.popularity import set_two_stage_weights
        from pipeline.retrieval.retriever import TwoStageRecommender

        recommender = TwoStageRecommender(retrievers[0][1], rankers[0][1], candidates)
        weights = set_two_stage_weights(recommender, popularity_weight, retrieval_weight, seed=seed)
        ranked["two-stage"] = two_stage_ranker(retrievers[0][1], rankers[0][1], candidates, recommender=recommender)
        w, v = weights["popularity_weight"], weights["retrieval_weight"]
        names["two-stage"] = (f"{candidates} candidates from {retrievers[0][0]}, ranked by "
                              + (f"log {rankers[0][0]} + {w:g} x log(1 + training ratings) + {v:g} x "
                                 f"{retrievers[0][0]} score" if w or v else rankers[0][0]))
        two_stage = {"popularity_weight": w, "retrieval_weight": v,
                     "picked_on_held_out_training_positives": weights["picked"]}
    metrics = evaluate_rankers(held_out, ranked, progress=progress)
    return {
        "data": str(Path(data_dir).resolve()),
        "split": "valid",
        "models": names,
        "metrics": metrics,
        "users": int(len(held_out.users)),
        "max_users": max_users,
        "seed": seed,
        "candidates": candidates,
        "two_stage": two_stage,
        "dropped_positives": held_out.dropped,
        "definition": (f"per user with a held-out positive (rating_binary == 1 in valid), every movie of the saved "
                       f"workflow ranked, the user's training movies excluded; metrics {sorted(CUTOFFS)} with binary "
                       "relevance, averaged over users"),
        "seconds": round(time.perf_counter() - started, 3),
    }


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.retrieval.popularity import weight_arg

    parser.add_argument("--data", type=Path, required=True, help="ETL output dir (workflow/, train/, valid/)")
    parser.add_argument("--model-dir", type=Path, action="append", required=True, dest="model_dirs",
                        help="a model dir written by `train` (repeat: e.g. a two-tower and a DLRM, which adds two-stage)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report to write")
    parser.add_argument("--candidates", type=int, default=200,
                        help="two-stage: movies retrieved by the two-tower for the ranking model (default 200)")
    parser.add_argument("--popularity-weight", type=weight_arg, default=0.0,
                        help="two-stage: rank by log(ranker score) + W * log(1 + training ratings) + V * two-tower "
                             "score; 'auto' picks W on held-out training positives (default 0)")
    parser.add_argument("--retrieval-weight", type=weight_arg, default=0.0,
                        help="two-stage: V above; 'auto' picks it (with W when both are auto) on held-out training "
                             "positives (default 0; both 0: the ranker's score alone)")
    parser.add_argument("--max-users", type=int, default=None,
                        help="evaluate a seeded sample of this many valid users (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-users sample (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a previous report")


def _is_report(path: Path) -> bool:
    try:
        return "metrics" in json.loads(path.read_text()) and path.suffix == ".json"
    except (OSError, ValueError):
        return False


def main(args: argparse.Namespace) -> dict:
    from pipeline.atomic import atomic_file, check_output

    check_output(args.out, stage="evaluate", flag="--out", is_previous_output=_is_report, kind="file",
                 inputs=[("--data", args.data), *[("--model-dir", m) for m in args.model_dirs]], overwrite=args.overwrite)
    report = evaluate_models(args.data, args.model_dirs, candidates=args.candidates, max_users=args.max_users,
                             seed=args.seed, popularity_weight=args.popularity_weight,
                             retrieval_weight=args.retrieval_weight)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    summary = {name: {k: round(v, 4) for k, v in m.items() if "@" in k} for name, m in report["metrics"].items()}
    return {"out": str(args.out), "users": report["users"], "metrics": summary}
