"""Influence of source classes (or examples) on target outputs, from random-subset inclusion masks.

    infl[c, j] = mean(Y[i, j] over models i with M[i, c] = 1) - mean(Y[i, j] over models with M[i, c] = 0)

With S = M^T Y, n_c = M^T 1 and column totals t = 1^T Y this is S/n_c - (t - S)/(N - n_c): one GEMM and
cheap corrections. Each chunk of outputs is centred on its own column means before the GEMM and its
sums moved exactly to a common shift (the first chunk's means); influence is invariant to the shift,
and without it the difference of two large, close means loses most of float32's precision. Chunk
partial sums are accumulated in float64.

Where the sums run is a backend (`InfluenceBackend`: numpy's BLAS, numba's table kernel, torch, cupy, or
any subclass), given to `InfluenceAccumulator` by name or as an instance. Imports numpy alone; numba,
torch and cupy are imported only when their backend is made.
"""

from __future__ import annotations

import abc
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

BACKENDS = ("numpy", "numba", "torch", "cupy")
DEFAULT_CHUNK = 8192
ESTIMATORS = ("difference", "least_squares")  # InfluenceAccumulator(estimator=...): see class_influence
DEFAULT_MAX_BYTES = 2 << 30  # the streamed kernels' working set (plan_blocks); --max-memory on the CLI
# GPU GEMMs accumulate in float32 over at most this many models, then in float64: larger blocks missed the
# 1e-6 relative-error target at 50,000 models (docs/benchmarks.md#influence-kernel)
GPU_ROW_BLOCK = 2048


class InfluenceError(ValueError):
    """Inputs that cannot give influences: shapes, dtypes, non-finite outputs."""


def available_backends() -> list[str]:
    found = ["numpy"]
    if _has_numba():
        found.append("numba")
    if _has_torch():
        found.append("torch")
    if _cuda_cupy():
        found.append("cupy")
    return found


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_cupy() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no cupy, no driver or no device all mean "not available"
        return False


def _cuda_torch() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def resolve_backend(backend: str) -> str:
    """`auto`: a GPU when there is one (cupy, then torch), else numpy's BLAS: on 2 CPU cores numba's table
    kernel is within 15% of it either way, ahead on class masks and behind on bit-packed example masks
    (benchmarks/bench_influence.py, docs/benchmarks.md#influence-kernel)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise InfluenceError(f"backend {backend!r} is not one of auto, {', '.join(BACKENDS)}")
        if backend != "numpy" and not {"numba": _has_numba, "torch": _has_torch, "cupy": _cuda_cupy}[backend]():
            available = ", ".join(available_backends())
            raise InfluenceError(f"backend {backend}: not available here (available: {available})")
        return backend
    if not _gpu_present():  # without importing cupy or torch: torch's import alone holds hundreds of MB
        return "numpy"
    if _cuda_cupy():
        return "cupy"
    if _cuda_torch():
        return "torch"
    return "numpy"


def _gpu_present() -> bool:
    """Whether a GPU that cupy or torch could use may be here: a loaded NVIDIA driver or AMD's compute
    device node, and CUDA_VISIBLE_DEVICES not hiding every device; or torch already imported (then asking it
    costs nothing)."""
    if "torch" in sys.modules:
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (
        (nvidia.is_dir() and any(nvidia.iterdir()))
        or any(Path("/dev").glob("nvidia[0-9]*"))
        or Path("/dev/kfd").exists()
    )


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- backends: where the sums run


class ChunkSums(NamedTuple):
    """One chunk's sums, relative to `mean` (the column means subtracted before summing)."""

    mean: Any
    sums: Any  # M^T (Y - mean), (C, T)
    column_sums: Any  # 1^T (Y - mean), (T,)
    square_sums: Any = None  # M^T (Y - mean)^2, when asked for
    square_column_sums: Any = None


