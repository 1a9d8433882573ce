"""Preference losses and metrics from sequence log-probs: the only place the loss math lives.

A paired loss maps a `PairLogps` (summed completion log-probs of the policy and the reference for chosen y_w and
rejected y_l, and the completion lengths) plus `LossParams` to one loss per pair; an unpaired loss (KTO) maps an
`UnpairedLogps` (one completion per example, its desirable/undesirable label, and the log-probs of mismatched
prompt/completion pairs for the reference point) to one loss per example. Notation (docs/design.md):
h = log π_θ(y|x) − log π_ref(y|x), Δ = h_w − h_l, implicit reward r̂ = β·h. `−log σ(x)` is computed as
`softplus(−x)` for stability.

Register a new variant with `@register_loss("name", needs_reference=..., data=...)`. A loss that keeps a running
statistic across steps (BCO's reward shift) registers `running=` (the per-batch value it averages); its running mean
lives in the train state (`init_loss_state`, `update_loss_state`) so a resumed run continues it exactly.
A weighted combination is a name like "dpo+0.5*bco_pair+0.2*sft" (MPO-style): the weighted sum of its components'
per-pair losses, each component's mean logged as `loss/<name>`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class UnpairedLogps(NamedTuple):
    """Per-example sequence log-probs (float32 [B]) of each completion and of the mismatched pair (prompt i with
    completion i + 1), completion lengths, and labels (1.0 desirable, 0.0 undesirable)."""

    policy: jax.Array
    reference: jax.Array
    kl_policy: jax.Array
    kl_reference: jax.Array
    lengths: jax.Array
    labels: jax.Array


class PairLogps(NamedTuple):
    """Per-pair sequence log-probs (float32 [B]) and completion lengths (tokens, [B])."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    reference_chosen: jax.Array
    reference_rejected: jax.Array
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the loss variants (each variant reads the ones it needs)."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # ε: cdpo / robust label-noise rate
    reference_free: bool = False  # π_ref ≡ 1: the reference log-probs are taken as 0
    alpha: float = 1.0  # unlikelihood weight on y_l; rdpo length coefficient; rpo NLL weight
    gamma: float = 0.5  # simpo target margin
    orpo_lambda: float = 0.1  # orpo odds-ratio weight
    desirable_weight: float = 1.0  # kto λ_D
    undesirable_weight: float = 1.0  # kto λ_U
    dpop_lambda: float = 50.0  # dpop λ: penalty weight on the chosen log-ratio falling below 0 (Pal et al.: 50)
    discopop_tau: float = 0.05  # discopop τ: temperature of the logistic/exponential mix (Lu et al., TRL: 0.05)
    exo_epsilon: float = 1e-3  # exo_pair ε: the target's mass on the rejected completion (TRL: 1e-3)
    ld_alpha: float = 1.0  # LD-DPO α: weight of the policy's log-probs past the shorter completion's length (1: off)


DATA_KINDS = ("paired", "unpaired", "both")


class LossSpec(NamedTuple):
    fn: Callable[..., jax.Array]  # (logps, params) -> losses; with `running`: (logps, params, running_mean)
    needs_reference: bool
    data: str  # "paired" (PairLogps), "unpaired" (UnpairedLogps) or "both"
    running: Callable[[PairLogps | UnpairedLogps, LossParams], jax.Array] | None = None  # per-batch value averaged
    kl_rows: bool = False  # needs the mismatched (prompt i, completion i + 1) rows of an unpaired batch


