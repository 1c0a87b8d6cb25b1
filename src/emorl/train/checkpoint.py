"""Training checkpoints: safetensors for tensors, JSON for everything else — nothing is unpickled.

A checkpoint is one folder written to a temp sibling and renamed into place, so a run killed while saving keeps
its previous checkpoint intact. It holds every policy's trainable weights and optimizer state, the RNG states
(Python, NumPy, torch) and the trainer's JSON state (steps, data positions, curves, bandit state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from emorl.utils import EmorlError, atomic_folder, atomic_write_json, load_safetensors_checked, read_json_checked


def _opt_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}/{idx}/{key}"] = val.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}/{key}"] = val
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def _opt_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                      prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith(prefix + "/"):
            continue
        _, idx, key = name.rsplit("/", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _numpy_state_to_json(st: tuple) -> list[Any]:
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def save_checkpoint(folder: Path, *, params: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any]) -> None:
    """``params``: policy -> {param name: tensor}; ``optimizers``: policy -> optimizer; ``state``: JSON-able."""
    import random

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        weights = {f"{p}/{n}": t.detach().to("cpu").contiguous() for p, d in params.items() for n, t in d.items()}
        save_file(weights, str(tmp / "weights.safetensors"))
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_meta = {}
        for p, opt in optimizers.items():
            t, m = _opt_to_tensors(opt, p)
            opt_tensors.update(t)
            opt_meta[p] = m
        save_file(opt_tensors or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        full_state = {
            "trainer": state,
            "optimizers": opt_meta,
            "rng": {"python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
                    "numpy": _numpy_state_to_json(np.random.get_state())},
        }
        atomic_write_json(tmp / "state.json", full_state)


def load_checkpoint(folder: Path, *, params: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore weights (in place), optimizer and RNG states; return the trainer's JSON state."""
    import random

    folder = Path(folder)
    fix = (f"delete {folder} to restart training from scratch (or run without --resume), or restore the "
           f"checkpoint from a backup")
    full = read_json_checked(folder / "state.json", "checkpoint file", fix)
    weights = load_safetensors_checked(folder / "weights.safetensors", "checkpoint file", fix)
    opt_tensors = load_safetensors_checked(folder / "optimizer.safetensors", "checkpoint file", fix)
    rng = load_safetensors_checked(folder / "rng.safetensors", "checkpoint file", fix)
    for p, d in params.items():
        for n, t in d.items():
            key = f"{p}/{n}"
            if key not in weights:
                raise EmorlError(f"checkpoint {folder} has no tensor {key!r}: it was written by a different setup "
                                 f"(objectives, LoRA targets); start a new run folder")
            with torch.no_grad():
                t.copy_(weights[key].to(t.device, t.dtype))
    for p, opt in optimizers.items():
        _opt_from_tensors(opt, opt_tensors, full["optimizers"][p], p)
    torch.set_rng_state(rng["torch"])
    py = full["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = full["rng"]["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    return full["trainer"]
