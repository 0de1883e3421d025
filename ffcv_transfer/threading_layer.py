"""The one place that chooses numba's threading layer, which runs ffcv's decoding and writing threads.

libtbb (pulled in by OpenCV) makes numba pick its TBB layer, which breaks ffcv's forking writer ("Unable to join
threads to shut down before fork()"), and OpenMP must not be started before a fork either: so the default is
workqueue, set when `ffcv_transfer.writers` or `ffcv_transfer.store.betons` is imported. A loader may ask for
another layer (`loader.threading`); that works only until numba starts its threads in this process."""

from __future__ import annotations

import os
import sys
import warnings

DEFAULT = "workqueue"


def use_threading_layer(name: str | None = None) -> None:
    """Run numba's parallel code on layer `name` (None: the environment's NUMBA_THREADING_LAYER, else
    workqueue): possible until numba starts its threads in this process, a warning after."""
    if name is None:
        name = os.environ.get("NUMBA_THREADING_LAYER") or DEFAULT
    if "numba" not in sys.modules:
        os.environ["NUMBA_THREADING_LAYER"] = name  # numba reads it when imported
        return
    import numba
    from numba.np.ufunc import parallel

    if not parallel._is_initialized:
        numba.config.THREADING_LAYER = name
    elif numba.threading_layer() != name:
        warnings.warn(
            f"loader.threading {name}: numba already runs on its {numba.threading_layer()} layer in "
            "this process; the setting takes effect in a new process",
            stacklevel=2,
        )