class RunningMean(NamedTuple):
    """The mean of a per-batch value over every training batch so far (TRL's RunningMoments mean, fed one value per
    batch), float32 scalars; part of the train state."""

    mean: jax.Array
    count: jax.Array


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_reference: bool = True, data: str = "paired", running=None,
                  kl_rows: bool = False):
    """Decorator adding a loss `fn(logps, params) -> per-pair (or per-example) losses_B` to the registry; `data` says
    which log-probs it takes: PairLogps ("paired"), UnpairedLogps ("unpaired") or either ("both"). With
    `running(logps, params) -> scalar`, fn takes a third argument: the running mean of that value over the training
    batches so far, this one included."""
    if data not in DATA_KINDS:
        raise ValueError(f"data must be one of {DATA_KINDS}, got {data!r}")
    if "+" in name or "*" in name:
        raise ValueError(f"a loss name cannot hold '+' or '*' (they combine losses), got {name!r}")

    def decorate(fn):
        _LOSSES[name] = LossSpec(fn, needs_reference, data, running, kl_rows)
        return fn

    return decorate


def loss_names() -> list[str]:
    """All registered loss names, sorted."""
    return sorted(_LOSSES)


def components(name: str) -> tuple[tuple[str, float], ...]:
    """The (registered name, weight) terms of `name`: one term of weight 1 for a plain name, several for a weighted
    combination "dpo+0.5*bco_pair+0.2*sft". Unknown names, repeated names and bad weights fail naming them."""
    terms = []
    for term in name.split("+"):
        weight_text, _, loss = term.strip().rpartition("*")
        loss = loss.strip()
        if loss not in _LOSSES:
            where = "" if loss == name else f" in {name!r}"
            raise ValueError(f"unknown loss {loss!r}{where}; valid losses: {', '.join(loss_names())} (combine "
                             "them as 'dpo+0.5*sft')")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"loss term {term.strip()!r} of {name!r}: its weight {weight_text!r} is not a number "
                             "(write WEIGHT*NAME, e.g. 0.5*sft)") from None
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"loss term {term.strip()!r} of {name!r}: the weight must be a positive finite number")
        terms.append((loss, weight))
    names = [loss for loss, _ in terms]
    repeated = sorted({loss for loss in names if names.count(loss) > 1})
    if repeated:
        raise ValueError(f"loss {name!r} names {', '.join(repeated)} more than once; give each loss one weight")
    return tuple(terms)


def get_loss(name: str) -> LossSpec:
    """The spec of loss `name`, a registered name or a weighted combination of them (whose `fn` is unused: the
    combination is computed by `pair_losses`); unknown names fail with the list of valid ones."""
    if name in _LOSSES:
        return _LOSSES[name]
    specs = [_LOSSES[loss] for loss, _ in components(name)]
    kinds = {spec.data for spec in specs} - {"both"}
    if len(kinds) > 1:
        raise ValueError(f"loss {name!r} mixes losses of paired and unpaired data; combine losses of one kind")
    return LossSpec(fn=None, needs_reference=any(s.needs_reference for s in specs), data=kinds.pop() if kinds else
                    "both", running=None, kl_rows=any(s.kl_rows for s in specs))


