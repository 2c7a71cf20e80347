"""Sampling on SmolLM2: cuts decoded as one batch sample what each samples alone with the same settings."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.compression.budget import Budget
from kvpolicy.compression.engine import compress, decode_answers, prefill
from kvpolicy.compression.scorers import make_scorer
from kvpolicy.compression.state import stack_states
from kvpolicy.data.essays import load_essays
from kvpolicy.models.decoding import Sampling

pytestmark = pytest.mark.model


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_batch_row_samples_what_it_samples_alone(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kvpolicy.models import load_model

    handle = load_model("smollm2-135m", device=device, dtype="float32")
    full, _ = prefill(handle, handle.encode(load_essays()[1].text)[:, :64])
    cuts = [compress(handle, full, make_scorer(name), Budget(tokens=40)) for name in ("knorm", "streaming_llm")]
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=11)
    alone = [decode_answers(handle, cut.branch(), cut.logits, 4, (), sampling=sampling)[0].tokens for cut in cuts]
    batch = stack_states(cuts)
    assert [a.tokens for a in decode_answers(handle, batch, batch.logits, 4, (), sampling=sampling)] == alone
