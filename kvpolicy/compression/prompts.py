"""Split a (context, question) prompt into the token chunks the two protocols feed separately.

Same split as kvpress's pipeline: the chat template is rendered around context + question (a base model's plain-text
prompt, `ModelHandle.chat`, for a model without one), the context is everything before the question, and the
question chunk carries the template's tail and the answer prefix.
"""

from __future__ import annotations

import torch

from kvpolicy.models import ModelHandle


def split_prompt(
    handle: ModelHandle, context: str, question: str, answer_prefix: str = "", template: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context_ids (1, Tc), question_ids (1, Tq)); their concatenation is the whole prompt.

    template=False feeds the plain text "{context}{question}\n{answer_prefix}" without chat template or BOS, as
    lm-eval-harness does by default (so that zero-shot scores compare with published ones)."""
    if not template:
        context_text, tail = context, "\n"
    else:
        separator = "#" * (len(context) + 10)
        context_text, tail = handle.chat([{"role": "user", "content": context + separator}]).split(separator)
    return handle.encode(context_text), handle.encode(question + tail + answer_prefix)
