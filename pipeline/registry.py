"""The names a user can pick, in one place: datasets, splits, devices and model architectures.

Every stage, reader and CLI flag takes its choices from here, so a new variant or architecture is added once.
"""

VARIANTS = ("ml-100k", "ml-1m", "ml-25m")  # MovieLens releases the readers know
DATASETS = VARIANTS + ("synthetic",)  # etl --dataset: a MovieLens release or our generated ML-1M-format set
SPLITS = ("random", "temporal", "official")  # etl --split (official: ML-100K's ua/ub files)
DEVICES = ("auto", "cpu", "gpu")  # dataframe device: auto = the GPU when cudf and a GPU are there
ARCHITECTURES = ("dlrm", "dcn", "deepfm", "wide-deep", "mlp")  # train --arch: the ranking models
RETRIEVAL_ARCHITECTURES = ("two-tower",)  # train --arch: retrieval models (pipeline.retrieval)
