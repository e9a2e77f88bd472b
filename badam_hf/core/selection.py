"""Ratio mode's masks: which entries of each parameter train during a period, and their fp32 masters.

A selection is a pure function of (seed, period, parameter index, size), so every rank, a resumed run and
a test compute the same one without saving it. It is either a `slice` of the flattened tensor (`adjacent`:
a real view of the weights, which the ordinary `MasterBuffer` can hold and split) or an index tensor
(`scatter`: the entries are gathered into a plain fp32 master and scattered back after each step).
Entries outside the selection are never touched: no sparse tensor and no dense mask is ever made.
"""

from __future__ import annotations

import math

import torch

from .shards import Selection, flat_like, local_shard, selected, write_selected
from .schedule import period_seed

def selection_size(numel: int, ratio: float) -> int:
    """max(1, floor(ratio x numel)) entries (all of them at ratio 1; none of an empty local shard)."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(ratio * numel + 1e-9)))


def select_entries(numel: int, ratio: float, mask_mode: str, seed: int, period: int, index: int,
                   device: torch.device | str = "cpu") -> Selection:
    """The entries of a tensor of `numel` elements (parameter number `index`) trained in `period`.

    adjacent: the flattened tensor is cut into runs of k entries (the last one ending at the tensor's end);
    period t takes run (phase + t) mod runs, the phase drawn once per parameter, so consecutive periods sweep
    the whole tensor and two parameters of one shape move independently.
    scatter: one entry drawn uniformly from each of k equal runs: k distinct entries spread over the whole
    tensor, drawn afresh each period with k random numbers (not a permutation of the whole tensor)."""
    k = selection_size(numel, ratio)
    if k == numel:
        return slice(0, numel)
    if mask_mode == "adjacent":
        runs = math.ceil(numel / k)
        gen = torch.Generator().manual_seed(period_seed(seed, -1, index))
        phase = int(torch.randint(runs, (1,), generator=gen))
        start = min(((phase + period) % runs) * k, numel - k)
        return slice(start, start + k)
    gen = torch.Generator().manual_seed(period_seed(seed, period, index))
    bounds = torch.div(torch.arange(k + 1, dtype=torch.float64) * numel, k, rounding_mode="floor").long()
    widths = (bounds[1:] - bounds[:-1]).double()
    idx = bounds[:-1] + (torch.rand(k, generator=gen, dtype=torch.float64) * widths).long()
    return idx.to(device=device, dtype=torch.int32 if numel < 2**31 else torch.int64)


def local_range(param: torch.Tensor) -> tuple[int, int]:
    """(first flat index, element count) of this rank's shard of `param` within the whole flattened tensor;
    (0, numel) for a plain tensor. FSDP2 shards row-wise (dim 0), so the local shard is one flat range."""
    from .shards import is_sharded

    if not is_sharded(param):
        return 0, param.numel()
    local = param.to_local()
    if local.numel() == 0:
        return 0, 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    except (ImportError, AttributeError, TypeError):  # older torch: torch.chunk's row split, as fully_shard does
        rows = math.ceil(param.shape[0] / param.device_mesh.size())
        offset = (rows * param.device_mesh.get_local_rank(),)
    if any(o != 0 for o in offset[1:]) or any(type(pl).__name__ not in ("Shard", "Replicate") for pl in param.placements):
        raise NotImplementedError(f"mode ratio needs row-wise shards (Shard(0)); this parameter has {param.placements}.")
    return offset[0] * (param.numel() // param.shape[0]), local.numel()


def localize(sel: Selection, start: int, count: int, numel: int) -> Selection:
    """A selection over the whole flattened tensor, restricted to the shard [start, start + count) and
    expressed in the shard's own indices (the whole tensor when start=0 and count=numel)."""
    if start == 0 and count == numel:
        return sel
    if isinstance(sel, slice):
        a, b = max(sel.start, start), min(sel.stop, start + count)
        return slice(a - start, max(a, b) - start)
    keep = (sel >= start) & (sel < start + count)
    return (sel[keep] - start).to(sel.dtype)


def period_selections(params: dict[str, torch.Tensor], index: dict[str, int], update_ratio: float,
                      mask_mode: str, seed: int, period: int) -> dict[str, Selection]:
    """Name -> the entries of `params[name]` (parameter number `index[name]`) trained in `period`, cut to this
    rank's shard. Drawn over the whole tensor, then cut (FSDP2): the masks do not depend on the number of
    ranks, and a sharded run trains the entries one process would."""
    out = {}
    for name, param in params.items():
        p = param.detach()
        start, count = local_range(p)
        whole = select_entries(p.numel(), update_ratio, mask_mode, seed, period, index[name],
                               device=local_shard(p).device)
        out[name] = localize(whole, start, count, p.numel())
    return out


def selection_template(param: torch.Tensor, sel: Selection | None) -> torch.Tensor:
    """A tensor shaped like the selected entries of `param`, without memory of its own (for `flat_like`)."""
    t = local_shard(param.detach())
    if sel is None:
        return t
    if isinstance(sel, slice):
        return t.view(-1)[sel]
    return torch.empty((), dtype=t.dtype, device=t.device).expand(sel.numel())


class GatheredMasters:
    """fp32 masters of scattered selections (one buffer per device), with `MasterBuffer`'s interface: they
    cannot be split (the selected entries are no tensor of their own), `store()` scatters them back."""

    can_split = False
    is_split = False

    def __init__(self, names: list[str], params: list[torch.Tensor], selections: list[torch.Tensor]):
        self.names, self.params, self.selections = list(names), list(params), list(selections)
        self.masters = flat_like([selection_template(p, s) for p, s in zip(self.params, self.selections)])
        with torch.no_grad():
            for m, p, s in zip(self.masters, self.params, self.selections):
                m.copy_(selected(p.detach(), s))

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters)

    def split(self) -> None:  # pragma: no cover - never called: can_split is False
        raise RuntimeError("scattered masters cannot be split")

    def join(self) -> None:
        pass

    def value(self, i: int) -> torch.Tensor:
        return self.masters[i]

    @torch.no_grad()
    def store(self) -> None:
        for p, m, s in zip(self.params, self.masters, self.selections):
            write_selected(p.detach(), s, m)
            m.grad = None
