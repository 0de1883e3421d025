"""Dataset -> .beton writers; every beton gets a sidecar (NAME.meta.json, NAME.labels.npy).

ffcv is imported only when a beton is written or read, never at package import.
"""
from .threading_layer import use_threading_layer

use_threading_layer()  # before anything imports numba (threading_layer.py says why)

from .cifar import write_cifar  # noqa: E402
from .common import BetonError, ImageOptions, read_labels, read_sidecar, sidecar_paths, write_arrays  # noqa: E402
from .imagefolder import write_imagefolder  # noqa: E402
from .imagenet import write_imagenet  # noqa: E402
from .synthetic import PlantedSpec, write_synthetic  # noqa: E402
from .targets import write_target  # noqa: E402
from .verify import BetonRecords, verify_beton  # noqa: E402

__all__ = ["BetonError", "BetonRecords", "ImageOptions", "PlantedSpec", "read_labels", "read_sidecar",
           "sidecar_paths", "verify_beton", "write_arrays", "write_cifar", "write_imagefolder", "write_imagenet",
           "write_synthetic", "write_target"]
