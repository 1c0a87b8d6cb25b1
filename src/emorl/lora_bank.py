"""LoRA bank: run several LoRA adapters of one peft model in ONE forward over the shared base.

peft's mixed-adapter batches (``adapter_names=[...]``) loop over the adapters in every LoRA layer, gathering
and scattering each adapter's rows; on a 2-core CPU that costs ~58 % on top of the plain batched base. The bank
instead lays the batch out in equal groups and computes, per LoRA layer,

    y = W0 x                       (one base matmul for all rows)
      + bmm(bmm(x_g, A_i^T), (s_i B_i)^T)   routed:  group i uses adapter i (a (K, n, .) view, no gather)
      + ((x A_cat^T) * c_row) (s B)_cat^T   weighted: row r uses sum_i w_ri s_i B_i A_i

The weighted form is exactly ``W0 + sum_i w_i s_i B_i A_i`` applied to x (the ΔW sum of peft's ``cat``
combination), without ever materialising merged weights — this is the ``params`` ensemble mode.

API::

    with lora_bank(peft_model, ["a", "b", "c"]):          # routed: rows [i*n:(i+1)*n] use adapter i
        peft_model.generate(input_ids=ids_adapter_major, attention_mask=mask, do_sample=True, ...)

    with lora_bank(peft_model, names, weights=w) as bank:   # w: (G, K); rows in G equal groups, group g
        out = peft_model(input_ids=ids_point_major, ...)     #    uses W0 + sum_i w[g, i] ΔW_i
        bank.set_weights(w2)                                 # change the mixing (and G) without re-entering
        bank.set_row_weights(c)                              # per row, rows in any order: c (rows, K); one-hot
                                                             #    rows routed, zero rows the base, others weighted

Per-row mode (``emorl serve``'s running batch) plans each forward once (:class:`RowPlan`): every LoRA layer then
gathers the one-hot rows into one equal group per adapter and the mixed rows into one more, runs one bmm pair and
one weighted pair, and adds the deltas back with one gather — a fixed number of ops per layer whatever the number
of adapters (bench/serve_step.py; bench/RESULTS.md "Per-row LoRA deltas").

Rules: the batch size of every forward inside the context must be a multiple of the number of groups (K for
routed, G for weighted), or a ValueError names both. Only LoRA on ``Linear``/``Conv1D`` layers is supported
(DoRA, LoRA on embeddings, ``lora_bias`` and merged adapters are refused). LoRA dropout is applied only to
routed rows of a model in training mode (the trainer's joint update), each group with its adapter's own rate.
Inside ``model.disable_adapter()`` the bank gives the base.
Works under ``torch.no_grad``/``inference_mode`` (in-place adds) and with autograd (out-of-place adds).
The stacked A/B copies are taken when the context is entered, so enter it again after an optimiser step.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from emorl.utils import EmorlError

__all__ = ["BASE_SLOT", "LoraBank", "RowPlan", "lora_bank", "lora_layers", "safe_rows"]

_ATTR = "_emorl_bank"
# A slot name that is no adapter: its rows (routed) or its weight (weighted) get no LoRA delta, i.e. the base model.
# Base-anchored mixing runs the base stream as one more row group of the same forward with it.
BASE_SLOT = "__base__"
# CPU matmul kernels for 1-2 rows (fp32 below 4) round differently from the kernel for more rows, so a lone
# request's decode step (one row per adapter) would differ from the same row in a batch. Matmuls of fewer rows are
# padded with zero rows to this many: every row then goes through the same kernel whatever its batch (exact: the
# padding rows are dropped; they cost nothing measurable at these sizes).
# A CPU-only workaround: GPU kernels are not chosen this way, and there the padding would only cost.
MIN_GEMM_ROWS = 4


def pad_rows(x: torch.Tensor, dim: int, rows: int = MIN_GEMM_ROWS) -> torch.Tensor:
    """``x`` with zero rows appended along ``dim`` up to ``rows`` (unchanged if it has as many already, or if it is
    not on the CPU: the padding is a CPU kernel workaround)."""
    extra = rows - x.shape[dim]
    if extra <= 0 or x.device.type != "cpu":
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def safe_rows(n: int) -> int:
    """A row count whose matmuls round every row as a lone one padded to :data:`MIN_GEMM_ROWS`: below 12 rows, a
    multiple of 4. Measured on this project's 2-core AMD EPYC (float32, torch 2.13): rows of a 5-7 or 9-11-row
    matmul round differently from the same row alone, while 4, 8 and >= 12 rows agree (per-row mode only)."""
    return max(MIN_GEMM_ROWS, n if n >= 12 or n % 4 == 0 else n + (-n) % 4)


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """The peft LoRA Linear layers of ``model`` (name, module); refuses LoRA kinds the bank cannot batch."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if not isinstance(mod, LoraLinear):
            if any(len(d) for d in (mod.lora_A, getattr(mod, "lora_embedding_A", {}))):
                raise EmorlError(f"LoRA layer {name} is a {type(mod).__name__}; the ensemble decoder batches LoRA on "
                                 "Linear layers only. Train adapters with target_modules limited to linear layers.")
            continue
        out.append((name, mod))
    return out


