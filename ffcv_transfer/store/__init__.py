"""What is on disk: the results store (`results`), an experiment's schema and layout (`experiment`), mask
designs (`masks`), betons' sidecars and records (`betons`), and the one atomic write (`files`).

May import: `ffcv_transfer.settings`, `ffcv_transfer.config` and `ffcv_transfer.store` itself; numpy, yaml
and the standard library at module level (ffcv only inside the functions that read beton records). No
torch: a user of the kernel or the findings reads stores without the training stack.
"""
