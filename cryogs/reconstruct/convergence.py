"""When to stop fitting: the loss on held-out particles, which the fit never trains on.

A fixed budget of epochs either stops a fit that could still improve or, more often, goes on long
after the map has stopped improving: on 1,000 simulated adenylate-kinase particles (SNR 1 and 0.1)
the FSC against the truth was best after 6–8 epochs of the 20 the budget gave, and 0.04–0.08 Å
worse at the end, as the model fitted noise.

The held-out loss cannot fall by fitting noise. With a held-out image ``I = s + n`` (signal and
noise independent of the model), the change of its loss between two epochs is the change of
``‖s − Γ‖²`` plus ``2⟨n, ΔΓ⟩``, whose expectation is zero: its fall estimates, without bias, how
much the model's projections moved towards the truth. The same images (and so the same noise) are
scored every epoch, so the per-image changes are paired and their standard error is what the
improvement must beat to be real.

The rule: after each epoch ``e`` (from :data:`MIN_EPOCHS` on), the improvement ``Δ`` over the last
:data:`SPAN` epochs (mean over held-out images of their loss after epoch ``e − SPAN``, or at the
start, minus their loss now) is compared with its standard error ``SE``. The fit has converged once
``Δ ≤ Z·SE``: over several epochs the data no longer show that the model improves. The fit then
ends with :data:`ANNEAL_EPOCHS` epochs (fewer if the budget ends sooner) whose learning rate falls
to the schedule's final value, on all particles, the held-out ones included.

Why several annealing epochs: a rule that fires early leaves the learning rate high, and the map
then carries the optimiser's step noise, which the annealing averages away; more steps at falling
rates average more. On 1,000 ADK particles at SNR 0.01 (box 64, 1.5 Å, CTF, random start, seeds
0–3; the rule fired after epochs 4–6) one annealing epoch ended at correlations 0.968–0.971 with
the truth and FSC 0.5 of 5.66–6.09 Å (mean 5.82), three at 0.972–0.973 and 5.69–5.88 Å (mean 5.75),
for about 2 s more; a plain Adam fit over a fixed 8-epoch schedule reached 0.972 and 5.62 Å.

Why several epochs: late in a fit the held-out loss falls by about its standard error per epoch
while the map still sharpens. On the demo's 1,000 CTF-free particles (48 px, SNR 1), epoch-to-epoch
falls of 0.8–2.6 SE went on to epoch 12 while the FSC against the truth improved from 5.69 Å
(epoch 5) to a plateau of 5.52–5.56 Å (epochs 7–20); a rule on single epochs (2 SE, two quiet
epochs in a row) stopped at epoch 5, one on three-epoch falls at epoch 7. On 1,000 particles of
the quality benchmark (64 px, 1.5 Å, CTF, SNR 1) the FSC was best after 7 epochs (3.49 Å) and within
0.03 Å of it from then on; there the rule on three-epoch falls waits longer than it needs, to epoch
13 (3.52 Å; the single-epoch rule stopped at 8): it errs on the side of training, which costs time,
not map quality. A noise-free fit, whose held-out loss keeps falling far above its standard error,
runs its whole budget.
"""
from __future__ import annotations

import numpy as np

__all__ = ["heldout_indices", "HeldOutRule", "ANNEAL_EPOCHS"]

#: Fraction of the particles held out, and its bounds (fewer than HELDOUT_MIN: no rule).
HELDOUT_FRACTION, HELDOUT_MIN, HELDOUT_MAX = 0.1, 64, 512
#: The fit still improves while the held-out loss falls by more than Z standard errors over SPAN epochs.
Z = 2.0
SPAN = 3
#: Epochs always trained before the rule may stop a fit.
MIN_EPOCHS = 3
#: Epochs of falling learning rate after the rule has fired.
ANNEAL_EPOCHS = 3


def heldout_indices(n: int, seed: int) -> np.ndarray | None:
    """Sorted indices of the particles held out of a fit of ``n`` (seeded), or None when fewer than
    :data:`HELDOUT_MIN` would be."""
    k = min(HELDOUT_MAX, int(HELDOUT_FRACTION * n))
    if k < HELDOUT_MIN:
        return None
    return np.sort(np.random.default_rng([seed, 4242]).choice(n, size=k, replace=False))


class HeldOutRule:
    """The stopping rule on per-image held-out losses, one array per epoch (see the module)."""

    def __init__(self):
        self.recent: list[np.ndarray] = []  # per-image losses of the last SPAN epochs, oldest first
        self.history: list[dict] = []  # per epoch: loss, improvement over SPAN epochs, its standard error

    def update(self, epoch: int, losses: np.ndarray) -> bool:
        """Record epoch ``epoch``'s (1-based; 0 is the start) held-out losses; True when the fit has converged."""
        losses = np.asarray(losses, dtype=np.float64)
        row = {"epoch": epoch, "loss": float(losses.mean()), "improvement": None, "standard_error": None}
        quiet = False
        if self.recent:
            change = self.recent[0] - losses
            se = float(change.std(ddof=1) / np.sqrt(len(change)))
            row.update(improvement=float(change.mean()), standard_error=se)
            quiet = change.mean() <= Z * se
        self.recent = (self.recent + [losses])[-SPAN:]
        self.history.append(row)
        return epoch >= MIN_EPOCHS and quiet

    def reason(self) -> str:
        last = self.history[-1]
        return (f"converged: the held-out loss fell by less than {Z:g} standard errors over {SPAN} epochs "
                f"({last['improvement']:.2e} ± {last['standard_error']:.1e})")

    def state_dict(self) -> dict:
        return {"recent": self.recent, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.recent, self.history = state["recent"], state["history"]
