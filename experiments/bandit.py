"""The paper in miniature: exact DPO on a tabular policy over 2 prompts × 4 replies.

    python -m experiments.bandit --preset align
    python -m experiments.bandit --preset no_sigma --json /tmp/no_sigma.json --plot /tmp/no_sigma.png
    python -m experiments.bandit --preset align --loss ipo --beta 1 --flip 100:6

The policy is a table of logits θ[prompt, reply], π(y|x) = softmax(θ[x])[y]; π_ref is the
uniform start, frozen. A "sequence" is one reply, so its log-prob is log π(y|x) and its
length is 1. The loss comes from the registry in `dpo_jax.losses` (no second copy of the
math); the objective is the SUM over pairs of the per-pair losses, so `jax.grad` of it is the
paper's closed form −β·Σ σ(r̂_l − r̂_w)·(∇log π_w − ∇log π_l); θ follows plain gradient
descent on it. The recorded "loss" is the registry's mean over pairs, as the trainer logs it.

The "human" data: each prompt's four replies A–D carry a fixed ranking (`RANKING`), and every
one of its 6 pairs (better, worse) is a preference pair, as InstructGPT turns rankings into
comparisons: 12 pairs, indexed as in `PAIRS` (print them with `--pairs`). `--flip STEP:PAIR`
swaps a pair's labels from step STEP on (flipping it again swaps it back).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import losses

PROMPTS = ("x0", "x1")
REPLIES = ("A", "B", "C", "D")
# The documented "human" ranking, best → worst reply index, per prompt: x0 B>D>A>C, x1 C>A>D>B.
RANKING = ((1, 3, 0, 2), (2, 0, 3, 1))
# (prompt, chosen, rejected) for every pair of each ranking: pairs 0–5 are x0's, 6–11 x1's.
PAIRS = tuple(
    (x, ranking[i], ranking[j])
    for x, ranking in enumerate(RANKING)
    for i, j in itertools.combinations(range(len(REPLIES)), 2)
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One simulation: the loss (a registry name) and its params, plain-GD lr, steps, label flips."""

    loss: str = "dpo"
    beta: float = 5.0
    lr: float = 0.003
    steps: int = 200
    flips: tuple[tuple[int, int], ...] = ()  # (step, pair): swap the pair's labels from `step` on
    loss_params: tuple[tuple[str, float], ...] = ()  # other LossParams fields, e.g. label_smoothing

    def loss_config(self) -> losses.LossParams:
        return losses.LossParams(beta=self.beta, **dict(self.loss_params))

    def validate(self) -> "Settings":
        losses.get_loss(self.loss)  # unknown names fail with the list of valid ones
        if not (self.beta > 0 and self.lr > 0 and self.steps >= 1):
            raise ValueError(f"need beta > 0, lr > 0, steps >= 1; got {self.beta}, {self.lr}, {self.steps}")
        fields = {f.name for f in dataclasses.fields(losses.LossParams)} - {"beta"}
        for key, _ in self.loss_params:
            if key not in fields:
                raise ValueError(f"unknown loss param {key!r}; valid: {', '.join(sorted(fields))}")
        for step, pair in self.flips:
            if not (0 <= step < self.steps and 0 <= pair < len(PAIRS)):
                raise ValueError(f"flip {step}:{pair} needs 0 <= STEP < {self.steps}, 0 <= PAIR < {len(PAIRS)}")
        return self


# β is 50× the paper's 0.1 because one reply's log-ratio here plays a whole sequence's, which
# moves by tens of nats in a real model; DPO stops pushing once β·Δ is a few nats, so the leash
# on θ scales as 1/β. lr·β·steps = 3 takes the unweighted ablation's top reply past 0.99.
PRESETS: dict[str, Settings] = {
    # The honest data and a steady β: preferred replies climb, the KL flattens out.
    "align": Settings(),
    # Same data, loss −βΔ: the σ(r̂_l − r̂_w) weight is gone, so settled pairs keep pushing.
    "no_sigma": Settings(loss="unweighted"),
    # Pair 6 (x1: C over A) labelled backwards from the start: A now beats C in the data.
    "mislabel": Settings(flips=((0, 6),)),
}


