"""Datasets -> betons: each writer makes NAME.beton with its sidecar (NAME.meta.json, NAME.labels.npy),
which `ffcv_transfer.store.betons` reads. Planted synthetic data (`synthetic`) is written here too.

May import: `ffcv_transfer.store` and the top-level modules. Never `engine`, `findings`, `experiments` or
`cli`. ffcv is imported only when a beton is written, never at package import.
"""

from ffcv_transfer.threading_layer import use_threading_layer

use_threading_layer()  # before anything imports numba (threading_layer.py says why)