class InfluenceBackend(abc.ABC):
    """Where the accumulator's arithmetic runs and in which memory its arrays live.

    A backend supplies the seven abstract methods; `InfluenceAccumulator` takes any instance. Masks reach
    the backend through `put_masks` (0/1 rows as bool) or `put_packed_masks` (rows bit-packed along the
    columns, as the example-level stores keep them) and come back only to `masked_sums` and
    `mask_counts`, so a backend chooses its own mask format; the defaults keep them as bool arrays."""

    name: str = "custom"

    @abc.abstractmethod
    def put(self, array: np.ndarray) -> Any:
        """A host array in the backend's memory."""

    @abc.abstractmethod
    def host(self, array: Any) -> np.ndarray:
        """A backend array as a numpy array."""

    @abc.abstractmethod
    def zeros(self, shape: tuple[int, ...]) -> Any:
        """float64 zeros in the backend's memory."""

    @abc.abstractmethod
    def center(self, outputs: Any) -> tuple[Any, Any]:
        """(outputs minus their column means, those means as subtracted, in float64)."""

    @abc.abstractmethod
    def colsum(self, array: Any) -> Any:
        """Column sums in float64."""

    @abc.abstractmethod
    def finite(self, array: Any) -> bool:
        """Whether every value is finite."""

    @abc.abstractmethod
    def masked_sums(self, masks: Any, values: Any) -> Any:
        """M^T values (C, T) in float64, for masks as made by `put_masks` or `put_packed_masks`."""

    def put_masks(self, masks: np.ndarray) -> Any:
        """(n, C) bool host masks in the backend's mask format."""
        return self.put(masks)

    def put_packed_masks(self, packed: np.ndarray, count: int) -> Any:
        """(n, ceil(count / 8)) uint8 host rows, bit-packed along the columns (np.packbits(masks, axis=1)),
        in the backend's mask format: the masks of `count` columns."""
        return self.put_masks(np.unpackbits(packed, axis=1, count=count).view(np.bool_))

    def mask_counts(self, masks: Any) -> Any:
        """(C,) float64: the models that include each column of the masks."""
        return self.colsum(masks)

    def centered_sums(self, masks: Any, outputs: Any, squares: bool) -> ChunkSums | None:
        """The chunk's sums, or None if it holds a non-finite output (which makes a column mean non-finite)."""
        centered, mean = self.center(outputs)
        if not self.finite(mean):
            return None
        sums = ChunkSums(mean, self.masked_sums(masks, centered), self.colsum(centered))
        if squares:
            centered *= centered
            sums = sums._replace(
                square_sums=self.masked_sums(masks, centered), square_column_sums=self.colsum(centered)
            )
        return sums


class NumpyBackend(InfluenceBackend):
    """Host arrays; S += M^T Y by BLAS dgemm. float64 because sgemm's float32 accumulation alone
    misses the 1e-6 accuracy target (docs/benchmarks.md#influence-kernel)."""

    name = "numpy"

    def put(self, array: np.ndarray) -> Any:
        return array

    def host(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, np.float64)

    def center(self, outputs: Any) -> tuple[Any, Any]:
        """Row blocks in threads: numpy releases the GIL in these loops, and the conversion from float16 is
        slow."""
        values = np.empty(outputs.shape, np.float64)
        blocks = [slice(start, start + HOST_BLOCK) for start in range(0, len(outputs), HOST_BLOCK)]

        def convert(rows: slice) -> np.ndarray:
            np.copyto(values[rows], outputs[rows])
            return values[rows].sum(axis=0)

        def subtract(rows: slice) -> None:
            with np.errstate(invalid="ignore"):  # inf - inf: reported as a non-finite mean instead
                values[rows] -= mean

        pool = _host_pool()
        mean = sum(pool.map(convert, blocks)) / len(outputs)
        list(pool.map(subtract, blocks))
        return values, mean

    def colsum(self, array: Any) -> Any:
        return array.sum(axis=0, dtype=np.float64)

    def finite(self, array: Any) -> bool:
        return bool(np.isfinite(array).all())

    def masked_sums(self, masks: Any, values: Any) -> Any:
        return masks.T.astype(np.float64) @ values


HOST_BLOCK = 1024  # rows per thread task in host-side elementwise work
_POOL = None


def _host_pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="influence")
    return _POOL


# The table kernel's tiles: TABLE_COLUMNS outputs (a compile-time constant, so that the inner loops unroll
# into whole vector registers; values are padded to a multiple of it) by TABLE_CLASSES classes (the
# accumulator tile, 1 MB in float64, sized to a core's L2)
TABLE_COLUMNS = 32
TABLE_CLASSES = 4096
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], np.float64)