def resolve(preset: str | Settings = "align", **overrides: Any) -> Settings:
    """A preset name (or Settings) with field overrides applied, validated."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fields = [f.name for f in dataclasses.fields(Settings)]
    for key in overrides:
        if key not in fields:
            raise ValueError(f"unknown setting {key!r}; valid: {', '.join(fields)}")
    if isinstance(overrides.get("loss_params"), dict):
        overrides["loss_params"] = overrides["loss_params"].items()
    for key in ("flips", "loss_params"):
        if key in overrides:
            overrides[key] = tuple(tuple(item) for item in overrides[key])
    return dataclasses.replace(preset, **overrides).validate()


def flip_schedule(settings: Settings) -> np.ndarray:
    """swapped_TxK: whether pair k's labels are swapped at step t, for t = 0..steps."""
    swapped = np.zeros((settings.steps + 1, len(PAIRS)), bool)
    for step, pair in settings.flips:
        swapped[step:, pair] ^= True
    return swapped


def pair_logps(theta_PxR: jax.Array, swapped_K: jax.Array) -> losses.PairLogps:
    """The tabular log-probs of each pair's chosen/rejected reply under the current labels."""
    x, w, l = jnp.asarray(PAIRS).T
    w, l = jnp.where(swapped_K, l, w), jnp.where(swapped_K, w, l)
    logp_PxR = jax.nn.log_softmax(theta_PxR, axis=-1)
    ref_PxR = jnp.full_like(logp_PxR, -jnp.log(len(REPLIES)))  # π_ref: uniform, frozen
    ones_K = jnp.ones(len(PAIRS), jnp.float32)
    return losses.PairLogps(logp_PxR[x, w], logp_PxR[x, l], ref_PxR[x, w], ref_PxR[x, l], ones_K, ones_K)


def make_step(settings: Settings):
    """`step((theta_PxR, loss_state), swapped_K) -> ((next theta, next loss state), record of theta)`: one
    plain-GD step, jitted; `loss_state` holds the running means of a loss that keeps them (BCO), else None."""
    name, params = settings.loss, settings.loss_config()

    def summed_loss(logps: losses.PairLogps, loss_state) -> jax.Array:
        return losses.pair_losses(name, logps, params, loss_state).sum()

    def step(carry, swapped_K):
        theta_PxR, loss_state = carry
        logps = pair_logps(theta_PxR, swapped_K)
        loss_state = losses.update_loss_state(name, loss_state, logps, params)
        loss, metrics = losses.loss_and_metrics(name, logps, params, loss_state=loss_state)
        logp_PxR = jax.nn.log_softmax(theta_PxR, axis=-1)
        log_ratio_PxR = logp_PxR + jnp.log(len(REPLIES))
        reward_w = params.beta * (logps.policy_chosen - logps.reference_chosen)
        reward_l = params.beta * (logps.policy_rejected - logps.reference_rejected)
        record = {
            "probs": jnp.exp(logp_PxR),
            "rewards": params.beta * log_ratio_PxR,  # implicit reward β·log π/π_ref of every reply
            "loss": loss,
            "accuracy": metrics["rewards/accuracies"],
            "margin": metrics["rewards/margins"],
            "sigma": jax.nn.sigmoid(reward_l - reward_w),  # DPO's adaptive weight per pair
            # The weight the applied loss puts on ∇log π_w, in units of β (= sigma for dpo, 1 unweighted).
            "weight": -jax.grad(summed_loss)(logps, loss_state).policy_chosen / params.beta,
            "kl": jnp.sum(jnp.exp(logp_PxR) * log_ratio_PxR, axis=-1),  # KL(π‖π_ref) per prompt
        }
        grad_PxR = jax.grad(lambda t: summed_loss(pair_logps(t, swapped_K), loss_state))(theta_PxR)
        return (theta_PxR - settings.lr * grad_PxR, loss_state), record

    return jax.jit(step)


