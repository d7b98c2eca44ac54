"""The serving graph: the saved NVTabular workflow without its target inputs.

Requests carry no ``rating``: ``serving_workflow`` removes the raw target inputs from a deep copy of the
saved workflow, so the graph computes every feature from request columns alone while the loaded workflow
stays exactly as saved.
"""

from __future__ import annotations

import copy

from pipeline.errors import ArtifactError


def serving_workflow(workflow, targets: list[str]):
    """A copy of ``workflow`` that computes every non-target output from request columns alone.

    ``targets`` are the output columns tagged TARGET. The raw inputs they come from (e.g. ``rating``)
    are removed from a deep copy of the graph with NVTabular's ``remove_inputs``, which also drops
    the target branches and target dependencies (the target encoding reads its target only while
    fitting). The copy matters: ``remove_inputs`` mutates nodes in place, and the loaded workflow
    must stay exactly as saved. Raises ``ArtifactError`` if a feature still needs a target.
    Returns an ``nvt.Workflow`` with its schemas computed.
    """
    import nvtabular as nvt

    mapping = workflow.graph.column_mapping
    features = [c for c in workflow.output_schema.column_names if c not in targets]
    feature_sources = {src for c in features for src in mapping.get(c, [c])}
    raw_targets = sorted({src for t in targets for src in mapping.get(t, [t])} - feature_sources)
    serving = copy.deepcopy(workflow)
    if raw_targets:
        serving.remove_inputs(raw_targets)
    still_needed = sorted(set(serving._input_columns()) & set(raw_targets))
    if still_needed:
        raise ArtifactError(
            f"the saved workflow needs target column(s) {still_needed} to compute its features: "
            "it cannot serve requests that carry no target"
        )
    produced = serving.output_schema.column_names
    lost = [c for c in features if c not in produced]
    if lost:
        raise ArtifactError(f"removing the target inputs {raw_targets} from the workflow also removed features {lost}")
    request_columns = serving._input_columns()
    serving = nvt.Workflow(serving.output_node)
    serving.fit_schema(workflow.input_schema.select_by_name(request_columns))
    return serving
