"""fp32 masters for low-precision weights (or local shards), and the active block's fp32 state.

The functions and `MasterBuffer` are the functional core of mixed precision: masters over one buffer per
block, written back into the weights, or held split as bf16 weight + 16 low bits between steps.
`BlockMasters` is the state a `BlockOptimizer` keeps for its active block on top of them: the masters, the
fp32 gradient buffer the backward accumulates into, and the hooks that put gradients there, with one
teardown (`drop`). A sharded parameter's master is a plain tensor over its local shard (see `shards`).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.hooks import RemovableHandle

from .rounding import SWITCH_STREAM, chunk_elements, rounding_key, store_stochastic_many
from .selection import GatheredMasters, selection_template
from .shards import Selection, flat_like, is_sharded, local_shard, selected, write_selected  # noqa: F401


def needs_master(param: torch.Tensor) -> bool:
    # A sharded tensor always gets a plain local master: the inner optimizer's state then stays per-rank plain
    # tensors, whatever the weights' dtype (for fp32 weights that costs 4 bytes per local active element).
    return param.dtype != torch.float32 or is_sharded(param)


def make_flat_masters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 masters of `params` (see `flat_like`)."""
    return flat_like(params, copy=True)


@torch.no_grad()
def grads_to_masters(params: list[torch.Tensor], masters: list[torch.Tensor], buffers: list[torch.Tensor],
                     selections: list[Selection | None] | None = None) -> None:
    """Move each low-precision grad that is still on its parameter up to its master (fp32) and free the
    low-precision one. A master whose gradient already arrived in fp32 (the post-accumulate-grad path) keeps
    it, adding what the parameter holds. `buffers[i]` is where master i's fp32 gradient lives (its part of
    the block's gradient buffer, see `flat_like`); `selections[i]` which entries master i mirrors."""
    selections = selections if selections is not None else [None] * len(params)
    for p, m, buf, sel in zip(params, masters, buffers, selections):
        if p.grad is None:
            continue
        g = selected(p.grad, sel)
        if m.grad is not None:
            m.grad.add_(g)
        else:
            m.grad = buf.copy_(g)
        p.grad = None