def init_loss_state(name: str) -> dict[str, RunningMean] | None:
    """The train state's part for loss `name`: a zero RunningMean per component that keeps one, None if none does."""
    state = {loss: RunningMean(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
             for loss, _ in components(name) if _LOSSES[loss].running is not None}
    return state or None


def update_loss_state(name: str, state: dict[str, RunningMean] | None, logps: PairLogps | UnpairedLogps,
                      params: LossParams) -> dict[str, RunningMean] | None:
    """`state` with this batch's value added to each running mean (no gradient flows into it)."""
    if state is None:
        return None
    updated = {}
    for loss, running in state.items():
        value = jax.lax.stop_gradient(_LOSSES[loss].running(logps, params)).astype(jnp.float32)
        count = running.count + 1
        updated[loss] = RunningMean(running.mean + (value - running.mean) / count, count)
    return updated


def ld_shared_lengths(chosen_lengths: jax.Array, rejected_lengths: jax.Array) -> jax.Array:
    """LD-DPO's public length l_p = min(|y_w|, |y_l|) per pair (Liu et al., 2024, "LD-DPO"): in the policy's
    log-probs, tokens past it weigh `ld_alpha` (TRL's `ld_alpha`: the policy only, π_ref's sums are left whole)."""
    return jnp.minimum(chosen_lengths, rejected_lengths)


def log_ratio_margin(logps: PairLogps) -> jax.Array:
    """Δ = (log π_w − log π_ref,w) − (log π_l − log π_ref,l) per pair."""
    return (logps.policy_chosen - logps.reference_chosen) - (
        logps.policy_rejected - logps.reference_rejected
    )


def _neg_log_sigmoid(x: jax.Array) -> jax.Array:
    return jax.nn.softplus(-x)


@register_loss("dpo")
def dpo(logps: PairLogps, p: LossParams) -> jax.Array:
    """−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ); ε=0 is the paper's DPO, ε>0 conservative DPO (cDPO)."""
    z = p.beta * log_ratio_margin(logps)
    return (1 - p.label_smoothing) * _neg_log_sigmoid(z) + p.label_smoothing * _neg_log_sigmoid(-z)


register_loss("cdpo")(dpo)  # Conservative DPO by its own name: dpo with label_smoothing = ε.


@register_loss("robust")
def robust(logps: PairLogps, p: LossParams) -> jax.Array:
    """Unbiased loss under label-flip rate ε (Chowdhury et al., 2024)."""
    z = p.beta * log_ratio_margin(logps)
    eps = p.label_smoothing
    return ((1 - eps) * _neg_log_sigmoid(z) - eps * _neg_log_sigmoid(-z)) / (1 - 2 * eps)


@register_loss("ipo")
def ipo(logps: PairLogps, p: LossParams) -> jax.Array:
    """(Δ − 1/(2β))² (Azar et al., 2023), on summed log-probs; β plays IPO's τ."""
    return (log_ratio_margin(logps) - 1 / (2 * p.beta)) ** 2


@register_loss("hinge")
def hinge(logps: PairLogps, p: LossParams) -> jax.Array:
    """max(0, 1 − βΔ) (SLiC-style hinge on the log-ratio margin)."""
    return jax.nn.relu(1 - p.beta * log_ratio_margin(logps))


@register_loss("unweighted")
def unweighted(logps: PairLogps, p: LossParams) -> jax.Array:
    """−βΔ: the paper's σ-weight ablation (Appendix Table 3); its gradient drops σ(r̂_l − r̂_w)."""
    return -p.beta * log_ratio_margin(logps)


@register_loss("rdpo")
def rdpo(logps: PairLogps, p: LossParams) -> jax.Array:
    """−log σ(βΔ + α(|y_w| − |y_l|)): length-regularised DPO as written in docs/design.md."""
    length_gap = (logps.chosen_lengths - logps.rejected_lengths).astype(jnp.float32)
    return _neg_log_sigmoid(p.beta * log_ratio_margin(logps) + p.alpha * length_gap)


@register_loss("rpo")
def rpo(logps: PairLogps, p: LossParams) -> jax.Array:
    """DPO + α·NLL(y_w)/|y_w| (Pang et al., 2024)."""
    nll = -logps.policy_chosen / logps.chosen_lengths
    return dpo(logps, p) + p.alpha * nll


@register_loss("unlikelihood", needs_reference=False)
def unlikelihood(logps: PairLogps, p: LossParams) -> jax.Array:
    """−log π(y_w) + α·log π(y_l): the paper's Unlikelihood baseline."""
    return -logps.policy_chosen + p.alpha * logps.policy_rejected


@register_loss("simpo", needs_reference=False)
def simpo(logps: PairLogps, p: LossParams) -> jax.Array:
    """−log σ(β·lp_w/|y_w| − β·lp_l/|y_l| − γ) (Meng et al., 2024), no reference."""
    z = (
        p.beta * logps.policy_chosen / logps.chosen_lengths
        - p.beta * logps.policy_rejected / logps.rejected_lengths
        - p.gamma
    )
    return _neg_log_sigmoid(z)


@register_loss("dpo_norm")
def dpo_norm(logps: PairLogps, p: LossParams) -> jax.Array:
    """−log σ(β·(h_w/|y_w| − h_l/|y_l|)): length-normalised DPO, each log-ratio divided by its completion's length
    (Tülu 3, Lambert et al., 2024, open-instruct's `dpo_norm`; its paper uses β = 5, so set `loss.beta`)."""
    normalised_margin = (logps.policy_chosen - logps.reference_chosen) / logps.chosen_lengths - (
        logps.policy_rejected - logps.reference_rejected
    ) / logps.rejected_lengths
    return _neg_log_sigmoid(p.beta * normalised_margin)


@register_loss("dpop")
def dpop(logps: PairLogps, p: LossParams) -> jax.Array:
    """−log σ(β·(Δ − λ·max(0, log π_ref(y_w) − log π_θ(y_w)))): DPO-Positive (Pal et al., 2024, "Smaug: Fixing
    Failure Modes of Preference Optimisation with DPO-Positive"), penalising the chosen log-prob falling below
    π_ref's; λ = `dpop_lambda` (the paper's 50)."""
    chosen_shortfall = jax.nn.relu(logps.reference_chosen - logps.policy_chosen)
    return _neg_log_sigmoid(p.beta * (log_ratio_margin(logps) - p.dpop_lambda * chosen_shortfall))


@register_loss("nca_pair")
def nca_pair(logps: PairLogps, p: LossParams) -> jax.Array:
    """−log σ(βh_w) − ½·log σ(−βh_w) − ½·log σ(−βh_l): NCA (Chen et al., 2024, "Noise Contrastive Alignment"),
    its pairwise form as TRL's `nca_pair` writes it: absolute rewards, so y_w's likelihood is pushed up."""
    reward_chosen = p.beta * (logps.policy_chosen - logps.reference_chosen)
    reward_rejected = p.beta * (logps.policy_rejected - logps.reference_rejected)
    return (
        _neg_log_sigmoid(reward_chosen)
        + 0.5 * _neg_log_sigmoid(-reward_chosen)
        + 0.5 * _neg_log_sigmoid(-reward_rejected)
    )


@register_loss("apo_zero")
def apo_zero(logps: PairLogps, p: LossParams) -> jax.Array:
    """(1 − σ(βh_w)) + σ(βh_l): APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization", eq. 7,
    TRL's `apo_zero`): raise y_w's likelihood, lower y_l's; for chosen outputs better than the model's own."""
    return (1 - jax.nn.sigmoid(p.beta * (logps.policy_chosen - logps.reference_chosen))) + jax.nn.sigmoid(
        p.beta * (logps.policy_rejected - logps.reference_rejected)
    )


@register_loss("apo_down")
def apo_down(logps: PairLogps, p: LossParams) -> jax.Array:
    """σ(βh_w) + (1 − σ(βΔ)): APO-down (D'Oosterlinck et al., 2024, eq. 8, TRL's `apo_down`): lower both
    likelihoods, y_l's more; for chosen outputs worse than the model's own."""
    chosen_log_ratio = logps.policy_chosen - logps.reference_chosen
    return jax.nn.sigmoid(p.beta * chosen_log_ratio) + (1 - jax.nn.sigmoid(p.beta * log_ratio_margin(logps)))


@register_loss("exo_pair")
def exo_pair(logps: PairLogps, p: LossParams) -> jax.Array:
    """KL(σ(βΔ), σ(−βΔ) ‖ 1−ε, ε) = σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε): EXO's pairwise
    form (Ji et al., 2024, "Towards Efficient Exact Optimization of LM Alignment", eq. 16) as TRL's `exo_pair`
    computes it; ε = `exo_epsilon` (TRL takes it from label_smoothing, 1e-3 when that is 0)."""
    z = p.beta * log_ratio_margin(logps)
    eps = p.exo_epsilon
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


@register_loss("sppo_hard")
def sppo_hard(logps: PairLogps, p: LossParams) -> jax.Array:
    """(h_w − 1/(2β))² + (h_l + 1/(2β))²: SPPO (Wu et al., 2024, "Self-Play Preference Optimization", eq. 4.7) with
    hard labels, P(y_w ≻ y_l) = 1 and P(y_l ≻ y_w) = 0, as TRL's `sppo_hard`; β plays 1/η."""
    half_inverse_beta = 0.5 / p.beta
    return (logps.policy_chosen - logps.reference_chosen - half_inverse_beta) ** 2 + (
        logps.policy_rejected - logps.reference_rejected + half_inverse_beta
    ) ** 2


@register_loss("discopop")
def discopop(logps: PairLogps, p: LossParams) -> jax.Array:
    """(1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·exp(−βΔ): DiscoPOP, the log-ratio modulated logistic loss (Chris Lu et
    al., 2024, "Discovering Preference Optimization Algorithms with and for LLMs", eq. 5, as TRL's `discopop`);
    τ = `discopop_tau` (the paper's 0.05)."""
    z = p.beta * log_ratio_margin(logps)
    modulation = jax.nn.sigmoid(z / p.discopop_tau)
    # σ(z/τ)·exp(−z) as one exp: finite where exp(−z) alone overflows to inf and 0·inf would be NaN.
    return (1 - modulation) * _neg_log_sigmoid(z) + jnp.exp(jax.nn.log_sigmoid(z / p.discopop_tau) - z)


@register_loss("wpo")
def wpo(logps: PairLogps, p: LossParams) -> jax.Array:
    """w·dpo with w = exp(lp_w/|y_w| + lp_l/|y_l|), no gradient through w: WPO (Zhou et al., 2024, "WPO: Enhancing
    RLHF with Weighted Preference Optimization"), pairs weighted by how likely the current policy is to produce them.
    Sequence-level form: the loss sees only sequence log-probs, so w uses the length-normalised sequence log-prob,
    not the paper's (and TRL's `use_weighting`) per-token weights normalised by Σ_v π(v)²."""
    weight = jax.lax.stop_gradient(
        jnp.exp(logps.policy_chosen / logps.chosen_lengths + logps.policy_rejected / logps.rejected_lengths)
    )
    return weight * dpo(logps, p)


def _mean_pair_reward(logps: PairLogps, p: LossParams) -> jax.Array:
    """The batch's mean implicit reward over its chosen and rejected completions, β·mean(h_w, h_l)."""
    return p.beta * 0.5 * jnp.mean(
        (logps.policy_chosen - logps.reference_chosen) + (logps.policy_rejected - logps.reference_rejected))


@register_loss("bco_pair", running=_mean_pair_reward)
def bco_pair(logps: PairLogps, p: LossParams, reward_shift: jax.Array) -> jax.Array:
    """−log σ(βh_w − δ) − log σ(−(βh_l − δ)): BCO's pair form (Jung et al., 2024, "Binary Classifier Optimization
    for Large Language Model Alignment", as TRL's `bco_pair`): chosen and rejected classified apart around δ, the
    running mean over the training batches of each batch's mean reward (kept in the train state)."""
    reward_chosen = p.beta * (logps.policy_chosen - logps.reference_chosen)
    reward_rejected = p.beta * (logps.policy_rejected - logps.reference_rejected)
    return _neg_log_sigmoid(reward_chosen - reward_shift) + _neg_log_sigmoid(reward_shift - reward_rejected)


def _mean_unpaired_reward(logps: UnpairedLogps, p: LossParams) -> jax.Array:
    """The batch's mean implicit reward over its completions, β·mean(h)."""
    return p.beta * jnp.mean(logps.policy - logps.reference)


@register_loss("bco", data="unpaired", running=_mean_unpaired_reward)
def bco(logps: UnpairedLogps, p: LossParams, reward_shift: jax.Array) -> jax.Array:
    """−log σ(βh − δ) for a desirable completion, −log σ(−(βh − δ)) for an undesirable one: BCO on unpaired data
    (Jung et al., 2024, as TRL's BCOTrainer without its embedding-based density-ratio weights), δ the running mean
    of the batches' mean reward."""
    shifted = p.beta * (logps.policy - logps.reference) - reward_shift
    return jnp.where(logps.labels > 0, _neg_log_sigmoid(shifted), _neg_log_sigmoid(-shifted))


def _log_odds(mean_token_logp: jax.Array) -> jax.Array:
    # log(p / (1 − p)) with p = exp(mean_token_logp) < 1.
    return mean_token_logp - jnp.log(-jnp.expm1(mean_token_logp))


@register_loss("orpo", needs_reference=False)
def orpo(logps: PairLogps, p: LossParams) -> jax.Array:
    """NLL(y_w)/|y_w| + λ·(−log σ(log-odds_w − log-odds_l)) (Hong et al., 2024), no reference."""
    mean_w = logps.policy_chosen / logps.chosen_lengths
    mean_l = logps.policy_rejected / logps.rejected_lengths
    return -mean_w + p.orpo_lambda * _neg_log_sigmoid(_log_odds(mean_w) - _log_odds(mean_l))


@register_loss("sft", needs_reference=False, data="both")
def sft(logps: PairLogps | UnpairedLogps, p: LossParams) -> jax.Array:
    """Token-mean cross-entropy on the chosen completion (Preferred-FT, which makes π_ref), or on every completion
    of unpaired data (plain SFT, as on IMDb reviews)."""
    del p
    if isinstance(logps, UnpairedLogps):
        return -logps.policy / logps.lengths
    return -logps.policy_chosen / logps.chosen_lengths


def kto_reference_point(logps: UnpairedLogps, reference_free: bool = False) -> jax.Array:
    """z0 = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) on mismatched pairs: KTO's estimate of
    KL(π ‖ π_ref), held constant (no gradient) as the paper and TRL do."""
    reference = jnp.zeros_like(logps.kl_reference) if reference_free else logps.kl_reference
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(logps.kl_policy - reference), 0.0))