class NumbaBackend(NumpyBackend):
    """Host arrays; M^T Y by a parallel numba kernel that never multiplies by a mask: masks are kept packed
    along the models (one byte holds eight models' bits for one class), and for each group of eight models
    a table of the 256 subset sums of their eight output rows turns eight masked row additions into one
    table lookup per class (the "four Russians" method; two groups share each pass over the accumulator).
    Bit-packed example masks are regrouped straight from their bytes, never unpacked to a dense array.
    Sums are float64 throughout, like numpy's dgemm. On 2 CPU cores it is within 15% of BLAS, ahead on
    class masks and behind on packed example masks (docs/benchmarks.md#influence-kernel)."""

    name = "numba"

    def __init__(self) -> None:
        self.kernels = _numba_kernels()

    def put_masks(self, masks: np.ndarray) -> Any:
        return np.packbits(masks, axis=0, bitorder="little")

    def put_packed_masks(self, packed: np.ndarray, count: int) -> Any:
        codes = np.empty(((len(packed) + 7) // 8, count), np.uint8)
        self.kernels.regroup(np.ascontiguousarray(packed), codes)
        return codes

    def mask_counts(self, masks: Any) -> Any:
        return _POPCOUNT[masks].sum(axis=0)

    def masked_sums(self, masks: Any, values: Any) -> Any:
        rows, width = values.shape
        padded = -(-width // TABLE_COLUMNS) * TABLE_COLUMNS
        if padded != width or not values.flags.c_contiguous:
            values = np.pad(values, ((0, 0), (0, padded - width)))
        out = np.zeros((masks.shape[1], padded), np.float64)
        self.kernels.table_sums(masks, values, rows, out)
        return out[:, :width]


_KERNELS = None


class _NumbaKernels(NamedTuple):
    regroup: Any
    table_sums: Any


def _numba_kernels() -> _NumbaKernels:
    global _KERNELS
    if _KERNELS is None:
        import numba

        columns, classes_per_tile = TABLE_COLUMNS, TABLE_CLASSES

        @numba.njit(parallel=True, cache=True)
        def regroup(packed, codes):  # pragma: no cover - compiled
            """codes[g, e] = bits of example e in models 8g..8g+7 (model 8g + k at bit k), from rows packed
            along the examples (example e at bit 7 - e % 8 of byte e // 8)."""
            models = packed.shape[0]
            groups, count = codes.shape
            for g in numba.prange(groups):
                first = 8 * g
                size = min(8, models - first)
                for e in range(count):
                    byte, shift = e >> 3, 7 - (e & 7)
                    code = 0
                    for k in range(size):
                        code |= ((packed[first + k, byte] >> shift) & 1) << k
                    codes[g, e] = code

        @numba.njit(parallel=True, cache=True)
        def table_sums(codes, values, models, out):  # pragma: no cover - compiled
            """out[c, j] += sum of values[i, j] over the models i whose bit is set in codes (as `regroup`)."""
            groups, classes = codes.shape
            column_tiles = values.shape[1] // columns
            class_tiles = (classes + classes_per_tile - 1) // classes_per_tile
            for tile in numba.prange(column_tiles * class_tiles):
                j0 = (tile % column_tiles) * columns
                c0 = (tile // column_tiles) * classes_per_tile
                c1 = min(c0 + classes_per_tile, classes)
                tables = np.empty((2, 256, columns))
                acc = np.zeros((c1 - c0, columns))
                for g0 in range(0, groups, 2):
                    for half in range(2):  # each table: the 256 subset sums of a group's rows
                        for j in range(columns):
                            tables[half, 0, j] = 0.0
                        first = 8 * (g0 + half)
                        for k in range(max(0, min(8, models - first))):
                            low = 1 << k
                            for b in range(low, 2 * low):
                                for j in range(columns):
                                    tables[half, b, j] = tables[half, b - low, j] + values[first + k, j0 + j]
                    second = g0 + 1 < groups
                    for c in range(c1 - c0):
                        a = codes[g0, c0 + c]
                        b = codes[g0 + 1, c0 + c] if second else 0
                        for j in range(columns):
                            acc[c, j] += tables[0, a, j] + tables[1, b, j]
                for c in range(c1 - c0):
                    for j in range(columns):
                        out[c0 + c, j0 + j] += acc[c, j]

        _KERNELS = _NumbaKernels(regroup, table_sums)
    return _KERNELS


class TorchBackend(InfluenceBackend):
    """torch tensors on CUDA when available, else CPU (float64 GEMM, as numpy). On CUDA the float32 values are split
    into two float16 halves (hi + lo, ~22 bits) multiplied on tensor cores with float32 accumulation and
    output: masks are exact in float16, so this keeps float32 accuracy at tensor-core speed."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def put(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def host(self, array: Any) -> np.ndarray:
        return array.cpu().numpy()

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, dtype=self.torch.float64, device=self.device)

    def center(self, outputs: Any) -> tuple[Any, Any]:
        values = outputs.double() if self.device.type == "cpu" else outputs.float()
        mean = (values.sum(dim=0, dtype=self.torch.float64) / len(values)).to(values.dtype)
        return values - mean, mean.double()

    def colsum(self, array: Any) -> Any:
        return array.sum(dim=0, dtype=self.torch.float64)

    def finite(self, array: Any) -> bool:
        return bool(self.torch.isfinite(array).all())

    def masked_sums(self, masks: Any, values: Any) -> Any:
        torch = self.torch
        if self.device.type == "cpu":
            return masks.T.double() @ values
        left = masks.T.half()
        # values ~= (hi + lo) / scale: a per-column power of two puts the largest magnitude near 2^10,
        # so that lo keeps its precision (fp16 max is 65504)
        scale = torch.exp2(10 - torch.floor(torch.log2(values.abs().amax(0).clamp_min(1e-30))))
        scaled = values * scale
        hi = scaled.half()
        lo = (scaled - hi.float()).half()
        out = torch.zeros(left.shape[0], values.shape[1], dtype=torch.float64, device=values.device)
        for start in range(0, len(values), GPU_ROW_BLOCK):
            rows = slice(start, start + GPU_ROW_BLOCK)
            out += torch.mm(left[:, rows], hi[rows], out_dtype=torch.float32) + torch.mm(
                left[:, rows], lo[rows], out_dtype=torch.float32
            )
        return out / scale.double()


class CupyBackend(InfluenceBackend):
    """cupy arrays, accumulators kept on the GPU. Outputs are centred and split into float16 halves
    hi + lo (~22 bits) by one fused kernel; the class masks get an extra all-ones column so that a
    single GEMM per row block (cublasSgemmEx: float16 in, float32 accumulation and output) yields the
    class sums and the column sums together, from the same rounded values."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self.cp = cupy
        self.split = cupy.ElementwiseKernel(
            "T y, float32 mean, float32 scale",
            "float16 hi, float16 lo",
            "float v = ((float)y - mean) * scale; hi = (float16)v; lo = (float16)(v - (float)hi);",
            "ffcv_transfer_split_hi_lo",
        )

    def put(self, array: np.ndarray) -> Any:
        return self.cp.asarray(array)

    def host(self, array: Any) -> np.ndarray:
        return self.cp.asnumpy(array)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.cp.zeros(shape, self.cp.float64)

    def colsum(self, array: Any) -> Any:
        return array.sum(axis=0, dtype=self.cp.float64)

    def finite(self, array: Any) -> bool:
        return bool(self.cp.isfinite(array).all())

    def center(self, outputs: Any) -> tuple[Any, Any]:
        values = outputs.astype(self.cp.float32)
        mean = (values.sum(axis=0, dtype=self.cp.float64) / len(values)).astype(self.cp.float32)
        return values - mean, mean.astype(self.cp.float64)

    def _scale(self, peak: Any) -> Any:
        """Per-column power of two putting the largest magnitude near 2^10, so that lo keeps its
        precision (float16 max is 65504)."""
        cp = self.cp
        return cp.exp2(10 - cp.floor(cp.log2(cp.maximum(peak, 1e-30)))).astype(cp.float32)

    def _hilo_gemm(self, masks: Any, values: Any, mean: Any, scale: Any, with_ones: bool) -> Any:
        """[masks | 1]^T ((values - mean) * scale) / scale in float64, float32-accumulated per row block."""
        cp = self.cp
        n, classes = masks.shape
        width = classes + 1 if with_ones else classes
        left = cp.zeros((n, -(-width // 8) * 8), cp.float16)  # padded: tensor cores like multiples of 8
        left[:, :classes] = masks
        if with_ones:
            left[:, classes] = 1
        hi, lo = self.split(values, mean, scale)
        out = cp.zeros((left.shape[1], values.shape[1]), cp.float64)
        block = cp.empty(out.shape, cp.float32)
        for start in range(0, n, GPU_ROW_BLOCK):
            rows = slice(start, start + GPU_ROW_BLOCK)
            _sgemm_ex_at_b(left[rows], hi[rows], block, accumulate=False)
            _sgemm_ex_at_b(left[rows], lo[rows], block, accumulate=True)
            out += block
        return out[:width] / scale.astype(cp.float64)

    def masked_sums(self, masks: Any, values: Any) -> Any:
        cp = self.cp
        zero = cp.zeros(values.shape[1], cp.float32)
        return self._hilo_gemm(masks, values, zero, self._scale(cp.abs(values).max(0)), with_ones=False)

    def centered_sums(self, masks: Any, outputs: Any, squares: bool) -> ChunkSums | None:
        if squares:
            return super().centered_sums(masks, outputs, squares)
        cp = self.cp
        mean = (outputs.sum(axis=0, dtype=cp.float64) / len(outputs)).astype(cp.float32)
        if not self.finite(mean):
            return None
        peak = cp.maximum(outputs.max(0).astype(cp.float32) - mean, mean - outputs.min(0).astype(cp.float32))
        both = self._hilo_gemm(masks, outputs, mean, self._scale(peak), with_ones=True)
        return ChunkSums(mean.astype(cp.float64), both[:-1], both[-1])


def _sgemm_ex_at_b(a: Any, b: Any, out: Any, accumulate: bool) -> None:
    """out (float32, (C', T)) (+)= A^T B for row-major float16 A (n, C') and B (n, T), float32-accumulated."""
    from cupy.cuda import device
    from cupy_backends.cuda.libs import cublas

    n, classes = a.shape
    width = b.shape[1]
    alpha, beta = np.ones(1, np.float32), np.full(1, float(accumulate), np.float32)
    cuda_r_16f, cuda_r_32f = 2, 0
    # column-major view: out^T (T x C') = B_cm (T x n) @ A_cm^T (n x C')
    cublas.sgemmEx(
        device.get_cublas_handle(),
        cublas.CUBLAS_OP_N,
        cublas.CUBLAS_OP_T,
        width,
        classes,
        n,
        alpha.ctypes.data,
        b.data.ptr,
        cuda_r_16f,
        width,
        a.data.ptr,
        cuda_r_16f,
        classes,
        beta.ctypes.data,
        out.data.ptr,
        cuda_r_32f,
        width,
    )  # alpha, beta: host pointers


BACKEND_TYPES: dict[str, type[InfluenceBackend]] = {
    "numpy": NumpyBackend,
    "numba": NumbaBackend,
    "torch": TorchBackend,
    "cupy": CupyBackend,
}


def make_backend(backend: str | InfluenceBackend = "auto") -> InfluenceBackend:
    """A backend instance: `backend` itself when it is one, else the named one (`resolve_backend`)."""
    if isinstance(backend, InfluenceBackend):
        return backend
    return BACKEND_TYPES[resolve_backend(backend)]()


# ---------------------------------------------------------------- the accumulator


class InfluenceAccumulator:
    """Streaming class influence: `update(mask_chunk, output_chunk)` (or `update_packed`) any number of
    times, then `result()`. `backend`: a name (`resolve_backend`) or any `InfluenceBackend`.

    Memory is O(C x T) plus one chunk; on GPU backends the accumulators stay on the device.
    """

    def __init__(
        self,
        num_classes: int,
        num_outputs: int,
        *,
        backend: str | InfluenceBackend = "auto",
        stderr: bool = False,
        estimator: str = "difference",
    ):
        if estimator not in ESTIMATORS:
            raise InfluenceError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
        self.num_classes, self.num_outputs, self.stderr = num_classes, num_outputs, stderr
        self.backend = make_backend(backend)
        # least squares: the masks' Gram matrix (C, C), float64 on the host; the rest it needs is shared
        self.gram = np.zeros((num_classes, num_classes)) if estimator == "least_squares" else None
        self.models = 0
        self.seen = 0  # rows passed to update(), including rejected ones
        self.bad_rows: list[int] = []
        self.moves: list[tuple[np.ndarray, np.ndarray]] = []
        self.square_moves: list[tuple[np.ndarray, np.ndarray]] = []
        self.shift: Any = None
        self.counts = self.backend.zeros((num_classes,))
        self.sums: Any = None  # the first chunk's sums are adopted, later ones added
        self.totals = self.backend.zeros((num_outputs,))
        if stderr:
            self.square_sums: Any = None
            self.square_totals = self.backend.zeros((num_outputs,))

    def update(self, masks: np.ndarray, outputs: np.ndarray, rows: Iterable[int] | None = None) -> None:
        """Add models: masks (n, C) 0/1, outputs (n, T) float; `rows` names them in error messages."""
        masks, outputs = _check_chunk(masks, outputs, self.num_classes, self.num_outputs)
        self._add(self.backend.put_masks(masks), outputs, rows, masks)

    def update_packed(self, packed: np.ndarray, outputs: np.ndarray, rows: Iterable[int] | None = None) -> None:
        """`update` with the masks bit-packed along the classes: packed (n, ceil(C / 8)) uint8 as made by
        np.packbits(masks, axis=1); the backend reads the bits in its own way (`put_packed_masks`)."""
        packed = np.asarray(packed)
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != (self.num_classes + 7) // 8:
            raise InfluenceError(
                f"{self.num_classes} classes need packed masks (n, {(self.num_classes + 7) // 8}) uint8, "
                f"got {packed.dtype} {packed.shape}"
            )
        outputs = _check_outputs(outputs, len(packed), self.num_outputs)
        host = np.unpackbits(packed, axis=1, count=self.num_classes) if self.gram is not None else None
        self._add(self.backend.put_packed_masks(packed, self.num_classes), outputs, rows, host)

    def _add(self, masks: Any, outputs: np.ndarray, rows: Iterable[int] | None, host_masks: Any = None) -> None:
        """Accumulate a checked chunk (its masks in the backend's format; `host_masks` as given, for least
        squares' Gram matrix), or record its non-finite rows."""
        n = len(outputs)
        if n and self._accumulate(masks, self.backend.put(outputs)):
            if self.gram is not None:
                included = np.asarray(host_masks, np.float64)
                self.gram += included.T @ included
        elif n:
            # reported by result(), so that one pass names every bad row
            bad = _non_finite_rows(outputs)
            names = np.asarray(list(rows) if rows is not None else range(self.seen, self.seen + n))
            if not bad.any():  # every output finite, yet the column sums are not: they overflow
                raise InfluenceError(
                    f"the outputs of model rows {names[0]}..{names[-1]} are finite but their sums "
                    f"overflow (largest magnitude {np.abs(outputs).max():.3g}): rescale them"
                )
            self.bad_rows.extend(names[bad].tolist())
        self.seen += n

    def update_device(self, masks: Any, outputs: Any) -> None:
        """`update` for arrays already in the backend's memory (e.g. on the GPU), without input checks:
        masks as made by the backend's `put_masks`, outputs by its `put`. The difference estimator only."""
        if self.gram is not None:
            raise InfluenceError("the least-squares estimator needs the masks on the host: use update()")
        if not self._accumulate(masks, outputs):
            raise InfluenceError("non-finite outputs in this chunk")
        self.seen += len(outputs)

    def _accumulate(self, masks: Any, outputs: Any) -> bool:
        """Add a chunk; False (and nothing added) if it holds a non-finite output."""
        ops, n = self.backend, len(outputs)
        # Sums are kept relative to the first chunk's column means (the shift); each chunk is centred on
        # its own means, which keeps float32 partial sums small, and moved to the shift exactly.
        chunk = ops.centered_sums(masks, outputs, self.stderr)
        if chunk is None:
            return False
        if self.shift is None:
            self.shift = chunk.mean
        delta = chunk.mean - self.shift
        counts = ops.mask_counts(masks)
        self.sums = chunk.sums if self.sums is None else _add(self.sums, chunk.sums)
        self.moves.append((ops.host(counts), ops.host(delta)))  # sums += outer(counts, delta), in result()
        self.totals += chunk.column_sums + n * delta
        if self.stderr:
            square_sums = chunk.square_sums + 2 * delta[None, :] * chunk.sums
            self.square_sums = square_sums if self.square_sums is None else _add(self.square_sums, square_sums)
            self.square_moves.append((ops.host(counts), ops.host(delta * delta)))
            self.square_totals += chunk.square_column_sums + 2 * delta * chunk.column_sums + n * delta * delta
        self.counts += counts
        self.models += n
        return True

    def _moved(self, sums: Any, moves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Host sums plus the per-chunk shift corrections sum_k outer(counts_k, delta_k), as one GEMM."""
        counts, deltas = (np.stack(part) for part in zip(*moves))
        moved = counts.T @ deltas
        moved += self.backend.host(sums)
        return moved

    def result(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Influences [C, T] float32 (and their standard errors when `stderr`); NaN for a class that
        every model or no model included, with one warning naming those classes."""
        if self.bad_rows:
            shown = ", ".join(map(str, self.bad_rows[:20])) + (" ..." if len(self.bad_rows) > 20 else "")
            raise InfluenceError(f"non-finite outputs in {len(self.bad_rows)} model row(s): {shown}")
        if self.models == 0:
            raise InfluenceError("no models: nothing to compute influence from")
        total = self.models
        counts = self.backend.host(self.counts)
        n_in = counts[:, None]
        n_out = total - n_in
        sums, totals = self._moved(self.sums, self.moves), self.backend.host(self.totals)[None, :]
        degenerate = (counts == 0) | (counts == total)
        if degenerate.any():
            classes = np.flatnonzero(degenerate)
            shown = ", ".join(map(str, classes[:20])) + (" ..." if len(classes) > 20 else "")
            warnings.warn(
                f"{len(classes)} class(es) included in every model or in none, influence is NaN: {shown}",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.gram is not None:
            return self._least_squares(sums, totals, counts, degenerate)
        with np.errstate(divide="ignore", invalid="ignore"):
            if not self.stderr:  # S/n_in - (t - S)/n_out = (S N/n_in - t)/n_out, in place: one (C, T) array
                sums *= total / n_in
                sums -= totals
                sums /= n_out
                sums[degenerate] = np.nan
                return sums.astype(np.float32)
            mean_in, mean_out = sums / n_in, (totals - sums) / n_out
            influence = np.where(degenerate[:, None], np.nan, mean_in - mean_out).astype(np.float32)
            squares = self._moved(self.square_sums, self.square_moves)
            square_totals = self.backend.host(self.square_totals)[None, :]
            var_in = (squares - sums * mean_in) / (n_in - 1)
            var_out = ((square_totals - squares) - (totals - sums) * mean_out) / (n_out - 1)
            stderr = np.sqrt(np.maximum(var_in, 0) / n_in + np.maximum(var_out, 0) / n_out)
            stderr = np.where((n_in < 2) | (n_out < 2), np.nan, stderr).astype(np.float32)
        return influence, stderr

    def _least_squares(
        self, sums: np.ndarray, totals: np.ndarray, counts: np.ndarray, degenerate: np.ndarray
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Each class's coefficient in the least-squares fit of every output on every class's inclusion
        with an intercept: solve(G~, X~'Y~) over the classes some but not all models include, G~ = M'M -
        n n'/N and X~'Y~ = S - n t'/N (both shift-invariant, so the shifted sums serve); standard errors
        sqrt(diag(G~^-1) RSS / (N - C - 1)), RSS = Y~'Y~ - sum_c beta_c (X~'Y~)_c per output."""
        total, used = self.models, np.flatnonzero(~degenerate)
        check_least_squares(total, len(used))
        gram = self.gram[np.ix_(used, used)] - np.outer(counts[used], counts[used]) / total
        cross = sums[used] - counts[used, None] * totals / total
        try:
            inverse = np.linalg.inv(gram)
        except np.linalg.LinAlgError:
            raise InfluenceError("least squares: the masks' columns are linearly dependent") from None
        coefficients = inverse @ cross
        influence = np.full((self.num_classes, self.num_outputs), np.nan, np.float32)
        influence[used] = coefficients
        if not self.stderr:
            return influence
        centred_squares = self.backend.host(self.square_totals) - totals[0] ** 2 / total
        residual = np.maximum(centred_squares - (coefficients * cross).sum(0), 0) / (total - len(used) - 1)
        stderr = np.full_like(influence, np.nan)
        stderr[used] = np.sqrt(np.diag(inverse)[:, None] * residual[None, :])
        return influence, stderr


def check_least_squares(models: int, classes: int) -> None:
    """Refuse a least-squares fit that cannot be made: it needs more models than classes + 1."""
    if models <= classes + 1:
        raise InfluenceError(
            f"the least-squares estimator needs more models than classes + 1; {models} models, {classes} classes"
        )


def _add(total: Any, part: Any) -> Any:
    total += part
    return total


def _non_finite_rows(outputs: np.ndarray) -> np.ndarray:
    if outputs.dtype == np.float16:  # an all-ones exponent; numpy's float16 isfinite is slow
        return ((outputs.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    return ~np.isfinite(outputs).all(axis=1)


def _check_chunk(masks: Any, outputs: Any, num_classes: int, num_outputs: int) -> tuple[np.ndarray, np.ndarray]:
    masks, outputs = np.asarray(masks), np.asarray(outputs)
    if masks.ndim != 2 or outputs.ndim != 2:
        raise InfluenceError(f"masks and outputs must be 2-D, got shapes {masks.shape} and {outputs.shape}")
    if masks.shape[0] != outputs.shape[0]:
        raise InfluenceError(f"{masks.shape[0]} mask rows but {outputs.shape[0]} output rows")
    if masks.shape[1] != num_classes or outputs.shape[1] != num_outputs:
        raise InfluenceError(
            f"expected masks (n, {num_classes}) and outputs (n, {num_outputs}), got {masks.shape} and {outputs.shape}"
        )
    outputs = _check_outputs(outputs, len(masks), num_outputs)
    if masks.dtype != np.bool_:
        if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
            raise InfluenceError(f"masks must be bool or 0/1 numbers, got {masks.dtype}")
        if not np.isin(masks, (0, 1)).all():
            raise InfluenceError("masks must hold only 0 and 1")
        masks = masks.astype(np.bool_)
    return masks, outputs


def _check_outputs(outputs: Any, num_models: int, num_outputs: int) -> np.ndarray:
    """(n, T) float16/32/64 outputs of `num_models` models; bool (e.g. is_correct: influence on the
    probability of being right) becomes float32."""
    outputs = np.asarray(outputs)
    if outputs.shape != (num_models, num_outputs):
        raise InfluenceError(f"expected outputs ({num_models}, {num_outputs}), got {outputs.shape}")
    if outputs.dtype == np.bool_:
        outputs = outputs.astype(np.float32)
    if outputs.dtype not in (np.float16, np.float32, np.float64):
        raise InfluenceError(f"outputs must be bool or float16/32/64, got {outputs.dtype}")
    return outputs


def plan_blocks(
    num_classes: int,
    num_outputs: int,
    num_models: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    stderr: bool = False,
    row_bytes: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[int, int]:
    """(models per chunk, outputs per column block) whose working set fits `max_bytes`.

    Per step the kernel holds a chunk's masks (bool, then a float64 copy for the GEMM) and its outputs as
    read (`row_bytes` a model: whole rows; twice, as the next chunk is read meanwhile) and centred in
    float64, plus `per_value` (C, block) float64
    arrays: the sums and a chunk's sums while accumulating; the sums, their shifted copy and the float32
    result when finishing (with `stderr`, the squares and the variance temporaries too). Measured peaks
    (tests/test_memory_bounds.py) stay within about 1.3 x `max_bytes`, allocator slack included. Wider
    column blocks mean fewer passes over the data, so the chunk shrinks before they do."""
    per_value = 10 if stderr else 3
    chunk = max(1, min(chunk, num_models))
    while True:
        fixed = chunk * (2 * row_bytes + 9 * num_classes)  # rows in work and the next chunk being read
        columns = (max_bytes - fixed) // (8 * (chunk + per_value * num_classes + 1))
        if columns >= min(num_outputs, 256) or (columns >= 1 and chunk == 1):
            return chunk, int(min(columns, num_outputs))
        if chunk == 1:
            need = fixed + 8 * (1 + per_value * num_classes + 1)
            raise InfluenceError(
                f"{max_bytes / 2**20:.1f} MiB cannot hold one column of {num_classes} classes "
                f"(needs {need / 2**20:.1f} MiB): raise the memory limit"
            )
        chunk = max(1, chunk // 2)


# Held once the kernel has run, outside its arrays: BLAS's per-thread buffers, the worker threads and their
# allocator arenas (about 12 MiB on 2 cores, tests/test_memory_bounds.py); more cores hold more
RUNTIME_RESERVE = 16 << 20


def resident_bytes() -> int:
    """This process's resident memory now (Linux's /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def working_budget(max_bytes: int, reserved: int = 0) -> int:
    """What is left of a budget `max_bytes` for the whole process's resident memory, for the kernel's
    working set (`plan_blocks`), once what the process already holds (Python, numpy, the libraries imported
    so far, open stores) is counted against it, with RUNTIME_RESERVE for what the computation's first steps
    add outside its arrays and `reserved` for the caller's own buffers."""
    held = resident_bytes() + RUNTIME_RESERVE + reserved
    if held >= max_bytes:
        raise InfluenceError(
            f"{max_bytes / 2**20:.1f} MiB: this process already holds or reserves {held / 2**20:.1f} MiB "
            "(Python and its libraries, BLAS and its threads, read buffers): raise the memory limit"
        )
    return max_bytes - held


def column_blocks(num_outputs: int, width: int) -> list[slice]:
    return [slice(start, min(start + width, num_outputs)) for start in range(0, num_outputs, width)]


def class_influence(
    masks: np.ndarray,
    outputs: np.ndarray,
    *,
    backend: str | InfluenceBackend = "auto",
    chunk: int = DEFAULT_CHUNK,
    stderr: bool = False,
    estimator: str = "difference",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Influence [C, T] (float32) of each of C source classes on each of T target outputs.

    masks: (N, C) 0/1 (bool or numbers), model i trained on class c iff masks[i, c];
    outputs: (N, T) float16/32/64, e.g. margins on the target test set. `estimator` (ESTIMATORS):
    "difference", the mean output of the models that include a class minus that of those that do not (the
    reference's); "least_squares", the class's inclusion coefficient in the least-squares fit of each output
    on every class's inclusion with an intercept (the same on an orthogonal design; on random masks it
    removes the other classes' chance overlap; needs more models than classes + 1). With `stderr`, also the
    standard errors: sqrt(var_in/n_in + var_out/n_out), or the fit's.
    """
    masks, outputs = np.asarray(masks), np.asarray(outputs)
    if masks.ndim != 2 or outputs.ndim != 2:
        raise InfluenceError(f"masks and outputs must be 2-D, got shapes {masks.shape} and {outputs.shape}")
    if chunk < 1:
        raise InfluenceError(f"chunk must be positive, got {chunk}")
    accumulator = InfluenceAccumulator(
        masks.shape[1], outputs.shape[1], backend=backend, stderr=stderr, estimator=estimator
    )
    for start in range(0, max(len(masks), 1), chunk):
        accumulator.update(masks[start : start + chunk], outputs[start : start + chunk])
    return accumulator.result()


EXAMPLE_BLOCK = 8192  # source examples per block of example influence (a multiple of 8: whole packed bytes)


def example_influence_blocks(
    packed_masks: np.ndarray,
    outputs: np.ndarray,
    num_examples: int,
    *,
    rows: np.ndarray | None = None,
    backend: str | InfluenceBackend = "auto",
    block: int = EXAMPLE_BLOCK,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Example influence [E, T] as (example slice, output slice, float32 block) pieces, so that a caller
    can keep what it needs (a top-k, a file) without the whole matrix: at the paper's 1.28M source and
    10,000 target examples that is 51 GB.

    packed_masks: (rows, ceil(E/8)) uint8 as made by np.packbits(masks, axis=1), e.g. a store's memmap;
    `rows` picks the models in it (default all), aligned with the (N, T) `outputs` (an array or memmap).
    Examples come `block` at a time; only one chunk of mask bytes is read at a time; the working set
    stays within `max_bytes`. With `backend` "numba" the bits are read straight from the bytes (numba's
    table kernel); the others unpack each chunk (`resolve_backend` says which "auto" picks)."""
    if packed_masks.dtype != np.uint8 or packed_masks.ndim != 2:
        raise InfluenceError(
            f"packed masks must be 2-D uint8 (np.packbits), got {packed_masks.dtype} {packed_masks.shape}"
        )
    if packed_masks.shape[1] != (num_examples + 7) // 8:
        raise InfluenceError(
            f"{num_examples} examples need {(num_examples + 7) // 8} packed bytes per row, got {packed_masks.shape[1]}"
        )
    rows = np.arange(len(packed_masks)) if rows is None else np.asarray(rows)
    if outputs.ndim != 2 or len(outputs) != len(rows):
        raise InfluenceError(f"{len(rows)} mask rows but outputs of shape {outputs.shape}")
    if block < 8 or block % 8:
        raise InfluenceError(f"block must be a positive multiple of 8, got {block}")
    block = min(block, -(-num_examples // 8) * 8)
    backend = make_backend(backend)
    chunk, width = plan_blocks(
        block,
        outputs.shape[1],
        len(rows),
        max_bytes=max_bytes,
        row_bytes=block // 8 + outputs.shape[1] * outputs.dtype.itemsize,
    )
    for start in range(0, num_examples, block):
        examples = slice(start, min(start + block, num_examples))
        for columns in column_blocks(outputs.shape[1], width):
            accumulator = InfluenceAccumulator(examples.stop - start, columns.stop - columns.start, backend=backend)
            for first in range(0, max(len(rows), 1), chunk):
                part = rows[first : first + chunk]
                packed = np.asarray(packed_masks[part, start // 8 : (examples.stop + 7) // 8])
                accumulator.update_packed(packed, np.asarray(outputs[first : first + chunk, columns]), rows=part)
            values = accumulator.result()
            del accumulator  # its sums go before the caller works on the block
            yield examples, columns, values


def example_influence(
    packed_masks: np.ndarray,
    outputs: np.ndarray,
    num_examples: int,
    *,
    backend: str | InfluenceBackend = "auto",
    block: int = EXAMPLE_BLOCK,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The whole example influence [E, T] (float32) from bit-packed example masks (N, ceil(E/8)); `out` may be
    an (E, T) float32 memmap when it does not fit in memory. `example_influence_blocks` streams it instead."""
    outputs = np.asarray(outputs)
    if out is None:
        out = np.empty((num_examples, outputs.shape[1]), np.float32)
    for examples, columns, values in example_influence_blocks(
        np.asarray(packed_masks), outputs, num_examples, backend=backend, block=block, max_bytes=max_bytes
    ):
        out[examples, columns] = values
    return out
