"""The defenses a distiller is judged against: what each serves for teacher logits.

A defense is named ``family`` or ``family@knob``: ``no_defense``;
``cmiguard`` (a learned transform; ``cmiguard@label`` names one of several,
e.g. points of a training trajectory); ``soften@τ`` (a plain temperature
τ > 1); ``sharpen@τ`` (τ < 1); ``top_k@k`` (renormalised over the top k,
``-inf`` elsewhere); ``noise@σ`` (Gaussian noise on the logits). Results
written before these names (``temperature``, ``top1_only``,
``top5_truncation``, ``noise``, ``soften`` at the demo's τ) keep theirs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from cmiguard.purify import purify
from cmiguard.transforms import LogitTransform

FAMILIES = ("no_defense", "cmiguard", "soften", "sharpen", "top_k", "noise")
# the default grid of `cmiguard evaluate`: one point of each baseline family
DEFENSES = ("no_defense", "cmiguard", "soften@2", "sharpen@0.5", "top_k@1", "top_k@5", "noise@0.5")


def parse(name: str) -> tuple[str, float | str | None]:
    """``(family, knob)`` of a defense name; a clear error for anything else."""
    family, _, knob = name.partition("@")
    if family not in FAMILIES:
        raise ValueError(
            f"unknown defense {name!r}: a defense is family[@knob], family one of "
            f"{', '.join(FAMILIES)}"
        )
    if family == "no_defense":
        if knob:
            raise ValueError(f"defense {name!r}: no_defense takes no knob")
        return family, None
    if family == "cmiguard":
        return family, knob or None
    try:
        value = float(knob)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # soften@inf served uniform rows, noise@inf NaN ones
        raise ValueError(f"defense {name!r}: {family} needs a finite number, as in {family}@2")
    ok = {
        "soften": value > 1,
        "sharpen": 0 < value < 1,
        "top_k": value >= 1 and value.is_integer(),
        "noise": value > 0,
    }[family]
    if not ok:
        need = {"soften": "> 1", "sharpen": "in (0, 1)", "top_k": "an integer >= 1", "noise": "> 0"}
        raise ValueError(f"defense {name!r}: the {family} knob must be {need[family]}")
    return family, value


def defense_fn(
    name: str, transforms: Mapping[str, LogitTransform], seed: int = 0
) -> Callable[[Tensor], Tensor]:
    """What the attacker receives for teacher logits ``z``: log-probs ``[n, V]``.
    ``transforms`` holds the learned ones by defense name (``cmiguard``,
    ``cmiguard@label``); ``seed`` seeds the noise."""
    family, knob = parse(name)
    if family == "no_defense":
        return lambda z: torch.log_softmax(z.float(), -1)
    if family == "cmiguard":
        transform = transforms.get(name)
        if transform is None:
            raise ValueError(f"defense {name!r} needs its transform (have: {sorted(transforms)})")
        return lambda z: purify(z, transform, output="logprobs")
    if family in ("soften", "sharpen"):
        return lambda z: torch.log_softmax(z.float() / knob, -1)
    if family == "top_k":
        return lambda z: keep_top(z, int(knob))
    gen = torch.Generator().manual_seed(seed)
    return lambda z: torch.log_softmax(
        z.float() + knob * torch.randn(z.shape, generator=gen).to(z.device), -1
    )


def keep_top(z: Tensor, k: int) -> Tensor:
    """Log-probs renormalised over the top ``k`` tokens, ``-inf`` elsewhere."""
    values, ids = z.float().topk(k, dim=-1)
    out = torch.full(z.shape, float("-inf"), device=z.device)
    return out.scatter_(1, ids, values - values.logsumexp(-1, keepdim=True))


def describe(name: str, transforms: Mapping[str, LogitTransform]) -> str:
    """What a defense's numbers depend on: its canonical name, and for a
    learned one a digest of the transform (parameters, temperature, guard), so
    that a resumed run refuses a different transform under the same name."""
    family, knob = parse(name)
    if family != "cmiguard":
        return family if knob is None else f"{family}@{knob:g}"
    transform = transforms[name]
    digest = hashlib.sha256()
    for key, value in sorted(transform.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(f"{transform.temperature!r} {transform.guard_margin!r}".encode())
    return f"{name} {digest.hexdigest()[:16]}"
