"""Evaluation jobs on the front door: the request checked into an `EvaluationSpec` (validation.py), the
worker's `EvaluationOutcome` as the wire `EvaluationResult` and its `Recommendation` (results.py), and
the models' adopted defaults (defaults.py). The work itself runs on the offline worker
(workers/evaluation/job.py); docs/faithfulness.md, *The evaluation job*, describes it.
"""
