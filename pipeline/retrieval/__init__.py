"""Retrieval: the two-tower model's item index over the saved workflow's catalog, two-stage ranking, ranking metrics."""

from pipeline.retrieval.fit import TwoTowerConfig, fit_two_tower, train_two_tower
from pipeline.retrieval.index import BruteForceIndex, ItemIndex
from pipeline.retrieval.popularity import pick_two_stage_weights
from pipeline.retrieval.ranking import HeldOut, evaluate_rankers, ranking_metrics
from pipeline.retrieval.retriever import DEFAULT_CANDIDATES, Retriever, TwoStageRecommender, two_stage_recommend

__all__ = ["BruteForceIndex", "DEFAULT_CANDIDATES", "HeldOut", "ItemIndex", "Retriever", "TwoStageRecommender", "TwoTowerConfig", "evaluate_rankers",
           "fit_two_tower", "pick_two_stage_weights", "ranking_metrics", "train_two_tower", "two_stage_recommend"]
