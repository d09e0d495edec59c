"""Sharded (FSDP2) models back on one device: after training, and from sharded checkpoints.

Training may shard a model over GPUs (``TrainerConfig(strategy="fsdp2")``: every parameter
becomes a ``DTensor`` holding 1/N of its rows on each rank), but everything after training
wants one plain module: evaluation, the MLflow pyfunc model, batch scoring on a CPU host,
a notebook. Two ways back:

* :func:`single_device_copy` right after ``trainer.fit``: gathers the weights of the
  in-memory sharded module into a fresh, unsharded instance of the same class. Every rank
  must call it (it is a collective); every rank gets the copy.
* :func:`load_module` from a checkpoint on disk: Lightning's ``ModelParallelStrategy`` saves
  a *directory* (one ``torch.distributed.checkpoint`` shard file per rank plus ``meta.pt``);
  this reads it in one process, no process group needed, as it reads a plain ``.ckpt`` file.
  :func:`consolidate_checkpoint` writes such a directory as one ``.ckpt`` file.

The module is rebuilt from its saved hyperparameters (``TaskModule`` saves them all), so the
copy is a plain module: FP8 layers (``Float8Linear`` keeps ``weight``/``bias`` names) come back
as ordinary ``nn.Linear`` and in-place compiled blocks as eager blocks, which is what scoring
wants.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# The file Lightning writes beside the shards (lightning.fabric.utilities.load._METADATA_FILENAME).
SHARDED_META_FILE = "meta.pt"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def launched_as_secondary_rank() -> bool:
    """True in a process a distributed launcher started as rank > 0.

    Lightning's subprocess launcher (``devices=2``) starts the other ranks by re-running the
    user's command with ``LOCAL_RANK``/``NODE_RANK`` set (torchrun sets ``RANK``), so the
    whole CLI runs once per rank. Such a process trains its share of every step and must
    not log, register or write results: rank 0 does that once.
    """
    return any(int(os.environ.get(var) or 0) > 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter is a ``DTensor`` (the module went through ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as full, unsharded CPU tensors, on every rank.

    Gathers one tensor at a time (``DTensor.full_tensor``), so the accelerator holds at most
    one full parameter beyond its shards; the CPU holds the whole model. Collective when
    sharded: every rank must call it, in the same order.
    """
    dtensor = _dtensor_type()
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        if dtensor is not None and isinstance(value, dtensor):
            value = value.full_tensor()
        out[name] = value.detach().to("cpu", copy=True)
    return out


def _rebuild(module_cls: type[M], hparams: Any, where: str) -> M:
    if not hparams:
        raise ValueError(
            f"{where}: no saved hyperparameters to rebuild {module_cls.__name__} from; "
            "a TaskModule saves them in its constructor (save_hyperparameters)"
        )
    return module_cls(**dict(hparams))


def single_device_copy(module: M) -> M:
    """An unsharded CPU copy of a sharded module, with the same weights and train/eval mode.

    Returns ``module`` itself when it is not sharded, so apps call it unconditionally after
    ``trainer.fit``. The copy is built as ``type(module)(**module.hparams)``; attributes a
    subclass sets outside its constructor are not carried over (apps set theirs after this).
    """
    if not is_sharded(module):
        return module
    state = full_state_dict(module)
    copy = _rebuild(type(module), getattr(module, "hparams", None), type(module).__name__)
    copy.load_state_dict(state)
    return copy.train(module.training)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as one dict: a ``.ckpt`` file, or the directory that
    ``ModelParallelStrategy`` writes (its shards are merged in this process).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path when it is neither.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / SHARDED_META_FILE).is_file():
            raise ValueError(
                f"{path} is a directory but not a Lightning sharded checkpoint: "
                f"expected {SHARDED_META_FILE} and .distcp shard files in it"
            )
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only


def load_module(path: str | os.PathLike, module_cls: type[M]) -> M:
    """Rebuild ``module_cls`` on the CPU, in eval mode, from a checkpoint file or a sharded
    checkpoint directory (see :func:`read_checkpoint`)."""
    ckpt = read_checkpoint(path)
    if "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'state_dict' entry")
    module = _rebuild(module_cls, ckpt.get("hyper_parameters"), str(path))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def consolidate_checkpoint(sharded_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a sharded checkpoint directory as one ``.ckpt`` file that ``torch.load`` and
    ``LightningModule.load_from_checkpoint`` read. Atomic: a temporary file is renamed into
    place, so ``out_file`` is either absent or complete."""
    out = Path(out_file)
    ckpt = read_checkpoint(sharded_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
