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

__all__ = ["BASE_SLOT", "LoraBank", "lora_bank", "lora_layers", "safe_rows"]

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


class LoraBank:
    """State of an active bank (returned by :func:`lora_bank`); see the module docstring."""

    def __init__(self, model: Any, names: Sequence[str], weights: torch.Tensor | None) -> None:
        self.names = list(names)
        self.layers: list[Any] = []
        # id(layer) -> (A^T, sB^T, r_max), or None for a layer without any of the bank's adapters
        self._stacks: dict[int, tuple[torch.Tensor, torch.Tensor, int] | None] = {}
        self._coef: dict[int, torch.Tensor] = {}
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
            self._stacks[id(mod)] = self._stack(mod)
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

    def set_weights(self, weights: torch.Tensor | None) -> None:
        """Switch to weighted mixing: ``weights`` (G, K) — or None to go back to routing (group i = adapter i)."""
        self._coef = {}
        self.row_weights = None
        if weights is None:
            self.weights = None
            return
        w = torch.as_tensor(weights)
        if w.ndim != 2 or w.shape[1] != len(self.names):
            raise EmorlError(f"lora_bank: weights must be (G, {len(self.names)}), got shape {tuple(w.shape)}")
        self.weights = w

    def set_row_weights(self, weights: torch.Tensor | None) -> None:
        """Per-row mode: row r of every forward uses ``W0 + sum_i weights[r, i] ΔW_i`` (``weights`` (n_rows, K)):
        a one-hot row is one adapter, a zero row the base, any other a parameter mix — so rows of every mixing
        mode share one forward (``emorl serve``'s running batch). None leaves per-row mode."""
        self._coef = {}
        if weights is None:
            self.row_weights = None
            return
        w = torch.as_tensor(weights)
        if w.ndim != 2 or w.shape[1] != len(self.names):
            raise EmorlError(f"lora_bank: row weights must be (rows, {len(self.names)}), got shape {tuple(w.shape)}")
        self.weights, self.row_weights = None, w

    def _row_plan(self) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None]:
        """Per-row mode: the rows of each adapter (one-hot coefficient 1), and the other rows with any non-zero
        coefficient (zero rows, the base, get no delta)."""
        plan = self._coef.get(-1)
        if plan is None:
            w = self.row_weights
            assert w is not None
            nz = w != 0
            hot = nz.sum(1) == 1
            one = hot & (w.max(1).values == 1)
            groups = [(i, torch.nonzero(one & nz[:, i])[:, 0].to(w.device)) for i in range(w.shape[1])]
            groups = [(i, idx) for i, idx in groups if len(idx)]
            mixed = torch.nonzero(~one & nz.any(1))[:, 0]
            plan = (groups, mixed if len(mixed) else None)
            self._coef[-1] = plan  # type: ignore[assignment]
        return plan  # type: ignore[return-value]

    def _row_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r_max: int) -> torch.Tensor:
        """Per-row mode, computed as the other modes compute the same row: a one-hot row as the routed form (its
        adapter's rows in one matmul), any other non-zero row as the weighted form with one group per row."""
        assert self.row_weights is not None
        rows = x.shape[0]
        if rows != self.row_weights.shape[0]:
            raise ValueError(f"lora_bank: batch of {rows} rows but {self.row_weights.shape[0]} row weights")
        flat = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)  # (rows, T, in)
        t = flat.shape[1]
        out = flat.new_zeros(rows, t, b.shape[-1])
        groups, mixed = self._row_plan()
        for i, idx in groups:
            m = len(idx) * t
            xg = pad_rows(flat[idx].reshape(1, m, -1), 1, safe_rows(m))
            out[idx] = torch.bmm(torch.bmm(xg, a[i:i + 1]), b[i:i + 1].to(xg.dtype))[0, :m].view(len(idx), t, -1)
        if mixed is not None:
            n_adapters = len(self.names)
            xg = pad_rows(flat[mixed], 1)
            xa = xg @ a.permute(1, 0, 2).reshape(a.shape[1], n_adapters * r_max)
            c = self.row_weights[mixed].to(device=xa.device, dtype=xa.dtype).repeat_interleave(r_max, dim=1)
            out[mixed] = ((xa * c[:, None, :]) @ b.reshape(n_adapters * r_max, b.shape[-1]).to(xa.dtype))[:, :t]
        return out

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
            delta = self._row_delta(x, a, b, r_max).reshape(result.shape).to(result.dtype)
            return result.add_(delta) if not torch.is_grad_enabled() else result + delta
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
def lora_bank(model: Any, names: Sequence[str], weights: torch.Tensor | None = None) -> Iterator[LoraBank]:
    """Make every forward of ``model`` (a PeftModel with LoRA adapters ``names``) inside the context run the K
    adapters as one batched forward. ``weights=None``: rows laid out adapter-major in K equal groups; ``weights``
    (G, K): rows in G equal groups, group g uses ``W0 + sum_i weights[g, i] ΔW_i``."""
    bank = LoraBank(model, names, weights)
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