def run(preset: str | Settings = "align", **overrides: Any) -> dict[str, Any]:
    """Simulate a preset (with Settings overrides); arrays hold steps 0..steps (state after t steps)."""
    settings = resolve(preset, **overrides)
    step = make_step(settings)
    theta_PxR = jnp.zeros((len(PROMPTS), len(REPLIES)), jnp.float32)  # π starts as π_ref
    swapped_TxK = flip_schedule(settings)
    carry = (theta_PxR, losses.init_loss_state(settings.loss))
    _, records = jax.jit(lambda c, s: jax.lax.scan(step, c, s))(carry, swapped_TxK)
    history = {key: np.asarray(value) for key, value in records.items()}
    history.update(settings=settings, swapped=swapped_TxK, favourite=favourites(swapped_TxK[-1]))
    return history


def paired_losses() -> list[str]:
    """The registered losses of paired data: those the bandit's preference pairs can train."""
    return [name for name in losses.loss_names() if losses.takes(name, paired=True)]


def compare(preset: str | Settings = "align", names: Sequence[str] | None = None, **overrides: Any) -> list[dict]:
    """One row per loss (default: every paired loss) trained on the same preset: at the last step, the pairs'
    reward accuracy and mean margin, the mean KL(π‖π_ref), and π of each prompt's best reply by the final labels."""
    rows = []
    for name in names or paired_losses():
        history = run(preset, loss=name, **overrides)
        best = [history["probs"][-1][x, history["favourite"][x]] for x in range(len(PROMPTS))]
        rows.append({"loss": name, "accuracy": float(history["accuracy"][-1]),
                     "margin": float(history["margin"][-1]), "kl": float(history["kl"][-1].mean()),
                     "best_reply_probability": float(np.mean(best))})
    return rows


def format_comparison(rows: Sequence[dict]) -> str:
    """The `compare` rows as a fixed-width table."""
    lines = [f"{'loss':24s}{'accuracy':>9s}{'margin':>9s}{'KL':>8s}{'π(best)':>9s}"]
    lines += [f"{r['loss']:24s}{r['accuracy']:9.3f}{r['margin']:9.3f}{r['kl']:8.3f}{r['best_reply_probability']:9.3f}"
              for r in rows]
    return "\n".join(lines)


def favourites(swapped_K: np.ndarray) -> np.ndarray:
    """Per prompt, the reply winning the most pairs under these labels (ties: human order)."""
    wins = np.zeros((len(PROMPTS), len(REPLIES)))
    for (x, w, l), swapped in zip(PAIRS, swapped_K):
        wins[x, l if swapped else w] += 1
    return np.array([max(RANKING[x], key=lambda y: wins[x, y]) for x in range(len(PROMPTS))])


def describe_pairs() -> str:
    """The 12 preference pairs with their indices (for --flip)."""
    return "  ".join(f"{k}:{PROMPTS[x]} {REPLIES[w]}>{REPLIES[l]}" for k, (x, w, l) in enumerate(PAIRS))


def _ranking_text(x: int) -> str:
    return ">".join(REPLIES[y] for y in RANKING[x])


def _short(p: float) -> str:
    text = f"{p:.3f}"
    return "1.00" if text.startswith("1") else text[1:]  # .452, and 1.00 at or above 0.9995