@torch.no_grad()
def masters_to_params(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """Write the updated masters back into the model's weights (or local shards); drop the master grads."""
    for p, m in zip(params, masters):
        local_shard(p).copy_(m)
        m.grad = None


# --- fp32 masters held as bf16 weights + 16 low bits ---------------------------------------------------
# Between two steps a bf16 weight already holds the top 16 bits of its fp32 master; only the low 16 bits need
# keeping (2 bytes instead of 4). The weight is the master rounded to nearest, ties toward zero in magnitude
# (torch's `.to(bfloat16)` breaks ties to even; the two differ only when the low half is exactly 0x8000, and
# both are then exactly half an ulp away). With that rule the signed residual master - weight lies in
# (-0x8000, 0x8000] (in units of the master's last bit): its negation fits one int16, and the master is
# weight << 16 minus it. Both directions work in passes of `chunk_elements` (cache-sized on the CPU), so each
# pass's few integer ops run on data in cache.


@torch.no_grad()
def split_master(master: torch.Tensor, weight: torch.Tensor, low: torch.Tensor,
                 buf: torch.Tensor | None = None) -> None:
    """Write the rounded master into `weight` (bf16) and its negated residual into `low` (int16), in place.
    `buf`: an int32 buffer of at least one pass (made here if not given)."""
    bits, hi, lo = master.reshape(-1).view(torch.int32), weight.reshape(-1).view(torch.int16), low.reshape(-1)
    step = chunk_elements(bits.device)
    if buf is None:
        buf = torch.empty(min(step, bits.numel()), dtype=torch.int32, device=bits.device)
    for start in range(0, bits.numel(), step):
        b = bits[start:start + step]
        t = buf[:b.numel()]
        # + 0x7FFF carries into the top half exactly when the low half is above 0x8000: round to nearest, ties
        # toward zero (the bit pattern is sign-magnitude, so this holds for negative values too).
        torch.add(b, 0x7FFF, out=t).bitwise_right_shift_(16)
        hi[start:start + step].copy_(t)  # int32 -> int16 keeps the low 16 bits: the bf16 pattern
        lo[start:start + step].copy_(t.bitwise_left_shift_(16).sub_(b))  # minus the residual, in [-0x8000, 0x7FFF]


@torch.no_grad()
def join_master(weight: torch.Tensor, low: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The fp32 master that `split_master` split into `weight` and `low`, written into `out`."""
    bits, hi, lo = out.reshape(-1).view(torch.int32), weight.reshape(-1).view(torch.int16), low.reshape(-1)
    step = chunk_elements(bits.device)
    for start in range(0, bits.numel(), step):
        b = bits[start:start + step]
        b.copy_(hi[start:start + step])  # sign-extends the bf16 pattern
        b.bitwise_left_shift_(16).sub_(lo[start:start + step])
    return out


class MasterBuffer:
    """The fp32 masters of some parameters (a block, or the always-active ones). `split()` (after a step) writes
    the rounded masters into bf16 weights, keeps only their low 16 bits and frees the fp32 masters; `join()`
    (before the next step) rebuilds the masters bit for bit. The master tensors stay the same objects (the
    inner optimizer's state is keyed by them); while split they hold no elements, so a stale reference reads
    as empty instead of as freed memory.

    The masters start as views of one buffer per device (made from the weights at a block's first step).
    Split and join go tensor by tensor, largest first, each low half and each rebuilt master an allocation of
    its own: a join frees every low half as soon as its master is rebuilt, so an fp32 copy of the whole block
    never coexists with the block's low halves (at 70B: 3.42 GB of masters next to 1.71 GB of low halves).
    The most a join holds above the rebuilt masters is the low halves not yet consumed, at most those of the
    one largest tensor (its own master has to be whole before its low half can go)."""

    def __init__(self, names: list[str], params: list[torch.Tensor]):
        self.names, self.params = list(names), list(params)
        self.masters = make_flat_masters(self.params)
        self._shapes = [m.shape for m in self.masters]
        self._largest_first = sorted(range(len(self.masters)), key=lambda i: -self.masters[i].numel())
        self.lows: list[torch.Tensor] | None = None

    @property
    def can_split(self) -> bool:
        return all(p.dtype == torch.bfloat16 for p in self.params)

    @property
    def is_split(self) -> bool:
        return self.lows is not None

    def nbytes(self) -> int:
        if self.lows is not None:
            return sum(t.numel() * t.element_size() for t in self.lows)
        return sum(m.numel() * m.element_size() for m in self.masters)

    @torch.no_grad()
    def split(self) -> None:
        if self.is_split:
            return
        lows: list[torch.Tensor | None] = [None] * len(self.masters)
        bufs: dict[torch.device, torch.Tensor] = {}  # one pass buffer per device, for every tensor
        for i in self._largest_first:
            m = self.masters[i]
            lows[i] = torch.empty(m.shape, dtype=torch.int16, device=m.device)
            if m.device not in bufs:  # the largest tensor first: its pass is the longest
                bufs[m.device] = torch.empty(min(chunk_elements(m.device), m.numel()), dtype=torch.int32,
                                             device=m.device)
            split_master(m, local_shard(self.params[i].detach()), lows[i], bufs[m.device])
            # A master with a storage of its own (after a join) is freed here; views of the first buffer free
            # it with the last of them.
            m.data = torch.empty(0, dtype=torch.float32, device=m.device)
        self.lows = lows

    @torch.no_grad()
    def store(self) -> None:
        """Write the masters, rounded, into the weights (the whole-master path, at a block's end)."""
        masters_to_params(self.params, self.masters)

    @torch.no_grad()
    def join(self) -> None:
        if not self.is_split:
            return
        lows = self.lows
        for i in self._largest_first:
            master = torch.empty(self._shapes[i], dtype=torch.float32, device=lows[i].device)
            join_master(local_shard(self.params[i].detach()), lows[i], master)
            self.masters[i].data = master
            lows[i] = None  # this tensor's low half goes before the next master is allocated
        self.lows = None

    @torch.no_grad()
    def value(self, i: int) -> torch.Tensor:
        """Master i as a tensor with its values (a rebuilt copy while split, without joining the buffer)."""
        if not self.is_split:
            return self.masters[i]
        return join_master(local_shard(self.params[i].detach()), self.lows[i],
                           torch.empty(self._shapes[i], dtype=torch.float32, device=self.lows[i].device))


class BlockMasters:
    """The fp32 state of a `BlockOptimizer`'s active block: the masters of its low-precision (or sharded, or
    mode ratio's selected) parameters, the one fp32 gradient buffer the backward accumulates into, and the
    post-accumulate-grad hooks that put gradients there. `drop(names)` is the one teardown, which every path
    uses. It reads from the optimizer (`opt`) what changes as training goes: the parameters, the names
    trained now, mode ratio's selections, and whether an engine drives the step (then no masters at all)."""

    def __init__(self, opt):
        self.opt = opt
        self.masters: dict[str, torch.Tensor] = {}  # name -> its fp32 master (a tensor of one of `buffers`)
        self.buffers: list[MasterBuffer | GatheredMasters] = []  # who owns the masters' memory (per block / side)
        self.grad_hooks: dict[str, RemovableHandle] = {}  # name -> the hook accumulating its grads in fp32
        self.fp32_grads: dict[str, torch.Tensor] | None = None  # name -> fp32 gradient view, one buffer
        self.buffered: set[str] = set()  # names whose fp32 gradient sits in the buffer, not yet on a master

    def needs_master(self, name: str) -> bool:
        # Mode ratio: the selected entries always get a plain fp32 copy (the inner optimizer's tensors).
        opt = self.opt
        return opt.driver is None and (name in opt._selections or needs_master(opt._params[name]))

    # --- masters ---------------------------------------------------------------------------------------

    def materialize(self) -> bool:
        """Make the masters the trained parameters lack (one buffer for the block, one for the always-active
        ones: theirs outlive the block's), then rebuild any held split. Returns whether any were made."""
        opt = self.opt
        missing = [n for n in opt._trainable if n not in self.masters and self.needs_master(n)]
        if missing:
            always = set(opt.partition.always_active)
            gathered = [n for n in missing if torch.is_tensor(opt._selections.get(n))]
            rest = [n for n in missing if n not in always and n not in set(gathered)]
            for group in ([n for n in missing if n in always], rest):
                if group:
                    # A slice selection (mode ratio, adjacent) is a view of the weights: held like a weight.
                    self._add(MasterBuffer(group, [selected(opt._params[n], opt._selections.get(n)) for n in group]))
            if gathered:
                self._add(GatheredMasters(gathered, [opt._params[n] for n in gathered],
                                          [opt._selections[n] for n in gathered]))
        self.join()
        return bool(missing)

    def _add(self, buf: MasterBuffer | GatheredMasters) -> None:
        self.buffers.append(buf)
        self.masters.update(zip(buf.names, buf.masters))

    def join(self) -> None:
        """Rebuild the masters held split (`split_masters`)."""
        for buf in self.buffers:
            buf.join()

    def value(self, name: str) -> torch.Tensor:
        """The fp32 master of `name` as a tensor with memory (a rebuilt copy while its buffer is split)."""
        for buf in self.buffers:
            if name in buf.names:
                return buf.value(buf.names.index(name))
        return self.masters[name]

    def store(self, block_ends: bool = False, final: bool = False, step: int | None = None) -> None:
        """Write the masters (rounded) into the weights. With `split_masters`, a bf16 buffer keeps only the
        masters' low 16 bits until the next step, except at the block's last step (`block_ends`): the
        block's masters are dropped right after it, so they are written with `switch_rounding` instead
        (nearest: torch's rounding). At the last step of training (`final`) every master is written that way
        under stochastic rounding (nearest keeps today's behaviour bit for bit). `step`: the steps done once
        this write lands (the key of the stochastic rounding)."""
        config, always = self.opt.config, set(self.opt.partition.always_active)
        stochastic = config.stochastic_switch
        for buf in self.buffers:
            lives_on = not (final and stochastic) and (not block_ends or buf.names[0] in always)
            if config.split_masters and buf.can_split and lives_on:
                buf.split()
            elif stochastic and not lives_on:
                self._store_stochastic(buf, step)
            else:
                buf.store()

    def _store_stochastic(self, buf: MasterBuffer | GatheredMasters, step: int) -> None:
        """Write `buf`'s masters into their weights for the last time, rounded stochastically; the noise is a
        pure function of (seed, step, parameter index, position in the whole tensor)."""
        opt = self.opt
        store_stochastic_many([(opt._params[name], master, opt._selections.get(name),
                                rounding_key(opt.config.schedule.seed, step, opt._index[name], SWITCH_STREAM))
                               for name, master in zip(buf.names, buf.masters)])
        for master in buf.masters:
            master.grad = None

    def nbytes(self) -> int:
        return sum(buf.nbytes() for buf in self.buffers)

    # --- gradients -------------------------------------------------------------------------------------

    def attach_grads(self) -> None:
        """Hang the fp32 gradients accumulated so far on their masters (what the step and clipping use)."""
        for name in self.buffered:
            master = self.masters[name]
            if master.grad is None:
                master.grad = self.fp32_grads[name]
        self.buffered.clear()

    def take_param_grads(self) -> None:
        """Gradients still on the parameters (bf16 accumulation, or what an engine reduced) join the fp32 ones."""
        opt = self.opt
        names = [n for n in opt._trainable if n in self.masters]
        params = [opt._params[n] for n in names]
        if any(p.grad is not None for p in params):
            grads_to_masters(params, [self.masters[n] for n in names], [self.grad_slot(n) for n in names],
                             [opt._selections.get(n) for n in names])

    def grads(self) -> dict[str, torch.Tensor]:
        """Name -> the fp32 gradient accumulated so far (in the buffer or on the master)."""
        out = {n: self.fp32_grads[n] for n in self.buffered} if self.fp32_grads is not None else {}
        out.update({n: m.grad for n, m in self.masters.items() if m.grad is not None})
        return out

    def grad_slot(self, name: str) -> torch.Tensor:
        """The fp32 gradient view of `name`'s master: all of them live in one buffer, made at the first
        gradient after a step and freed at the next step."""
        if self.fp32_grads is None:
            opt = self.opt
            names = [n for n in opt._trainable if self.needs_master(n)]
            templates = [selection_template(opt._params[n], opt._selections.get(n)) for n in names]
            self.fp32_grads = dict(zip(names, flat_like(templates)))
        return self.fp32_grads[name]

    def grad_nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.fp32_grads or {}).values())

    def drop_grads(self, split: bool = False) -> None:
        """Drop every fp32 gradient: the masters' and the buffer. `split`: and hold the masters split again
        where `split_masters` allows (a skipped step: the weights are rewritten with the bits they hold)."""
        for buf in self.buffers:
            for m in buf.masters:
                m.grad = None
            if split and self.opt.config.split_masters and buf.can_split:
                buf.split()
        self.drop_grad_buffer()

    def drop_grad_buffer(self) -> None:
        self.fp32_grads = None
        self.buffered.clear()

    def zero_grads(self, set_to_none: bool) -> None:
        for master in self.masters.values():
            if master.grad is not None:
                if set_to_none:
                    master.grad = None
                else:
                    master.grad.zero_()
        if set_to_none:
            self.drop_grad_buffer()
        elif self.fp32_grads is not None:
            for view in self.fp32_grads.values():
                view.zero_()

    # --- gradients straight into fp32, in the backward ---------------------------------------------------

    def hook_grads(self, names: list[str]) -> None:
        """Accumulate the gradients of `names` in fp32 (those with a master, unless an engine assigns them)."""
        for name in names:
            if name not in self.grad_hooks and self.accumulates_in_fp32(name):
                self.grad_hooks[name] = self.opt._params[name].register_post_accumulate_grad_hook(
                    functools.partial(self.accumulate_grad, name))

    def accumulates_in_fp32(self, name: str) -> bool:
        # Sharded parameters (FSDP2) get their reduced gradient assigned by the engine, not accumulated by
        # autograd; a driving engine (ZeRO-3) owns the gradients. Both keep their own path.
        opt = self.opt
        return opt.config.fp32_grad_accumulation and self.needs_master(name) and not is_sharded(opt._params[name])

    @torch.no_grad()
    def accumulate_grad(self, name: str, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: add the gradient autograd just left on `p` to its fp32 gradient."""
        if p.grad is None:
            return
        master = self.masters.get(name)
        acc = master.grad if master is not None and master.grad is not None else (
            self.fp32_grads[name] if name in self.buffered else None)
        keep = self.opt._engine_keeps_grads()
        if keep and acc is None:
            return  # nothing accumulated in fp32: the engine reduces the gradient as autograd made it
        sel = self.opt._selections.get(name)
        g = selected(p.grad, sel)  # mode ratio: only the selected entries go up to fp32
        if acc is None:
            acc = self.grad_slot(name).copy_(g)
            self.buffered.add(name)
        else:
            acc.add_(g)
        if keep:
            # The engine reduces p.grad in this backward (DDP's sync pass): hand it the whole sum, rounded once.
            write_selected(p.grad, sel, acc)
            self.buffered.discard(name)
            if master is not None:
                master.grad = None
        else:
            p.grad = None

    # --- the one teardown --------------------------------------------------------------------------------

    def drop(self, names: list[str]) -> None:
        """Forget the masters and fp32-gradient hooks of `names` (their buffers go with the last of their
        masters), and the block's fp32 gradient buffer."""
        for name in names:
            self.masters.pop(name, None)
            handle = self.grad_hooks.pop(name, None)
            if handle is not None:
                handle.remove()
        self.buffers = [b for b in self.buffers if all(n in self.masters for n in b.names)]
        self.drop_grad_buffer()