def _padded(groups: list[list[int]], device: torch.device) -> list[int]:
    """``groups`` of flat indices, each padded to the longest (to :func:`safe_rows` of it on the CPU) by repeating
    its last index (a matmul row does not depend on the other rows, only on their count), concatenated."""
    m = max(len(g) for g in groups)
    m = safe_rows(m) if device.type == "cpu" else m
    return [i for g in groups for i in g + [g[-1]] * (m - len(g))]


class RowPlan:
    """Per-row mode, for forwards of ``t`` positions per row: the flat (row, position) indices of the one-hot rows,
    gathered into one equal group per adapter ``hot[i]`` (``one``), and of the mixed rows (``mixed``); ``src``
    maps every flat position to its delta among [one's | mixed's | a zero row (the base)]. Made once per forward
    from the row weights and used by every LoRA layer: no layer plans, loops over adapters or scatters."""

    def __init__(self, weights: torch.Tensor, t: int, device: torch.device) -> None:
        groups: dict[int, list[int]] = {}
        mixed: list[int] = []
        for r, row in enumerate(weights.tolist()):
            nz = [i for i, v in enumerate(row) if v != 0]
            span = list(range(r * t, (r + 1) * t))
            if len(nz) == 1 and row[nz[0]] == 1:
                groups.setdefault(nz[0], []).extend(span)
            elif nz:
                mixed += span
        self.hot = tuple(sorted(groups))
        one = _padded([groups[i] for i in self.hot], device) if groups else []
        mix = _padded([mixed], device) if mixed else []
        src = [len(one) + len(mix)] * (weights.shape[0] * t)  # the zero row
        for start, take in ((0, one), (len(one), mix)):
            for j, i in enumerate(take):
                src[i] = min(src[i], start + j)  # a position's first occurrence (the repeats are padding)
        self.take = torch.tensor(one + mix, dtype=torch.long, device=device)  # both gathered at once
        self.one = self.take[:len(one)] if one else None
        self.mixed = self.take[len(one):] if mix else None
        self.src = torch.tensor(src, dtype=torch.long, device=device)
        self.n_deltas = len(one) + len(mix) + 1
        self._w = weights.to(device).index_select(0, self.mixed // t) if self.mixed is not None else None
        self._coef: dict[int, torch.Tensor] = {}
        self._bufs: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def mixed_coef(self, r_max: int, ref: torch.Tensor) -> torch.Tensor:
        """The mixed rows' coefficients, each repeated over an adapter's ``r_max`` rank columns."""
        c = self._coef.get(r_max)
        if c is None:
            assert self._w is not None
            c = self._coef[r_max] = self._w.to(device=ref.device, dtype=ref.dtype).repeat_interleave(r_max, dim=1)
        return c

    def buffer(self, width: int, ref: torch.Tensor) -> torch.Tensor:
        """(n_deltas, width) deltas of one layer, its last row zero: one per output width and forward, shared by
        the layers in turn (a layer's deltas are added to its output before the next layer runs; no autograd)."""
        key = (width, ref.dtype)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = ref.new_zeros(self.n_deltas, width)
        return buf


class LoraBank:
    """State of an active bank (returned by :func:`lora_bank`); see the module docstring."""

    def __init__(self, model: Any, names: Sequence[str], weights: torch.Tensor | None,
                 stacks: dict[Any, Any] | None = None) -> None:
        self.names = list(names)
        self.layers: list[Any] = []
        # id(layer) -> (A^T, sB^T, r_max), or None for a layer without any of the bank's adapters
        self._stacks: dict[int, tuple[torch.Tensor, torch.Tensor, int] | None] = {}
        self._coef: dict[int, torch.Tensor] = {}
        self._plans: dict[int, RowPlan] = {}  # per-row mode: tokens per row -> its plan
        self._hot_key: tuple[int, ...] | None = None
        self._hot: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(layer) -> A, sB of _hot_key's adapters
        self.weights: torch.Tensor | None = None
        self.row_weights: torch.Tensor | None = None  # per-row mode (set_row_weights): (n_rows, K)
        layers = lora_layers(model) if hasattr(model, "named_modules") else []
        if not layers and any(n != BASE_SLOT for n in self.names):
            raise EmorlError("lora_bank: the model has no LoRA layers (attach adapters first)")
        known = set().union(*(set(m.lora_A) for _, m in layers)) if layers else set()
        missing = [n for n in self.names if n not in known and n != BASE_SLOT]
        if missing:
            raise EmorlError(f"lora_bank: unknown adapter(s) {missing}; loaded adapters: {sorted(known)}")
        if len(set(self.names)) != len(self.names):
            raise EmorlError(f"lora_bank: adapter names must be distinct, got {self.names}")
        for lname, mod in layers:
            present = [n for n in self.names if n in mod.lora_A]
            if not present:  # none of the bank's adapters here (or only the base slot): the base layer alone, not
                self._stacks[id(mod)] = None  # peft's active adapter
                self.layers.append(mod)
                continue
            if getattr(mod, "merged", False):
                raise EmorlError(f"lora_bank: layer {lname} has merged adapters {mod.merged_adapters}; call "
                                 "model.unmerge_adapter() first")
            for n in present:
                if n in getattr(mod, "lora_variant", {}) or (getattr(mod, "use_dora", {}) or {}).get(n, False):
                    raise EmorlError(f"lora_bank: adapter {n!r} uses a LoRA variant (DoRA/aLoRA) at {lname}; only "
                                     "plain LoRA can be batched")
                if getattr(mod.lora_B[n], "bias", None) is not None:
                    raise EmorlError(f"lora_bank: adapter {n!r} has lora_bias at {lname}; not supported")
            key = (id(mod), tuple(self.names))
            if stacks is None:
                self._stacks[id(mod)] = self._stack(mod)
            else:
                self._stacks[id(mod)] = stacks[key] = stacks.get(key) or self._stack(mod)
            self.layers.append(mod)
        if weights is not None:
            self.set_weights(weights)

    def _stack(self, mod: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K, in, r) A^T and (K, r, out) (s*B)^T, zero-padded to the largest rank; zeros where absent (and for
        :data:`BASE_SLOT`)."""
        r_max = max(mod.r[n] for n in self.names if n in mod.lora_A)
        ref = next(mod.lora_A[n].weight for n in self.names if n in mod.lora_A)
        d_in = ref.shape[1]
        d_out = next(mod.lora_B[n].weight for n in self.names if n in mod.lora_B).shape[0]
        a = ref.new_zeros(len(self.names), d_in, r_max)
        b = ref.new_zeros(len(self.names), r_max, d_out)
        for i, n in enumerate(self.names):
            if n not in mod.lora_A:
                continue
            r = mod.r[n]
            a[i, :, :r] = mod.lora_A[n].weight.t()
            b[i, :r, :] = mod.lora_B[n].weight.t() * mod.scaling[n]
        # in the base layer's dtype (bf16 weights compute the delta in bf16; fp32 LoRA parameters keep their
        # gradients through the cast)
        dtype = mod.get_base_layer().weight.dtype
        return a.to(dtype), b.to(dtype), r_max

    def _checked(self, weights: torch.Tensor, lead: str) -> torch.Tensor:
        """``weights`` as a (lead, K) tensor, or an error naming the shape it has."""
        w = torch.as_tensor(weights)
        if w.ndim != 2 or w.shape[1] != len(self.names):
            raise EmorlError(f"lora_bank: weights must be ({lead}, {len(self.names)}), got shape {tuple(w.shape)}")
        return w

    def set_weights(self, weights: torch.Tensor | None) -> None:
        """Switch to weighted mixing: ``weights`` (G, K) — or None to go back to routing (group i = adapter i)."""
        self._coef, self._plans = {}, {}
        self.row_weights = None
        self.weights = None if weights is None else self._checked(weights, "G")

    def set_row_weights(self, weights: torch.Tensor | None) -> None:
        """Per-row mode: row r of every forward uses ``W0 + sum_i weights[r, i] ΔW_i`` (``weights`` (n_rows, K)):
        a one-hot row is one adapter, a zero row the base, any other a parameter mix — so rows of every mixing
        mode share one forward (``emorl serve``'s running batch), in any order. None leaves per-row mode."""
        self._coef, self._plans = {}, {}
        if weights is None:
            self.row_weights = None
            return
        self.weights, self.row_weights = None, self._checked(weights, "rows")

    def _row_plan(self, t: int, device: torch.device) -> RowPlan:
        """Per-row mode: the plan for forwards of ``t`` positions per row (made once, used by every LoRA layer)."""
        plan = self._plans.get(t)
        if plan is None:
            assert self.row_weights is not None
            plan = self._plans[t] = RowPlan(self.row_weights, t, device)
        return plan

    def _hot_stack(self, mod: Any, a: torch.Tensor, b: torch.Tensor, hot: tuple[int, ...]) -> tuple[Any, Any]:
        """A and sB of adapters ``hot`` (in slot order): a view when they are consecutive slots, else a copy kept
        per layer while the set of adapters with one-hot rows stays the same (it changes on joins and leaves)."""
        if hot == tuple(range(hot[0], hot[0] + len(hot))):
            return a[hot[0]:hot[0] + len(hot)], b[hot[0]:hot[0] + len(hot)]
        if self._hot_key != hot:
            self._hot_key, self._hot = hot, {}
        got = self._hot.get(id(mod))
        if got is None:
            idx = torch.tensor(hot, device=a.device)
            got = self._hot[id(mod)] = (a.index_select(0, idx), b.index_select(0, idx))
        return got

    def _row_delta_into(self, mod: Any, x: torch.Tensor, result: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        r_max: int) -> torch.Tensor:
        """Per-row mode, each row computed as the other modes compute it alone: the one-hot rows as the routed form
        (one bmm over the adapters, each adapter's rows gathered into a group of :func:`safe_rows` rows), the
        other non-zero rows as the weighted form; both added into their rows of ``result`` (zero rows: the base)."""
        assert self.row_weights is not None
        rows = x.shape[0]
        if rows != self.row_weights.shape[0]:
            raise ValueError(f"lora_bank: batch of {rows} rows but {self.row_weights.shape[0]} row weights")
        flat = x.reshape(-1, x.shape[-1]).to(a.dtype)  # (rows * T, in)
        plan = self._row_plan(flat.shape[0] // rows, flat.device)
        if not plan.take.numel():  # only base rows
            return result
        width = b.shape[-1]
        # no grad: every delta written into the plan's buffer (bmm/mm out=); with autograd: concatenated
        buf = plan.buffer(width, flat) if not torch.is_grad_enabled() else None
        parts = []
        n_one = 0 if plan.one is None else plan.one.shape[0]
        xs = flat.index_select(0, plan.take)
        if plan.one is not None:
            a_h, b_h = self._hot_stack(mod, a, b, plan.hot)
            xa = torch.bmm(xs[:n_one].view(len(plan.hot), -1, flat.shape[1]), a_h)
            out = None if buf is None else buf[:n_one].view(len(plan.hot), -1, width)
            parts.append(torch.bmm(xa, b_h.to(xa.dtype), out=out).view(n_one, width))
        if plan.mixed is not None:
            n_adapters = len(self.names)
            xa = xs[n_one:] @ a.permute(1, 0, 2).reshape(a.shape[1], n_adapters * r_max)
            xa = xa.mul_(plan.mixed_coef(r_max, xa)) if buf is not None else xa * plan.mixed_coef(r_max, xa)
            out = None if buf is None else buf[n_one:n_one + plan.mixed.shape[0]]
            parts.append(torch.mm(xa, b.reshape(n_adapters * r_max, width).to(xa.dtype), out=out))
        if buf is None:
            buf = torch.cat(parts + [flat.new_zeros(1, width)])
        delta = buf.index_select(0, plan.src).view_as(result).to(result.dtype)
        return result.add_(delta) if not torch.is_grad_enabled() else result + delta

    def _coef_for(self, r_max: int, ref: torch.Tensor) -> torch.Tensor:
        c = self._coef.get(r_max)
        if c is None:
            assert self.weights is not None
            c = self.weights.to(device=ref.device, dtype=ref.dtype).repeat_interleave(r_max, dim=1)[:, None, :]
            self._coef[r_max] = c
        return c

    def delta_into(self, mod: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Add the bank's low-rank delta for layer ``mod`` to ``result`` (the base output for input ``x``)."""
        stack = self._stacks[id(mod)]
        if stack is None:
            return result
        a, b, r_max = stack
        if self.row_weights is not None:
            return self._row_delta_into(mod, x, result, a, b, r_max)
        groups = len(self.names) if self.weights is None else self.weights.shape[0]
        n_rows = x.shape[0]
        if n_rows % groups:
            what = "adapters (routed)" if self.weights is None else "weight points"
            raise ValueError(f"lora_bank: batch of {n_rows} rows is not a multiple of {groups} {what}; lay rows out "
                             f"in equal consecutive groups")
        xg = x.reshape(groups, -1, x.shape[-1]).to(a.dtype)
        m = xg.shape[1]
        inplace = not torch.is_grad_enabled()
        if self.weights is None and mod.training:  # training (joint updates): each adapter's own LoRA dropout
            drops = [mod.lora_dropout[n] if n in mod.lora_dropout else None for n in self.names]  # noqa: SIM401
            if any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in drops):
                xg = torch.stack([d(xg[i]) if d is not None else xg[i] for i, d in enumerate(drops)])
        xg = pad_rows(xg, 1)  # a few rows per group (decode steps): the kernel of a full batch (MIN_GEMM_ROWS)
        if self.weights is None:  # routed: group i -> adapter i
            delta = torch.bmm(torch.bmm(xg, a), b.to(xg.dtype))[:, :m].to(result.dtype)
            rg = result.view(groups, -1, result.shape[-1])
            if inplace:
                rg.add_(delta)
                return result
            return (rg + delta).view_as(result)
        n_adapters = len(self.names)
        xa = xg @ a.permute(1, 0, 2).reshape(a.shape[1], n_adapters * r_max)  # (G, m, K*r): every adapter's A at once
        xa = xa * self._coef_for(r_max, xa)
        delta = (xa @ b.reshape(n_adapters * r_max, b.shape[-1]).to(xa.dtype))[:, :m]
        delta = delta.reshape(result.shape).to(result.dtype)
        if inplace:
            return result.add_(delta)
        return result + delta


def _bank_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement ``forward`` of a peft LoRA Linear while a bank is active."""
    bank: LoraBank = getattr(self, _ATTR)
    if kwargs.pop("adapter_names", None) is not None:
        raise ValueError("lora_bank: do not pass adapter_names inside a lora_bank context (the bank routes rows)")
    for key in ("alora_offsets",):
        kwargs.pop(key, None)
    n_rows = x.numel() // x.shape[-1]
    if 0 < n_rows < MIN_GEMM_ROWS and x.device.type == "cpu":  # the kernel of a full batch (see MIN_GEMM_ROWS)
        flat = pad_rows(x.reshape(n_rows, x.shape[-1]), 0)
        result = self.base_layer(flat, *args, **kwargs)[:n_rows].reshape(*x.shape[:-1], -1)
    else:
        result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters:
        return result
    return bank.delta_into(self, x, result)


@contextlib.contextmanager
def lora_bank(model: Any, names: Sequence[str], weights: torch.Tensor | None = None,
              stacks: dict[Any, Any] | None = None) -> Iterator[LoraBank]:
    """Make every forward of ``model`` (a PeftModel with LoRA adapters ``names``) inside the context run the K
    adapters as one batched forward. ``weights=None``: rows laid out adapter-major in K equal groups; ``weights``
    (G, K): rows in G equal groups, group g uses ``W0 + sum_i weights[g, i] ΔW_i``.

    ``stacks``: a dict the caller keeps across contexts, for adapters that do not change between them (serving):
    each layer's stacked A and sB are made on the first entry and reused after (entering then costs ~12 ms, its
    checks, instead of ~84 ms for stacking 6 adapters of SmolLM2-135M on 2 CPU cores). Not for training, whose
    updates would not reach the stacked copies."""
    bank = LoraBank(model, names, weights, stacks)
    patched: list[tuple[Any, Any]] = []
    try:
        for mod in bank.layers:
            if hasattr(mod, _ATTR):
                raise EmorlError("lora_bank contexts cannot be nested on the same model")
            patched.append((mod, mod.__dict__.get("forward")))
            setattr(mod, _ATTR, bank)
            mod.forward = types.MethodType(_bank_forward, mod)
        yield bank
    finally:
        for mod, old in patched:
            delattr(mod, _ATTR)
            if old is None:
                del mod.forward
            else:
                mod.forward = old
