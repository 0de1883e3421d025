"""Training: ffcv loaders, models, the K-model lockstep trainers, transfer, the worker over a store, and the
launcher that runs workers.

May import: `ffcv_transfer.store`, `ffcv_transfer.settings`, `ffcv_transfer.config`,
`ffcv_transfer.threading_layer`. Never `findings` (training does not read results), `experiments`,
`writers` or `cli`.
"""
