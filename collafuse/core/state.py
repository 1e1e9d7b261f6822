"""Role state on disk: tensors in safetensors, everything else in a JSON file beside it."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors and JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {f"{idx}/{k}": v for idx, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:  # JSON turns tuples into lists; Adam wants its betas as a tuple
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


PACKED = "packed_tensors"  # the JSON key of a packed state: where each tensor lies in its dtype's flat tensor


def save_state(prefix: Path, tensors: dict[str, torch.Tensor], meta: dict, *, pack: bool = False) -> None:
    """Write prefix.safetensors and prefix.json atomically (temporary names, then rename).

    pack: one flat tensor per dtype, each tensor's place in the JSON. safetensors pays ~25 us per tensor to
    write; a client's state holds ~570 small ones, so a 100-client checkpoint packed takes 5 ms a client
    instead of 14 ms (measured). load_state reads either kind.
    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if pack:
        meta = {**meta, PACKED: _places(tensors)}
        tensors = _pack(tensors)
    tmp_t, tmp_j = prefix.with_suffix(".safetensors.tmp"), prefix.with_suffix(".json.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_t))
    tmp_j.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_t, prefix.with_suffix(".safetensors"))
    os.replace(tmp_j, prefix.with_suffix(".json"))


def load_state(prefix: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read what save_state wrote (packed or not)."""
    tensors = load_file(str(prefix.with_suffix(".safetensors")))
    meta = json.loads(prefix.with_suffix(".json").read_text())
    if PACKED in meta:
        places = meta.pop(PACKED)
        # clones, not views of the flat tensors: a later save must not find tensors that share memory
        tensors = {k: tensors[dtype][start:start + math.prod(shape)].view(shape).clone()
                   for k, (dtype, start, shape) in places.items()}
    return tensors, meta


def _pack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat: dict[str, list[torch.Tensor]] = {}
    for v in tensors.values():
        flat.setdefault(_dtype_name(v), []).append(v.detach().reshape(-1).cpu())
    return {dtype: torch.cat(parts) for dtype, parts in flat.items()}


def _places(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Each tensor's (dtype, start, shape) in _pack's flat tensors, in the same order."""
    places, ends = {}, {}
    for k, v in tensors.items():
        dtype = _dtype_name(v)
        start = ends.get(dtype, 0)
        places[k], ends[dtype] = [dtype, start, list(v.shape)], start + v.numel()
    return places


def _dtype_name(v: torch.Tensor) -> str:
    return str(v.dtype).removeprefix("torch.")


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def role_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> tuple[dict, dict]:
    """Model, optimizer and random stream of a role as (tensors, meta)."""
    opt_t, opt_meta = optimizer_tensors(opt)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"opt/{k}": v for k, v in opt_t.items()})
    tensors["generator"] = gen.get_state()
    return tensors, {"optimizer": opt_meta}


def load_role(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
              tensors: dict, meta: dict) -> None:
    model.load_state_dict(split_prefix(tensors, "model/"))
    load_optimizer(opt, split_prefix(tensors, "opt/"), meta["optimizer"])
    gen.set_state(tensors["generator"])


def swap_in(out: Path, name: str, write) -> None:
    """Write folder out/name through write(tmp_folder), then swap it in whole: a crash keeps the previous one."""
    tmp, final, old = (out / f"{name}{s}" for s in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable (a crash must not lose a file already relied on); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
