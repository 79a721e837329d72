"""DR-LoRA: expert ranks that grow during fine-tuning, under a total rank budget (docs/algorithms.md §5).

Deng et al., "DR-LoRA: Dynamic Rank LoRA for Mixture-of-Experts Adaptation", arXiv 2601.04823. No reference code
exists; the equations below are the spec's reconstruction (its [OURS] choices are marked there).

Parameterisation. Every expert keeps its full capacity ``r_max`` (= ``MoLoraConfig.r``) in the stacked bank
``A[E, d_in, r_max]``, ``B[E, r_max, d_out]``, plus a binary rank mask ``mu[E, r_max]`` whose first ``R_e`` entries
are on::

    delta_e(x) = s * (x @ (A_e * mu_e)) @ (mu_e[:, None] * B_e),      s = lora_alpha / r_target (constant)

The mask multiplies ``A`` and ``B`` before the unchanged expert kernels run, so masked components get exactly zero
gradient. The scaling uses the target rank, never ``R_e``: rescaling at every growth event would change what the
already-trained components compute.

Signals (per optimizer step):

* routing frequency, an EMA of the masked mean router probability (or gate) of each expert::

      f_e <- beta_f * f_e + (1 - beta_f) * mean_t w_{t,e}                     (f starts at 1/E)

* rank importance, AdaLoRA's sensitivity on every active element ``theta`` of ``A_e``/``B_e``::

      I = |theta * dL/dtheta|,  Ibar <- b1 Ibar + (1-b1) I,  Ubar <- b2 Ubar + (1-b2) |I - Ibar|
      sigma_{e,j} = mean over A_e[:, j] and B_e[j, :] of Ibar * Ubar
      I_e = mean over active components j of sigma_{e,j}

Saliency ``S_{l,e} = (f_{l,e} / sum_j f_{l,j}) * (I_{l,e} / sum_{l',j} I_{l',j})`` (frequency normalised per
layer, importance over all layers). At each growth event the ``m`` most salient experts (over all layers) that can
still grow by ``growth_step`` do so, until ``sum R = L * E * r_target``.

Growth preserves the function: a newly switched-on component ``j`` gets a fresh kaiming-uniform row ``A_e[:, j]``
and a zero column ``B_e[j, :]``, its importance EMAs restart at zero, and its optimizer moments are zeroed.

State per bank and adapter lives in a :class:`DynamicRankState` submodule (``molora_rank[adapter]`` on a
:class:`~molora.adapters.MoLoraLayer`; ``molora_rank_gate_up`` / ``molora_rank_down`` on the LoRA of fused MoE experts,
:mod:`molora.adapters.moe_experts`):

* ``activated_at[E, r_max]`` (int64, **persistent**): the optimizer step at which each component was switched on
  (0 for the initial ones, -1 while dormant). It is the rank mask (``>= 0``) and the rank history at once.
* ``freq[E]`` and ``importance[E]`` (fp32, **persistent**): the saliency signals, so that a resumed run and
  ``molora inspect`` see them.
* the element-wise importance EMAs (4 tensors the size of ``A`` and ``B``) are **not** in the adapter: they would
  make the adapter file five times larger. :class:`~molora.training.DynamicRankCallback` writes them into each
  Trainer checkpoint (:data:`SALIENCY_FILE`) and reads them back when training resumes from one, so a resumed run
  grows as the uninterrupted one; :func:`saliency_state` / :func:`load_saliency_state` do it for a custom loop.

Layout: :mod:`.state` (hyper-parameters, per-bank state, the equations, the schedule) and :mod:`.growth` (whole-model
operations: saliency updates, growth events, statistics, saved adapters, compaction).
"""

from __future__ import annotations

from .growth import (
    RANK_GROUPS,
    SALIENCY_FILE,
    RankStats,
    compact_adapter,
    dynamic_rank_banks,
    format_rank_table,
    get_rank_stats,
    grow,
    load_saliency_state,
    maybe_grow,
    rank_history,
    rank_stats_from_adapter,
    rank_summary,
    saliency_state,
    schedule_for,
    update_importance,
)
from .state import (
    FREQ_SOURCES,
    DynamicRankParams,
    DynamicRankState,
    GrowthSchedule,
    allocate,
    build_dynamic_rank_params,
    ema_frequency,
    resolve_schedule,
    saliency_scores,
    sensitivity_ema,
)

__all__ = [
    "FREQ_SOURCES",
    "DynamicRankParams",
    "DynamicRankState",
    "GrowthSchedule",
    "RANK_GROUPS",
    "RankStats",
    "SALIENCY_FILE",
    "allocate",
    "build_dynamic_rank_params",
    "compact_adapter",
    "dynamic_rank_banks",
    "ema_frequency",
    "format_rank_table",
    "get_rank_stats",
    "grow",
    "load_saliency_state",
    "maybe_grow",
    "rank_history",
    "rank_stats_from_adapter",
    "rank_summary",
    "resolve_schedule",
    "saliency_scores",
    "saliency_state",
    "schedule_for",
    "sensitivity_ema",
    "update_importance",
]
