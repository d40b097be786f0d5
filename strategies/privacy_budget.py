"""The privacy budget of a study under `privacy.dp`: epsilon spent so far at `privacy.delta`,
after every aggregated round, and `privacy.max-epsilon`, which stops the study before a
round would spend more.

Why not Flower's own accountant: Flower 1.41's `RdpAccountant` is accepted by its
fixed-clipping wrappers only around an unmodified `FedAvg.aggregate_train` with equal
client weights (it raises otherwise), and not at all by the adaptive wrappers. fedir's
strategies are Flower's classes with per-site capture and validation mixed in, and FedAvg
weights each site by its labelled patients (`num-examples`), so those conditions do not
hold. The accounting here uses dp-accounting (Google's maintained library, which Flower's
accountant wraps) directly, with the conditions of fedir's modes:

- every round that is aggregated is one Gaussian mechanism, composed over rounds with
  Renyi DP (`dp_accounting.rdp.RdpAccountant`, its default orders), converted to epsilon at
  `privacy.delta`; neighbouring federations differ by one site's data (add or remove one
  site), which is Flower's `ADD_OR_REMOVE_ONE` relation;
- no amplification by sampling: the accounting is that of a round in which every sampled
  site takes part (fedir samples every site when `strategy.fraction-train` = 1, and
  Flower's sampling is not Poisson in any case);
- the sensitivity: Flower clips each site's update to the bound C and adds noise of
  standard deviation z C / m to the average (m = the sites sampled per round). In an
  average weighted by num-examples, one site moves the average by at most C s, s its
  share of the round's weight, so the noise multiplier that round truly has is
  z_eff = z / (m s_max), s_max the largest share among the round's sites. With equal
  weights and every sampled site answering, s_max = 1/m and z_eff = z: then the figures
  are exactly those of Flower's accountant (tests/test_privacy_budget.py). The site sizes
  are treated as public (each site's data card already reports them);
- adaptive clipping: Flower splits the noise between the clipped count (std
  `clipped-count-stddev`) and the update so that the two together cost what one Gaussian
  mechanism of multiplier z costs (Andrew et al. 2021, Theorem 1; Flower's
  `compute_adaptive_noise_params`), so a round is accounted at z_eff computed from z alike.

A round that Flower does not aggregate (a site's reply is an error) releases nothing and
is not accounted. A round whose updates are all rejected by fedir's validation is still
accounted (an over-estimate, never an under-estimate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fedir.strategies.stopping import StudyStopped

ACCOUNTANT = ("dp-accounting RDP: one Gaussian mechanism per aggregated round, no sampling "
              "amplification, add-or-remove-one site")


class BudgetExhausted(StudyStopped):
    """The next round would spend more than `privacy.max-epsilon`: the study stops before
    that round's noised average is released."""

    kind = "privacy_budget"

    def __init__(self, server_round: int, projected: float, max_epsilon: float) -> None:
        super().__init__(server_round, f"stopped: round {server_round} would spend epsilon {projected:.3f} "
                                       f"> max {max_epsilon:g}")
        self.projected = projected
        self.max_epsilon = max_epsilon


def epsilon_of(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon at `delta` of the Gaussian mechanisms with these noise multipliers, composed
    (inf when any has no noise; 0 before any)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    accountant = RdpAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


def effective_noise(noise_multiplier: float, sampled: int, weights: Sequence[float]) -> float:
    """The noise multiplier a round truly has when Flower's noise (z C / sampled) is added
    to an average weighted by `weights`: z / (sampled x the largest share)."""
    total = float(sum(weights))
    if total <= 0:  # no weight at all: the average is not taken as weighted
        return noise_multiplier
    return noise_multiplier / (sampled * max(weights) / total)


class PrivacyBudget:
    """The rounds' noise multipliers so far, the epsilon they spend, and the limit."""

    def __init__(self, noise_multiplier: float, sampled: int, delta: float, max_epsilon: float = 0.0,
                 spent: Sequence[float] = ()) -> None:
        self.noise_multiplier = noise_multiplier
        self.sampled = sampled
        self.delta = delta
        self.max_epsilon = max_epsilon  # 0: no limit
        self.spent = list(spent)  # the effective noise multiplier of each accounted round

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.spent, self.delta)

    def release(self, server_round: int, weights: Sequence[float]) -> float:
        """Account one aggregated round with these site weights and return the epsilon so
        far; BudgetExhausted (nothing accounted) when it would pass `max_epsilon`."""
        z = effective_noise(self.noise_multiplier, self.sampled, weights)
        projected = epsilon_of([*self.spent, z], self.delta)
        if self.max_epsilon and projected > self.max_epsilon:
            raise BudgetExhausted(server_round, projected, self.max_epsilon)
        self.spent.append(z)
        return projected
