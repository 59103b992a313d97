"""Batched forward passes: the only place that runs the model for evaluations.

Per batch the model runs once, capturing every hook any SAE needs and the
original logits; then, per hook, the zero-ablation and every SAE at that hook
each run the model's tail from the hook (a full pass where the backend has no
tails); then every splice (several SAEs at several hooks patched in together)
runs once, and every cross-layer transcoder (every MLP output replaced by the decoders
writing to it) runs once. What leaves a batch is per-sequence float64 sums. The memory bound
is stated in docs/engine.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_acceptance.covariance import CovarianceAccumulator
from sae_acceptance.diagnostics import Diagnostics, WorstContexts, random_generator, random_unit
from sae_acceptance.sources.backends import Backend, as_backend
from sae_acceptance.sources.backends.base import Pass, Patch
from sae_acceptance.sources.clt import CLT
from sae_acceptance.sources.sae import SAE, SparseCode
from sae_acceptance.stats import SequenceSums


@dataclass
class Propagation:
    """How an SAE's error grows through the later blocks of its reconstruction pass: per sequence,
    Σ_t ‖r_patched − r_orig‖² (`error`) and Σ_t ‖r_orig‖² (`scale`) at each block output."""

    layers: list[int]
    error: np.ndarray  # [n_seq, len(layers)]
    scale: np.ndarray

    def ratios(self) -> list[float]:
        """The pooled ratio at each layer (NaN where the residual is zero)."""
        error, scale = self.error.sum(0), self.scale.sum(0)
        return [float(e / s) if s > 0 else float("nan") for e, s in zip(error, scale, strict=True)]


@dataclass
class HookRun:
    """What one pass over the eval set at one hookpoint produced: per SAE its sums, and what the
    diagnostic passes kept (worst contexts, propagation, sequences each latent fired in)."""

    sums: dict[str, SequenceSums]
    covariance: CovarianceAccumulator
    eval_s: float
    worst: dict[str, list[dict]] = field(default_factory=dict)
    propagation: dict[str, Propagation] = field(default_factory=dict)
    fired_sequences: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class CLTRun:
    """A cross-layer transcoder's replacement passes: the joint sums (as a splice's) and, per
    layer, pooled reconstruction numbers of the MLP output inside the replacement forward."""

    sums: SequenceSums
    layers: list[dict[str, Any]]


@dataclass
class ModelRun:
    """Every hook, splice and CLT of one model over the eval set. `backend` names how it ran
    (`transformer_lens`, `hf` ...) and `tail_only` whether patched passes were tails."""

    hooks: dict[str, HookRun]
    splices: dict[str, SequenceSums]
    eval_s: float
    n_positions: int  # every token position of the eval set (counted or not)
    backend: str = ""
    tail_only: bool = True
    clts: dict[str, CLTRun] = field(default_factory=dict)


@dataclass(frozen=True)
class _Target:
    """What an SAE replaces: the activation at `hook` (a transcoder's out hook), or one
    head's slice of it (`head`, `width`: hook_z SAEs trained on a single head)."""

    hook: str
    head: int | None = None
    width: int | None = None

    @classmethod
    def of(cls, hook: str, sae: SAE) -> _Target:
        out = getattr(sae, "hook_name_out", None) or hook
        head = getattr(sae, "hook_head_index", None)
        return cls(out, head, sae.d_in if head is not None else None)

    def view(self, act: torch.Tensor) -> torch.Tensor:
        if self.head is None or self.width is None:  # `of` sets both or neither
            return act
        return act[..., self.head * self.width : (self.head + 1) * self.width]

    def put(self, act: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """`act` with `part` in place of the view."""
        if self.head is None or self.width is None:  # `of` sets both or neither
            return part
        out = act.clone()
        out[..., self.head * self.width : (self.head + 1) * self.width] = part
        return out


class _LossTerms:
    """Next-token CE and the cross term of KL of each variant's logits, per position.

    CE is −log p(target), and Σ_v p_orig(v) log p_var(v) is the cross term, so
    KL(p_orig ‖ p_var) is its value for the original minus this. Both come from one
    `log_softmax` per variant, written into a scratch buffer kept across batches
    (on a large vocabulary a fresh [batch, pos, vocab] tensor per variant costs more
    in page faults than the arithmetic). The product with p_orig is summed by
    torch's cascade sum, which is also more precise than a batched dot product.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _scratch(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A float32 buffer shaped like `like`, reused while batches are no larger."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1:] != like.shape[1:] or buf.shape[0] < like.shape[0] or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        return buf[: like.shape[0]]

    def original(self, tokens: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a batch with the unpatched logits: keep p_orig, return their CE and cross term."""
        self.targets = tokens[:, 1:, None].to(logits.device)
        self.p_orig = torch.softmax(logits, -1, dtype=torch.float32, out=self._scratch("p_orig", logits))
        return self(logits)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = torch.log_softmax(logits, -1, dtype=torch.float32, out=self._scratch("log_p", logits))
        ce = -log_p[:, :-1].gather(-1, self.targets).squeeze(-1)
        cross = log_p.mul_(self.p_orig).sum(-1)
        return ce, cross


def _cosine(dot: torch.Tensor, a_norm: torch.Tensor, r_norm: torch.Tensor) -> torch.Tensor:
    """Per-token cosine of an activation and its reconstruction (0 where the reconstruction is zero)."""
    return torch.where(r_norm > 0, dot / (a_norm * r_norm).clamp(min=1e-30), 0.0).clamp(-1, 1)


def _per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over positions of values where mask, per sequence, in float64 (an excluded
    position counts for nothing, even where its value is not finite)."""
    return torch.where(mask, values.to(mask.device).double(), 0.0).sum(1)


def _reconstruct(sae: SAE, act: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
    """The SAE's reconstruction of flat [B, T, d] `act`, in `act`'s shape, dtype and device; and its code."""
    recon, code = sae.reconstruct(act.reshape(-1, act.shape[-1]).to(sae.dtype))
    return recon.reshape(act.shape).to(device=act.device, dtype=act.dtype), code


@dataclass
class _Batch:
    """One batch's original forward and masks, shared by every variant."""

    original: Pass
    mask: torch.Tensor  # [B, T] counted positions
    ce_orig: torch.Tensor
    cross_orig: torch.Tensor
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.mask[:, :-1]

    def scale(self, name: str) -> torch.Tensor:
        """Per-sequence Σ_t ‖r_orig‖² of the original pass at hook `name`: the propagation's
        denominator, the same for every SAE whose error reaches that hook, so computed once."""
        if name not in self.scales:
            self.scales[name] = _per_sequence(self.original.acts[name].float().pow(2).sum(-1), self.mask)
        return self.scales[name]

    def keep(self, like: torch.Tensor) -> torch.Tensor:
        return self.mask.to(like.device).unsqueeze(-1)

    def loss_sums(self, loss_terms: _LossTerms, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence Σ CE and Σ KL(p_orig ‖ p_variant) of a variant's logits."""
        _, ce, kl = self.variant(loss_terms, logits)
        return ce, kl

    def variant(self, loss_terms: _LossTerms, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A variant's per-position CE, and its per-sequence Σ CE and Σ KL(p_orig ‖ p_variant)."""
        ce, cross = loss_terms(logits)
        return ce, _per_sequence(ce, self.loss_mask), _per_sequence(self.cross_orig - cross, self.mask)


@dataclass
class _TargetSums:
    """Per target: the shift for the mean-centred SST, and each batch's shared sums."""

    shift: torch.Tensor | None = None
    shift_sums: list[torch.Tensor] = field(default_factory=list)
    batch: dict[str, torch.Tensor] | None = None
    gradient: tuple[torch.Tensor, torch.Tensor] | None = None  # this batch's ∂L/∂(target's view), its ‖·‖²


class _Evaluation:
    """The state of one `run_model` call, batch by batch."""

    def __init__(
        self,
        backend: Backend,
        by_hook: Mapping[str, Mapping[str, SAE]],
        splices: Mapping[str, Mapping[str, SAE]],
        tokens: torch.Tensor,
        diagnostics: Diagnostics,
        clts: Mapping[str, CLT] | None = None,
    ) -> None:
        self.backend, self.by_hook, self.splices, self.diagnostics = backend, by_hook, splices, diagnostics
        self.clts: dict[str, CLT] = dict(clts or {})
        self.clt_scalars: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in self.clts}
        self.clt_layers: dict[str, torch.Tensor] = {  # per layer: Σ‖a − r‖², Σ‖a‖², Σ cos, Σ l0, n
            name: torch.zeros(clt.n_layers, 5, dtype=torch.float64) for name, clt in self.clts.items()
        }
        self.tokens = tokens
        self.loss_terms = _LossTerms()
        self.targets = {
            (hook, name): _Target.of(hook, sae) for hook, saes in by_hook.items() for name, sae in saes.items()
        }
        self.target_sums: dict[_Target, _TargetSums] = {}
        self.covariance: dict[str, CovarianceAccumulator] = {}
        self.scalars: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {key: [] for key in self.targets}
        self.fired = {
            (hook, name): torch.zeros(sae.d_sae, dtype=torch.int64, device=backend.hook_device(hook))
            for hook, saes in by_hook.items()
            for name, sae in saes.items()
        }
        self.splice_scalars: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in splices}
        self.hook_s = dict.fromkeys(by_hook, 0.0)
        self.first_sequence = 0
        self.generators = {key: random_generator(diagnostics.seed, key[1]) for key in self.targets}
        self.worst = {key: WorstContexts(diagnostics.worst_n) for key in self.targets}
        self.fired_sequences = {key: torch.zeros_like(count) for key, count in self.fired.items()}
        self.later_blocks = {
            target: self._later_blocks(target) if diagnostics.propagation else [] for target in self.targets.values()
        }
        self.propagation: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {
            key: [] for key in self.targets
        }
        self.reads = sorted(
            set(by_hook)
            | {t.hook for t in self.targets.values()}
            | {backend.block_output(layer) for layers in self.later_blocks.values() for layer in layers}
            | {h for members in splices.values() for h in members}
            | {_Target.of(h, sae).hook for members in splices.values() for h, sae in members.items()}
            | {hook for clt in self.clts.values() for layer in range(clt.n_layers) for hook in _clt_hooks(clt, layer)}
        )

    def _later_blocks(self, target: _Target) -> list[int]:
        """The blocks whose output follows `target`'s hook: from its own block when the hook is
        inside it or its input, from the next when it is the block's output."""
        site = self.backend.site(target.hook)
        return list(range(site.layer + 1 if site.position == "out" else site.layer, self.backend.n_layers))

    def batch(self, tok: torch.Tensor, mask: torch.Tensor) -> None:
        original = self.backend.forward(tok, self.reads)
        assert original.logits is not None  # a forward's pass has its logits until they are dropped below
        ce_orig, cross_orig = self.loss_terms.original(tok, original.logits)
        original.logits = None  # one batch of logits per variant: the original's go now
        b = _Batch(original, mask, ce_orig, cross_orig)
        for hook in self.by_hook:
            start = time.perf_counter()
            self._hook(b, hook)
            self.hook_s[hook] += time.perf_counter() - start
        for name in self.splices:
            self._splice(b, name)
        for name in self.clts:
            self._clt(b, name)
        for sums in self.target_sums.values():
            sums.batch, sums.gradient = None, None
        self.first_sequence += tok.shape[0]

    def _shared(self, b: _Batch, target: _Target) -> dict[str, torch.Tensor]:
        """The sums every SAE replacing `target` shares: original and ablated CE/KL, Σ‖a − c‖²."""
        sums = self.target_sums.setdefault(target, _TargetSums())
        if sums.batch is not None:
            return sums.batch
        full = b.original.acts[target.hook]
        keep = b.keep(full)
        zeros = target.put(full, torch.zeros_like(target.view(full)))
        ce_ablate, kl_ablate = b.loss_sums(
            self.loss_terms, self.backend.patched(b.original, [(target.hook, torch.where(keep, zeros, full))])
        )
        a = target.view(full).float()
        if sums.shift is None:  # the first sequence's mean: near the data's mean, whatever the batching
            sums.shift = (a[0] * keep[0]).sum(0).double() / keep[0].sum().clamp(min=1)
        centred = a.double() - sums.shift
        sums.shift_sums.append((centred * keep).sum(1).cpu())
        sums.batch = {
            "n_tokens": b.mask.sum(1).double(),
            "n_loss": b.loss_mask.sum(1).double(),
            "ce_orig": _per_sequence(b.ce_orig, b.loss_mask),
            "ce_ablate": ce_ablate,
            "kl_ablate": kl_ablate,
            "act_sq": _per_sequence(centred.pow(2).sum(-1), b.mask),
        }
        return sums.batch

    def _gradient(self, b: _Batch, target: _Target) -> tuple[torch.Tensor, torch.Tensor]:
        """∂L/∂a at the target's hook, L the batch's Σ of counted next-token CE terms (sequences
        stay independent), in the target's view, and its squared norm per position: one backward
        of the tail, shared by every SAE replacing that target."""
        sums = self.target_sums[target]
        if sums.gradient is None:
            full = b.original.acts[target.hook]
            params = [p for p in self.backend.model.parameters() if p.requires_grad]
            leaf = full.detach().clone().requires_grad_(True)
            try:
                for p in params:  # the activation's gradient only, not the weights'
                    p.requires_grad_(False)
                with torch.enable_grad():
                    logits = self.backend.patched(b.original, [(target.hook, leaf)])
                    log_p = torch.log_softmax(logits.float(), -1)
                    ce = -log_p[:, :-1].gather(-1, self.loss_terms.targets).squeeze(-1)
                    loss = torch.where(b.loss_mask.to(ce.device), ce, 0.0).sum()
                    (gradient,) = torch.autograd.grad(loss, leaf)
            finally:
                for p in params:
                    p.requires_grad_(True)
            view = target.view(gradient.float())
            sums.gradient = (view, view.pow(2).sum(-1))
        return sums.gradient

    def _hook(self, b: _Batch, hook: str) -> None:
        act = b.original.acts[hook]
        mask = b.mask
        if hook not in self.covariance:
            self.covariance[hook] = CovarianceAccumulator(act.shape[-1], device=act.device)
        self.covariance[hook].update(act.float()[mask.to(act.device)])
        for name, sae in self.by_hook[hook].items():
            target = self.targets[(hook, name)]
            shared = self._shared(b, target)
            full = b.original.acts[target.hook]
            keep = b.keep(full)
            a_out = target.view(full)
            a_in = act if target.hook != hook else a_out
            recon, code = _reconstruct(sae, a_in)
            patch = torch.where(keep, target.put(full, recon), full)
            key = (hook, name)
            observers = self._observers(b, target, key)
            logits = self.backend.patched(b.original, [(target.hook, patch), *observers])
            ce_pos, ce_recon, kl_recon = b.variant(self.loss_terms, logits)
            self.worst[key].update(self.first_sequence, b.ce_orig, ce_pos, b.loss_mask.to(ce_pos.device))

            a, r = a_out.float(), recon.float()
            a_norm, r_norm = a.norm(dim=-1), r.norm(dim=-1)
            err = (a - r).pow(2).sum(-1)
            dot = (a * r).sum(-1)
            cos = _cosine(dot, a_norm, r_norm)
            l0 = code.l0().reshape(mask.shape)
            l1 = code.values.float().sum(-1).reshape(mask.shape)
            code.values = code.values * mask.reshape(-1, 1).to(code.values)
            self.fired[key] += code.fired(sae.d_sae).to(self.fired[key].device)
            sums = {
                **shared,
                "ce_recon": ce_recon,
                "kl_recon": kl_recon,
                "cos": _per_sequence(cos, mask),
                "rel_err": _per_sequence(err.sqrt() / a_norm, mask),
                "sq_err": _per_sequence(err, mask),
                "l2_ratio": _per_sequence(r_norm / a_norm, mask),
                "l0": _per_sequence(l0, mask),
            }
            delta = r - a
            if self.diagnostics.saebench:
                sums |= _saebench_sums(a, r, a_norm, r_norm, err, dot, l1, mask)
                self.fired_sequences[key] += code.fired_sequences(sae.d_sae, mask.shape[0]).to(self.fired[key].device)
            if self.diagnostics.random:
                step = delta.norm(dim=-1, keepdim=True) * random_unit(a.shape, self.generators[key], a.device)
                noisy = torch.where(keep, target.put(full, (a + step).to(a_out.dtype)), full)
                _, sums["ce_random"], sums["kl_random"] = b.variant(
                    self.loss_terms, self.backend.patched(b.original, [(target.hook, noisy)])
                )
            if self.diagnostics.gradient:
                gradient, gradient_sq = self._gradient(b, target)
                along = (gradient.to(delta.device) * delta).sum(-1)
                sums["g_delta"] = _per_sequence(along, mask)
                sums["ga_num"] = _per_sequence(along.pow(2), mask)
                sums["ga_den"] = _per_sequence(gradient_sq.to(delta.device) * err, mask)  # err = ‖δ‖²
            self.scalars[key].append(sums)

    def _observers(self, b: _Batch, target: _Target, key: tuple[str, str]) -> list[tuple[str, Patch]]:
        """Hooks that leave each later block's output as it is and keep, per sequence, how far it
        moved from the original pass (the error's propagation) and its original size."""
        layers = self.later_blocks[target]
        if not layers:
            return []
        moved = torch.zeros(b.mask.shape[0], len(layers), dtype=torch.float64, device=b.mask.device)
        size = torch.zeros_like(moved)
        self.propagation[key].append((moved, size))  # filled by the observers as the pass runs

        def observe(i: int, name: str) -> Patch:
            def keep(act: torch.Tensor) -> torch.Tensor:
                original = b.original.acts[name].float()
                moved[:, i] = _per_sequence((act.float() - original).pow(2).sum(-1), b.mask)
                size[:, i] = b.scale(name)
                return act

            return keep

        return [(name, observe(i, name)) for i, name in enumerate(map(self.backend.block_output, layers))]

    def _joint_sums(
        self, b: _Batch, recon_patches: list[tuple[str, Patch]], ablate_patches: list[tuple[str, Patch]]
    ) -> dict[str, torch.Tensor]:
        """A joint replacement's per-sequence sums (splice or CLT): its patched and zero-ablated passes."""
        ce_ablate, kl_ablate = b.loss_sums(self.loss_terms, self.backend.patched(b.original, ablate_patches))
        ce_recon, kl_recon = b.loss_sums(self.loss_terms, self.backend.patched(b.original, recon_patches))
        return {
            "n_tokens": b.mask.sum(1).double(),
            "n_loss": b.loss_mask.sum(1).double(),
            "ce_orig": _per_sequence(b.ce_orig, b.loss_mask),
            "ce_recon": ce_recon,
            "ce_ablate": ce_ablate,
            "kl_ablate": kl_ablate,
            "kl_recon": kl_recon,
        }

    def _splice(self, b: _Batch, name: str) -> None:
        """All members patched in one forward, each reconstructing the activation that forward
        computes at its hook; the ablation zero-ablates every member's target together."""
        members = self.splices[name]
        recon_patches: list[tuple[str, Patch]] = []
        ablate_patches: list[tuple[str, Patch]] = []
        for hook, sae in members.items():
            target = _Target.of(hook, sae)
            live: dict[str, torch.Tensor] = {}
            if target.hook != hook:  # a transcoder reads its input hook on the way
                recon_patches.append((hook, _observer(live)))
            recon_patches.append((target.hook, _splice_patch(b, sae, target, live)))
            ablate_patches.append((target.hook, _ablation_patch(b, target)))
        self.splice_scalars[name].append(self._joint_sums(b, recon_patches, ablate_patches))

    def _clt(self, b: _Batch, name: str) -> None:
        """The replacement forward: at each layer, in forward order, the encoder reads the input
        this pass computes there and the MLP output is replaced by the sum of the decoders
        writing to it (from this layer's and earlier layers' features); the ablation zeroes
        every layer's MLP output together."""
        clt = self.clts[name]
        pending: dict[int, torch.Tensor] = {}  # per later layer: b_dec plus the decoders written so far
        l0: dict[int, torch.Tensor] = {}
        layer_sums = self.clt_layers[name]
        recon_patches: list[tuple[str, Patch]] = []
        ablate_patches: list[tuple[str, Patch]] = []

        def encoder(layer: int) -> Patch:
            def read(act: torch.Tensor) -> torch.Tensor:
                x = act.reshape(-1, act.shape[-1]).to(clt.b_enc[layer].device)
                features = clt.encode(layer, x)
                l0[layer] = (features != 0).sum(-1)
                for target in clt.targets(layer):
                    start = pending.get(target, clt.b_dec[target].expand(x.shape[0], -1))
                    pending[target] = start + clt.decode_to(layer, target, features)
                pending[layer] = pending[layer] + clt.skip(layer, x)
                return act

            return read

        def decoder(layer: int) -> Patch:
            def write(act: torch.Tensor) -> torch.Tensor:
                recon = pending.pop(layer).reshape(act.shape).to(device=act.device, dtype=act.dtype)
                keep = b.mask.to(act.device)
                a, r = act.float(), recon.float()
                a_norm, r_norm = a.norm(dim=-1), r.norm(dim=-1)
                cos = _cosine((a * r).sum(-1), a_norm, r_norm)
                fired = l0.pop(layer).reshape(keep.shape).to(act.device)
                per_token = [(a - r).pow(2).sum(-1), a.pow(2).sum(-1), cos, fired, torch.ones_like(cos)]
                layer_sums[layer] += torch.stack([torch.where(keep, v.double(), 0.0).sum() for v in per_token]).cpu()
                return torch.where(keep.unsqueeze(-1), recon, act)

            return write

        for layer in range(clt.n_layers):
            hook_in, hook_out = _clt_hooks(clt, layer)
            recon_patches += [(hook_in, encoder(layer)), (hook_out, decoder(layer))]
            ablate_patches.append((hook_out, _ablation_patch(b, _Target(hook_out))))
        self.clt_scalars[name].append(self._joint_sums(b, recon_patches, ablate_patches))

    def _clt_results(self) -> dict[str, CLTRun]:
        runs = {}
        for name, batches in self.clt_scalars.items():
            clt, totals = self.clts[name], self.clt_layers[name].numpy()
            layers = []
            for layer, (err, act_sq, cos, l0, n) in enumerate(totals):
                hook_in, hook_out = _clt_hooks(clt, layer)
                layers.append(
                    {
                        "layer": layer,
                        "hook_in": hook_in,
                        "hook_out": hook_out,
                        "nmse": float(err / act_sq) if act_sq > 0 else float("nan"),
                        "cosine": float(cos / n) if n else float("nan"),
                        "l0": float(l0 / n) if n else float("nan"),
                    }
                )
            sums = SequenceSums(scalars=_concat(batches), fired=np.zeros(0, dtype=np.int64), d_in=1)
            runs[name] = CLTRun(sums, layers)
        return runs

    def results(self, n_seq: int, ctx: int, eval_s: float, shared_s: float) -> ModelRun:
        per_hook_shared = shared_s / max(len(self.by_hook), 1)
        hooks = {}
        for hook, saes in self.by_hook.items():
            sums = {}
            for name in saes:
                target = self.targets[(hook, name)]
                shift_np = torch.cat(self.target_sums[target].shift_sums).numpy()
                sums[name] = SequenceSums(
                    scalars=_concat(self.scalars[(hook, name)]),
                    fired=self.fired[(hook, name)].cpu().numpy(),
                    d_in=shift_np.shape[1],
                    shift_sums=shift_np,
                )
            hooks[hook] = HookRun(
                sums=sums,
                covariance=self.covariance[hook],
                eval_s=self.hook_s[hook] + per_hook_shared,
                worst={name: self.worst[(hook, name)].records(self.tokens) for name in saes},
                propagation={
                    name: Propagation(self.later_blocks[self.targets[(hook, name)]], *_stacked(batches))
                    for name in saes
                    if (batches := self.propagation[(hook, name)])
                },
                fired_sequences={name: self.fired_sequences[(hook, name)].cpu().numpy() for name in saes},
            )
        splices = {
            name: SequenceSums(scalars=_concat(batches), fired=np.zeros(0, dtype=np.int64), d_in=1)
            for name, batches in self.splice_scalars.items()
        }
        return ModelRun(
            hooks, splices, eval_s, n_seq * ctx, self.backend.kind, self.backend.tail_only, self._clt_results()
        )


def _stacked(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch ([B, L] error, [B, L] scale) propagation sums as [n_seq, L] arrays."""
    error = torch.cat([moved for moved, _ in batches]).cpu().numpy()
    scale = torch.cat([size for _, size in batches]).cpu().numpy()
    return error, scale


def _saebench_sums(
    a: torch.Tensor,
    r: torch.Tensor,
    a_norm: torch.Tensor,
    r_norm: torch.Tensor,
    err: torch.Tensor,
    dot: torch.Tensor,
    l1: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The per-sequence sums of SAEBench's core numbers: ‖x‖², ‖x̂‖², Σ latents, and the legacy
    explained variance, per token centred on the batch's counted mean as SAEBench centres it.
    The per-token norms, error and dot product are the reconstruction metrics', passed in."""
    keep = mask.to(a.device)
    centre = (a * keep.unsqueeze(-1)).sum((0, 1)) / keep.sum().clamp(min=1)
    spread = (a - centre).pow(2).sum(-1)
    legacy = 1.0 - err / torch.where(spread > 0, spread, torch.nan)
    return {
        "x_sq": _per_sequence(a.pow(2).sum(-1), mask),
        "x_norm": _per_sequence(a_norm, mask),
        "recon_norm": _per_sequence(r_norm, mask),
        "recon_sq": _per_sequence(r.pow(2).sum(-1), mask),
        "dot": _per_sequence(dot, mask),
        "l1": _per_sequence(l1, mask),
        "ev_legacy": _per_sequence(legacy, mask),
    }


def _concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    return {key: torch.cat([batch[key] for batch in batches]).cpu().numpy() for key in batches[0]}


def _clt_hooks(clt: CLT, layer: int) -> tuple[str, str]:
    """Where layer `layer` of a CLT reads and where the decoders writing to it write."""
    return clt.hook_in(layer), clt.hook_out(layer)


def _observer(into: dict[str, torch.Tensor]) -> Patch:
    def observe(act: torch.Tensor) -> torch.Tensor:
        into["act"] = act
        return act

    return observe


def _splice_patch(b: _Batch, sae: SAE, target: _Target, live: dict[str, torch.Tensor]) -> Patch:
    def patch(act: torch.Tensor) -> torch.Tensor:
        recon, _ = _reconstruct(sae, live.get("act", target.view(act)))
        return torch.where(b.keep(act), target.put(act, recon.to(act.device)), act)

    return patch


def _ablation_patch(b: _Batch, target: _Target) -> Patch:
    def patch(act: torch.Tensor) -> torch.Tensor:
        return torch.where(b.keep(act), target.put(act, torch.zeros_like(target.view(act))), act)

    return patch


def run_model(
    model: Any,
    by_hook: Mapping[str, Mapping[str, SAE]],
    tokens: torch.Tensor,
    counted: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    splices: Mapping[str, Mapping[str, SAE]] | None = None,
    diagnostics: Diagnostics | None = None,
    clts: Mapping[str, CLT] | None = None,
) -> ModelRun:
    """Evaluate every SAE of `by_hook` ({hook: {name: SAE}}), every splice ({name: {hook: SAE}})
    and every cross-layer transcoder (`clts`, {name: CLT}) over `tokens` ([n_seq, ctx]) with one
    original forward per batch.

    `model` is a backend or a model `as_backend` wraps. `counted` ([n_seq, ctx] bool)
    marks the positions that count: excluded ones keep their original activation in
    every patched pass (the zero-ablation too) and are left out of every sum; a
    next-token loss counts when its input position does.
    """
    backend = as_backend(model)
    by_hook = {hook: dict(saes) for hook, saes in by_hook.items() if saes}
    splices = {name: dict(members) for name, members in (splices or {}).items() if members}
    n_seq, ctx = tokens.shape
    state = _Evaluation(backend, by_hook, splices, tokens, diagnostics or Diagnostics.off(), dict(clts or {}))
    label = ", ".join(by_hook) if len(by_hook) == 1 else f"{len(by_hook)} hooks" if by_hook else "CLTs"
    bar = tqdm(range(0, n_seq, batch_size), desc=f"eval {label}", unit="batch", disable=not progress)
    start = time.perf_counter()
    with torch.no_grad():  # not inference mode: the gradient diagnostic differentiates through a tail
        for begin in bar:
            tok = tokens[begin : begin + batch_size].to(backend.device)
            mask = counted[begin : begin + batch_size].to(backend.device)
            state.batch(tok, mask)
    eval_s = time.perf_counter() - start
    return state.results(n_seq, ctx, eval_s, eval_s - sum(state.hook_s.values()))


def run_hook(
    model: Any,
    hook_name: str,
    saes: Mapping[str, SAE],
    tokens: torch.Tensor,
    counted: torch.Tensor,
    batch_size: int,
    progress: bool = True,
) -> HookRun:
    """Every SAE in `saes` at `hook_name`: `run_model` with one hook."""
    return run_model(model, {hook_name: saes}, tokens, counted, batch_size, progress).hooks[hook_name]


def check_finite(sums: SequenceSums) -> list[str]:
    """Names of per-sequence sums that hold NaN or infinity (a failed eval, never a number)."""
    return [k for k, v in sums.scalars.items() if not np.all(np.isfinite(v))]
