"""Reading results: the influence kernel, rankings, reliability and the evidence it weighs (planted truth,
the WordNet check), example-level influence and leaks, counterfactual arithmetic, figures and the report.
Reads stores; never trains.

May import: `ffcv_transfer.store`, `ffcv_transfer.settings`, `ffcv_transfer.config`. Never `engine`,
`experiments`, `writers` or `cli`. `findings.kernel` imports numpy alone (its backends import numba, torch
or cupy when chosen), so `from ffcv_transfer.findings.kernel import class_influence` needs nothing else.
"""