@register_loss("kto", data="unpaired", kl_rows=True)
def kto(logps: UnpairedLogps, p: LossParams) -> jax.Array:
    """λ_D·(1 − σ(β(h − z0))) for a desirable completion, λ_U·(1 − σ(β(z0 − h))) for an undesirable one
    (Ethayarajh et al., 2024), z0 the reference point above."""
    z0 = kto_reference_point(logps)
    h = logps.policy - logps.reference
    desirable = p.desirable_weight * (1 - jax.nn.sigmoid(p.beta * (h - z0)))
    undesirable = p.undesirable_weight * (1 - jax.nn.sigmoid(p.beta * (z0 - h)))
    return jnp.where(logps.labels > 0, desirable, undesirable)


def uses_reference(name: str, params: LossParams) -> bool:
    """Whether loss `name` needs π_ref's log-probs (False skips the reference forward pass)."""
    return get_loss(name).needs_reference and not params.reference_free


def takes(name: str, paired: bool) -> bool:
    """Whether loss `name` trains on paired (else unpaired) data."""
    return get_loss(name).data in ("both", "paired" if paired else "unpaired")


def component_losses(
    name: str, logps: PairLogps | UnpairedLogps, params: LossParams, loss_state: dict[str, RunningMean] | None = None,
) -> dict[str, jax.Array]:
    """Per-pair (per-example) losses [B] of each component of `name` (one for a plain name), unweighted; reference
    log-probs are zeroed when reference-free. `loss_state` holds the running means of the components that keep one."""
    spec = get_loss(name)
    paired = isinstance(logps, PairLogps)
    if not takes(name, paired):
        raise ValueError(f"loss {name!r} takes {spec.data} data, not {'paired' if paired else 'unpaired'}")
    if params.reference_free:
        fields = ("reference_chosen", "reference_rejected") if paired else ("reference", "kl_reference")
        logps = logps._replace(**{f: jnp.zeros_like(getattr(logps, f)) for f in fields})
    per_component = {}
    for loss, _ in components(name):
        component = _LOSSES[loss]
        if component.running is None:
            per_component[loss] = component.fn(logps, params)
        elif loss_state is None or loss not in loss_state:
            raise ValueError(f"loss {loss!r} keeps a running mean: pass its loss_state (losses.init_loss_state)")
        else:
            per_component[loss] = component.fn(logps, params, loss_state[loss].mean)
    return per_component


