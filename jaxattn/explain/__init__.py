"""Explanation metrics and methods: ERASER rationale metrics (:mod:`.eraser`), attention/gradient
agreement (:mod:`.agreement`) and X-MuTeST n-gram explanations (:mod:`.xmutest`)."""

from jaxattn.explain.agreement import gradient_importance, kendall_tau, pearson, per_instance
from jaxattn.explain.eraser import (AOPC_BINS, aopc, comprehensiveness, faithfulness, iou_f1, remove_tokens, spans,
                                    sufficiency, token_f1)
from jaxattn.explain.xmutest import (NGRAM_WEIGHTS, load_external_rationales, ngram_removal_scores,
                                     scores_to_rationales, union_rationales)

__all__ = [
    "gradient_importance", "kendall_tau", "pearson", "per_instance",
    "AOPC_BINS", "aopc", "comprehensiveness", "faithfulness", "iou_f1", "remove_tokens", "spans", "sufficiency",
    "token_f1",
    "NGRAM_WEIGHTS", "load_external_rationales", "ngram_removal_scores", "scores_to_rationales", "union_rationales"]
