"""AdamW (Loshchilov & Hutter 2019, Algorithm 2) for one group of parameters, without ``torch.optim``.

Per parameter, at step k (Kingma & Ba 2015, Algorithm 1, with the weight decay decoupled)::

    p <- p (1 - lr wd)                                    decoupled weight decay
    m <- beta1 m + (1 - beta1) g                           first moment
    v <- beta2 v + (1 - beta2) g^2                         second moment
    p <- p - lr / (1 - beta1^k) * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)

(the paper's schedule multiplier eta_t is folded into ``lr``, as torch.optim.AdamW does).

Why not ``torch.optim.AdamW``: every call into a ``torch.optim.Optimizer`` (its constructor, ``step``,
``zero_grad``, ``state_dict``) first imports ``torch._dynamo``, about 1 s of wall time and 2 CPU s here,
which was a third of the start-up of a short run with a warm data cache (``benchmarks/train_startup.py``).
This class calls the same kernels: torch's fused single-kernel AdamW (``torch._fused_adamw_``) where this
torch has it for the device (CUDA; CPU from torch 2.4), so the weights are bit-identical to
``torch.optim.AdamW(fused=True)``; elsewhere (MPS, older torch on CPU) the formula above in ``_foreach``
ops, equal to ``torch.optim.AdamW`` to float rounding.

Its ``state_dict`` has torch.optim's layout (``state``: index -> step, exp_avg, exp_avg_sq;
``param_groups``: the hyperparameters and the parameter indices), so training states written by
earlier versions of diffuse (with torch.optim.AdamW) resume here, and the reverse.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from .errors import CheckpointError


def fused_available(device: torch.device) -> bool:
    """Whether this torch has the fused AdamW kernel for ``device`` (CUDA; CPU from torch 2.4)."""
    return _fused_for(device.type)


@functools.cache
def _fused_for(kind: str) -> bool:
    if not hasattr(torch, "_fused_adamw_"):
        return False
    return kind == "cuda" or (kind == "cpu" and torch.torch_version.TorchVersion(torch.__version__) >= (2, 4))


class AdamW:
    """AdamW over ``params`` (one group); ``param_groups[0]["lr"]`` may be changed between steps."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        params = list(params)
        assert params and all(p.is_floating_point() for p in params)
        self.param_groups = [
            {"params": params, "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def _state(self, p: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
        """A parameter's state, made on its first step: step 0 (on its device for the fused kernel), zero moments."""
        st = self.state.get(p)
        if st is None:
            step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
            st = self.state[p] = {"step": step, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        return st

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        group = self.param_groups[0]
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_device.setdefault((p.device, p.dtype), []).append(p)
        for (device, _), params in by_device.items():
            fused = fused_available(device)
            states = [self._state(p, fused) for p in params]
            lists = [params, [p.grad for p in params]] + [[s[k] for s in states] for k in ("exp_avg", "exp_avg_sq")]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            if fused:
                beta1, beta2 = group["betas"]
                torch._fused_adamw_(*lists, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                                    weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                                    maximize=False, grad_scale=None, found_inf=None)  # fmt: skip
            else:
                self._foreach_update(*lists, [float(s) for s in steps], group)

    @staticmethod
    def _foreach_update(params, grads, exp_avgs, exp_avg_sqs, steps: list[float], group: dict) -> None:
        """The module docstring's formula in ``_foreach`` ops (every parameter at its own step k)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1.0 - beta2**k) ** 0.5 for k in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**k) for k in steps])

    # ------------------------------------------------------------------ state, in torch.optim's layout

    def state_dict(self) -> dict:
        group = self.param_groups[0]
        index = {p: i for i, p in enumerate(group["params"])}
        state = {index[p]: dict(st) for p, st in self.state.items()}
        fused = bool(group["params"]) and fused_available(group["params"][0].device)
        hyper = {k: v for k, v in group.items() if k != "params"}
        flags = {
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": fused,
            "decoupled_weight_decay": True,
        }  # what torch.optim.AdamW stores, for older diffuse
        return {"state": state, "param_groups": [{**hyper, **flags, "params": list(range(len(group["params"])))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state (this class's or torch.optim.AdamW's); CheckpointError if it is not one for these parameters.

        The moments take their parameter's dtype, device and strides (safetensors stores them contiguous; a
        ``channels_last`` parameter needs ``channels_last`` moments, or kernels that walk the raw storage
        would pair the wrong elements).
        """
        groups = state_dict.get("param_groups") or []
        params = self.param_groups[0]["params"]
        if len(groups) != 1 or len(groups[0].get("params", ())) != len(params):
            raise CheckpointError("the stored optimizer state is not one of AdamW over this model's parameters")
        saved = groups[0]
        if saved.get("amsgrad") or saved.get("maximize") or saved.get("decoupled_weight_decay", True) is False:
            raise CheckpointError("the stored optimizer state is not plain AdamW (amsgrad, maximize or L2 decay)")
        fused = fused_available(params[0].device)
        self.state = {}
        for i, st in state_dict.get("state", {}).items():
            if not 0 <= int(i) < len(params):
                raise CheckpointError(f"the stored optimizer state names parameter {i}; this model has {len(params)}")
            p = params[int(i)]
            if {"step", "exp_avg", "exp_avg_sq"} - set(st) or any(
                st[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq")
            ):
                raise CheckpointError(f"the stored optimizer state of parameter {i} does not fit this model")
            step = torch.as_tensor(st["step"], dtype=torch.float32).reshape(())
            self.state[p] = {
                "step": step.to(p.device if fused else "cpu", copy=True),
                "exp_avg": torch.empty_like(p).copy_(st["exp_avg"]),
                "exp_avg_sq": torch.empty_like(p).copy_(st["exp_avg_sq"]),
            }
        for k in ("lr", "eps", "weight_decay"):
            self.param_groups[0][k] = float(saved[k])
        self.param_groups[0]["betas"] = tuple(float(b) for b in saved["betas"])