def pair_losses(
    name: str, logps: PairLogps | UnpairedLogps, params: LossParams, loss_state: dict[str, RunningMean] | None = None,
) -> jax.Array:
    """Per-pair (per-example) losses [B] of variant `name`: the weighted sum of its components' losses."""
    per_component = component_losses(name, logps, params, loss_state)
    return sum(weight * per_component[loss] for loss, weight in components(name))


def preference_metrics(
    logps: PairLogps, params: LossParams, losses: jax.Array, weights: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The standard metrics (reference code / TRL names), weighted means over pairs."""
    if weights is None:
        weights = jnp.ones_like(losses)
    reference_chosen, reference_rejected = logps.reference_chosen, logps.reference_rejected
    if params.reference_free:
        reference_chosen = reference_rejected = jnp.zeros_like(logps.policy_chosen)
    rewards_chosen = params.beta * (logps.policy_chosen - reference_chosen)
    rewards_rejected = params.beta * (logps.policy_rejected - reference_rejected)
    per_pair = {
        "loss": losses,
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "rewards/accuracies": (rewards_chosen > rewards_rejected).astype(jnp.float32),
        "logps/chosen": logps.policy_chosen,
        "logps/rejected": logps.policy_rejected,
    }
    total = jnp.maximum(weights.sum(), 1e-9)
    return {k: (v * weights).sum() / total for k, v in per_pair.items()}


def unpaired_metrics(
    logps: UnpairedLogps, params: LossParams, losses: jax.Array, weights: jax.Array | None = None
) -> dict[str, jax.Array]:
    """KTO's metrics under the paired names: rewards/chosen and logps/chosen over desirable examples, .../rejected
    over undesirable ones, rewards/accuracies the share whose reward has its label's sign, and kl, the reference point."""
    if weights is None:
        weights = jnp.ones_like(losses)
    reference = jnp.zeros_like(logps.reference) if params.reference_free else logps.reference
    rewards = params.beta * (logps.policy - reference)
    desirable, undesirable = weights * (logps.labels > 0), weights * (logps.labels <= 0)

    def mean(values, w):
        return (values * w).sum() / jnp.maximum(w.sum(), 1e-9)

    metrics = {
        "loss": mean(losses, weights),
        "rewards/chosen": mean(rewards, desirable),
        "rewards/rejected": mean(rewards, undesirable),
        "rewards/accuracies": mean(((rewards > 0) == (logps.labels > 0)).astype(jnp.float32), weights),
        "logps/chosen": mean(logps.policy, desirable),
        "logps/rejected": mean(logps.policy, undesirable),
        "kl": kto_reference_point(logps, params.reference_free),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def loss_and_metrics(
    name: str, logps: PairLogps | UnpairedLogps, params: LossParams, weights: jax.Array | None = None,
    loss_state: dict[str, RunningMean] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over pairs (examples) and the standard metrics; `weights` [B] masks padded eval rows. A combination
    adds each component's mean (`loss/<name>`)."""
    terms = components(name)
    per_component = component_losses(name, logps, params, loss_state)
    losses = sum(weight * per_component[loss] for loss, weight in terms)
    metrics_fn = preference_metrics if isinstance(logps, PairLogps) else unpaired_metrics
    metrics = metrics_fn(logps, params, losses, weights)
    if len(terms) > 1:
        mask = jnp.ones_like(losses) if weights is None else weights
        for loss, _ in terms:
            metrics[f"loss/{loss}"] = (per_component[loss] * mask).sum() / jnp.maximum(mask.sum(), 1e-9)
    return metrics["loss"], metrics


def running_metrics(loss_state: dict[str, RunningMean] | None) -> dict[str, jax.Array]:
    """Each running mean of the train state as a metric, `running_mean/<loss>` (BCO's reward shift δ)."""
    return {f"running_mean/{loss}": running.mean for loss, running in (loss_state or {}).items()}