def format_table(history: dict[str, Any], rows: int = 10) -> str:
    """A compact table of about `rows` steps: loss, mean σ, KL and every reply's probability."""
    s = history["settings"]
    flips = ", ".join(f"{t}:{k}" for t, k in s.flips) or "none"
    lines = [
        f"loss={s.loss} β={s.beta:g} lr={s.lr:g} steps={s.steps} flips={flips} · human ranking "
        + ", ".join(f"{p}: {_ranking_text(x)}" for x, p in enumerate(PROMPTS)),
        " step     loss mean σ     KL  "
        + "  ".join(f"π({p}: {' '.join(REPLIES)})".ljust(22) for p in PROMPTS),
    ]
    every = max(1, s.steps // rows)
    for t in sorted(set(range(0, s.steps + 1, every)) | {s.steps}):
        probs = "  ".join(" ".join(_short(p) for p in row).ljust(22) for row in history["probs"][t])
        lines.append(f"{t:5d} {history['loss'][t]:8.3f} {history['sigma'][t].mean():6.3f} "
                     f"{history['kl'][t].mean():6.3f}  {probs}")
    return "\n".join(line.rstrip() for line in lines)


def _rounded(value: Any) -> Any:
    # 6 significant digits and sorted keys keep the JSON byte-identical across runs.
    if isinstance(value, (np.ndarray, np.generic)):
        return _rounded(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def to_json(history: dict[str, Any]) -> str:
    """Every step's record, the settings and the dataset, as deterministic JSON."""
    keys = ("probs", "rewards", "loss", "accuracy", "margin", "sigma", "weight", "kl")
    steps = [{"step": t, **{k: _rounded(history[k][t]) for k in keys}} for t in range(len(history["loss"]))]
    document = {
        "settings": _rounded(dataclasses.asdict(history["settings"])),
        "prompts": list(PROMPTS),
        "replies": list(REPLIES),
        "ranking": _rounded(RANKING),
        "pairs": [{"index": k, "prompt": x, "chosen": w, "rejected": l} for k, (x, w, l) in enumerate(PAIRS)],
        "reference_probs": [[1 / len(REPLIES)] * len(REPLIES)] * len(PROMPTS),
        "steps": steps,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"


def plot(history: dict[str, Any], path: str | None = None, title: str | None = None):
    """Per prompt: probabilities now (bars) and at the start (ticks); then the preferred reply's
    probability and the KL over the steps. Green: the human favourite; red: the data's, if it differs."""
    # An object-oriented Figure on the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s, probs, kl = history["settings"], history["probs"], history["kl"]
    steps = np.arange(len(probs))
    fig = Figure(figsize=(8, 5.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for x, ax in enumerate(axes[0]):
        human, data = RANKING[x][0], history["favourite"][x]
        colours = ["#3a9a5b" if y == human else "#c8453c" if y == data else "#9aa4ad" for y in range(len(REPLIES))]
        bars = ax.bar(REPLIES, probs[-1, x], color=colours, width=0.6)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.scatter(REPLIES, probs[0, x], marker="_", s=900, color="#8fae7e", linewidths=3,
                   label="start (π_ref)", zorder=3)
        flipped = [f"{REPLIES[l]}>{REPLIES[w]}" for (px, w, l), f in zip(PAIRS, history["swapped"][-1]) if f and px == x]
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{PROMPTS[x]} · human ranking {_ranking_text(x)}"
                     + (f" · flipped {', '.join(flipped)}" if flipped else ""), fontsize=10)
    axes[0, 0].legend(loc="upper right", fontsize=8, frameon=False)
    ax_p, ax_kl = axes[1]
    for x in range(len(PROMPTS)):  # x1 dashed: with honest labels both prompts are the same problem
        human, data, style = RANKING[x][0], history["favourite"][x], "-" if x == 0 else (0, (4, 3))
        line, = ax_p.plot(steps, probs[:, x, human], ls=style, label=f"{PROMPTS[x]}: π({REPLIES[human]}), human's top")
        if data != human:
            ax_p.plot(steps, probs[:, x, data], ls=(0, (1, 1.5)), lw=2.2, color="#c8453c", zorder=3,
                      label=f"{PROMPTS[x]}: π({REPLIES[data]}), top of the mislabelled data")
        ax_kl.plot(steps, kl[:, x], ls=style, lw=1.2, color=line.get_color(), label=PROMPTS[x])
    ax_kl.plot(steps, kl.mean(-1), lw=2.5, color="k", alpha=0.35, label="mean")
    for t, _ in s.flips:
        for ax in (ax_p, ax_kl):
            ax.axvline(t, color="#c8453c", ls=":", lw=1)
    ax_p.axhline(1 / len(REPLIES), color="#8fae7e", lw=1)
    ax_p.set(ylim=(0, 1.02), xlabel="step", title="preferred reply's probability")
    ax_kl.set(ylim=(0, np.log(len(REPLIES)) * 1.05), xlabel="step", title="KL(π ‖ π_ref)  (max log 4)")
    ax_p.legend(fontsize=7, frameon=False, loc="lower right" if probs[-1].max() > 0.8 else "upper left")
    ax_kl.legend(fontsize=8, frameon=False)
    fig.suptitle(title or plot_title(history))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def _parse_pair(text: str, sep: str, kinds) -> tuple:
    try:
        a, b = text.split(sep)
        return kinds[0](a), kinds[1](b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A{sep}B, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bandit", description=__doc__.split("\n")[0],
        epilog=f"pairs: {describe_pairs()}")
    parser.add_argument("--preset", default="align", choices=sorted(PRESETS))
    parser.add_argument("--loss", help=f"any registered loss: {', '.join(losses.loss_names())}")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--flip", action="append", default=[], metavar="STEP:PAIR",
                        type=lambda v: _parse_pair(v, ":", (int, int)), help="swap a pair's labels from STEP on")
    parser.add_argument("--loss-param", action="append", default=[], metavar="KEY=VALUE",
                        type=lambda v: _parse_pair(v, "=", (str, float)), help="e.g. label_smoothing=0.1")
    parser.add_argument("--rows", type=int, default=10, help="about how many steps the table prints")
    parser.add_argument("--json", metavar="OUT", help="write every step as JSON")
    parser.add_argument("--plot", metavar="OUT.png")
    parser.add_argument("--pairs", action="store_true", help="list the preference pairs and exit")
    parser.add_argument("--compare", metavar="LOSS,LOSS,...|all",
                        help="train the preset with each loss (all: every paired loss) and print one row per loss")
    args = parser.parse_args(argv)
    if args.pairs:
        print(describe_pairs())
        return 0
    base = PRESETS[args.preset]
    if args.compare:
        names = None if args.compare == "all" else args.compare.split(",")
        try:
            rows = compare(base, names, steps=args.steps, beta=args.beta, lr=args.lr)
        except ValueError as error:
            parser.error(str(error))
        print(f"{args.preset}: " + format_comparison(rows))
        return 0
    try:
        history = run(base, loss=args.loss, steps=args.steps, beta=args.beta, lr=args.lr,
                      flips=base.flips + tuple(args.flip) if args.flip else None,
                      loss_params=base.loss_params + tuple(args.loss_param) if args.loss_param else None)
    except ValueError as error:
        parser.error(str(error))
    print(f"{args.preset}: " + format_table(history, args.rows))
    final = history["probs"][-1]
    print("final: " + "  ".join(
        f"{p} π({REPLIES[RANKING[x][0]]})={final[x, RANKING[x][0]]:.3f}" for x, p in enumerate(PROMPTS))
        + f"  KL={history['kl'][-1].mean():.4f}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(history))
    if args.plot:
        plot(history, args.plot, title=f"{args.preset}: " + plot_title(history))
    return 0


def plot_title(history: dict[str, Any]) -> str:
    s = history["settings"]
    return f"loss={s.loss}  β={s.beta:g}  lr={s.lr:g}  steps={s.steps}  ·  final KL {history['kl'][-1].mean():.3f}"


if __name__ == "__main__":
    sys.exit(main())
