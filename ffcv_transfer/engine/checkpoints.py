"""Source-model checkpoints: the weights of each trained source model (bf16), kept beside its store when
`run.checkpoints` is on, so that `ffcv-transfer transfer` can transfer them later in another mode; and
outside checkpoints (a folder of state dicts with their class masks) brought onto this package's model.

    STORE/checkpoints/ROW.pt    {"state_dict": bf16 tensors, "classes": (C,) bool, "row": ROW}

Outside state dicts may use torchvision's ResNet-18 names (conv1, bn1, layerI.J..., downsample, fc) or
this package's (stem, layers, shortcut, fc), bare or wrapped as the reference saves them
({"state_dict": ...} or {"model": ...}, keys perhaps prefixed "module." or "model.")."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ffcv_transfer.store.files import atomic_path
from ffcv_transfer.store.results import StoreError


def save_checkpoint(path: Path, model: nn.Module, classes: np.ndarray, row: int) -> None:
    """Write whole or not at all (`files.atomic_path`): a reader never sees half a checkpoint."""
    state = {
        name: value.detach().to("cpu", torch.bfloat16 if value.is_floating_point() else value.dtype)
        for name, value in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        torch.save({"state_dict": state, "classes": np.asarray(classes, bool), "row": row}, partial)


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """(state dict in this package's names, its class mask when the file holds one); errors name the file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - unpickling junk raises any kind of error; each means "not a checkpoint"
        raise StoreError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    classes = saved.get("classes") if isinstance(saved, dict) else None
    for wrapper in ("state_dict", "model"):
        if isinstance(saved, dict) and isinstance(saved.get(wrapper), dict):
            saved = saved[wrapper]
            break
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise StoreError(f"{path}: holds no state dict (tensors by parameter name)")
    return package_names(saved), None if classes is None else np.asarray(classes, bool)


def package_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict with torchvision's names (or this package's) in this package's names."""
    renamed = {}
    for name, value in state.items():
        name = re.sub(r"^(module\.|model\.)+", "", name)
        name = re.sub(r"^conv1\.", "stem.0.", name)
        name = re.sub(r"^bn1\.", "stem.1.", name)
        name = re.sub(r"^layer(\d)\.", lambda m: f"layers.{int(m.group(1)) - 1}.", name)
        name = name.replace(".downsample.", ".shortcut.")
        renamed[name] = value
    return renamed


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> nn.Module:
    """`state` (package names) into `model`, in the model's dtypes; a strided convolution wrapped by
    BlurPool takes the plain convolution's weight. Missing or unexpected names are an error naming `source`."""
    own = model.state_dict()
    placed = {}
    for name, value in state.items():
        target = name if name in own else re.sub(r"\.weight$", ".conv.weight", name)
        if target not in own:
            raise StoreError(
                f"{source}: parameter {name!r} has no place in the model (model: {', '.join(list(own)[:4])}, ...)"
            )
        if own[target].shape != value.shape:
            raise StoreError(
                f"{source}: {name} has shape {tuple(value.shape)}, the model's {tuple(own[target].shape)}:"
                " check model.width, model.stem and the number of source classes"
            )
        placed[target] = value.to(own[target].dtype)
    missing = [
        name
        for name in own
        if name not in placed and not name.endswith("num_batches_tracked") and not name.endswith(".blur")
    ]
    if missing:
        raise StoreError(f"{source}: no value for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(placed, strict=False)
    return model


def outside_checkpoints(folder: str | Path) -> tuple[list[Path], np.ndarray]:
    """(the folder's *.pt files in name order, their class masks from FOLDER/masks.npy, one row per file)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise StoreError(f"{folder}: no *.pt checkpoints")
    masks_file = folder / "masks.npy"
    if not masks_file.is_file():
        raise StoreError(
            f"{masks_file}: missing; it holds the (checkpoints, classes) bool masks, one row per "
            "*.pt file in name order"
        )
    masks = np.load(masks_file)
    if masks.ndim != 2 or len(masks) != len(files) or not np.isin(masks, (0, 1)).all():
        raise StoreError(f"{masks_file}: expected a ({len(files)}, classes) 0/1 array, got {masks.dtype} {masks.shape}")
    return files, masks.astype(bool)
