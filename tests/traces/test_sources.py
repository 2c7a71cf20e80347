"""Trace sources: plain essay and code continuation, and the mix of the sources at several lengths."""

from __future__ import annotations

import itertools

import pytest

from kvpolicy.cli import main
from kvpolicy.data.code import SKIPPED_DIRS, read_source, source_paths, source_split, split_paths, stdlib_root
from kvpolicy.data.documents import iter_documents
from kvpolicy.data.essays import essay_split, load_essays
from kvpolicy.data.splits import SPLITS
from kvpolicy.errors import KVPError
from kvpolicy.traces.sources import MIX_CYCLE, longest_context, mix_plan, trace_prompts
from kvpolicy.traces.store import TraceReader


def test_essays_split_by_name_into_disjoint_sets():
    names = {split: {e.name for e in load_essays() if essay_split(e.name) == split} for split in SPLITS}
    assert all(names.values())  # every split holds essays
    assert sum(map(len, names.values())) == len(load_essays())
    assert essay_split(load_essays()[0].name) == essay_split(load_essays()[0].name)


def test_code_corpus_is_the_standard_library_split_by_path():
    paths = source_paths()
    assert len(paths) > 300 and list(paths) == sorted(paths)
    assert not any(SKIPPED_DIRS.intersection(p.split("/")[:-1]) for p in paths)
    assert "json/decoder.py" in paths and not any("torch" in p for p in paths)  # needle:code's haystack is torch.nn
    by_split = {split: split_paths(split) for split in SPLITS}
    assert all(by_split.values()) and sum(map(len, by_split.values())) == len(paths)
    source = read_source("json/decoder.py")
    assert source.text.startswith("# json/decoder.py\n") and "class JSONDecoder" in source.text
    assert (stdlib_root() / "json/decoder.py").is_file()


def test_mix_plan_cycles_sources_and_lengths_with_distinct_samples():
    plan = mix_plan(25, 1000)
    assert [(s, c) for s, _, c in plan[:len(MIX_CYCLE)]] == [(s, int(1000 * x)) for s, x in MIX_CYCLE]
    assert len(set(plan)) == 25  # no (source, index, length) twice
    for source, index, length in plan:  # each stream is numbered 0, 1, 2, ... in order of appearance
        earlier = [j for s, j, c in plan[: plan.index((source, index, length))] if (s, c) == (source, length)]
        assert index == len(earlier)
    assert {s for s, _, _ in plan} == {"ruler", "dialogue", "essays"}
    assert {c for _, _, c in plan} == {500, 1000, 2000} and longest_context("mix", 1000) == 2000
    assert longest_context("ruler", 1000) == 1000


@pytest.mark.model
def test_document_prompts_are_windows_followed_by_their_reference(smollm):
    docs = list(iter_documents(smollm, "test", 128))
    assert len(docs) > 20 and len({d.id for d in docs}) == len(docs)
    first, second = docs[0], docs[1]
    assert abs(smollm.encode(first.prompt).shape[1] - 128) <= 2  # re-encoding decoded text may merge a token
    assert second.prompt[:40] in first.prompt  # half-window stride: consecutive prompts overlap
    assert first.reference and first.reference[:40] in second.prompt  # what follows a window starts the next half
    with pytest.raises(KVPError, match="unknown split"):
        next(iter_documents(smollm, "dev", 128))


@pytest.mark.model
def test_code_prompts_are_windows_over_the_splits_files_in_path_order(smollm):
    docs = list(itertools.islice(iter_documents(smollm, "val", 128, corpus="code"), 30))
    first_file = next(p for p in source_paths() if source_split(p) == "val")
    assert docs[0].prompt.startswith(f"# {first_file}\n") and docs[0].id == "code-val-128-0"
    assert docs[1].prompt[:40] in docs[0].prompt and docs[0].reference[:40] in docs[1].prompt
    assert len({d.prompt for d in docs}) == 30
    prompts = list(trace_prompts(smollm, "code", "val", 3, 128))
    assert [p.prompt for p in prompts] == [d.prompt for d in docs[:3]]
    with pytest.raises(KVPError, match="unknown document corpus"):
        next(iter_documents(smollm, "val", 128, corpus="rust"))


@pytest.mark.model
def test_mix_prompts_carry_their_source_and_length(smollm):
    prompts = list(trace_prompts(smollm, "mix", "train", 10, 256, indices=[0, 1, 2, 3, 7, 9]))
    assert [p.index for p in prompts] == [0, 1, 2, 3, 7, 9]
    assert [p.meta["source"] for p in prompts] == ["ruler", "dialogue", "essays", "ruler", "essays", "ruler"]
    assert [p.meta["context_tokens"] for p in prompts] == [256, 256, 256, 128, 512, 512]
    essays = next(trace_prompts(smollm, "essays", "train", 1, 256))
    assert prompts[2].prompt == essays.prompt  # the mix's first essay prompt is the essays source's first


@pytest.mark.model
def test_mix_traces_record_and_train(smollm, tmp_path, one_thread):
    out, ckpt = tmp_path / "mix", tmp_path / "ckpt"
    assert main(["traces", "--source", "mix", "--n", "4", "--context", "256", "--future-tokens", "4",
                 "--baselines", "none", "--out", str(out)]) == 0
    reader = TraceReader(out)
    samples = reader.manifest["samples"]
    assert [s["source"] for s in samples] == ["ruler", "dialogue", "essays", "ruler"]
    assert reader.manifest["source"] == "mix" and "essays" in reader.manifest["source_description"]
    assert samples[3]["length"] < samples[0]["length"]  # the half-length RULER prompt
    assert main(["train", "--traces", str(out), "--out", str(ckpt), "--steps", "3", "--batch", "2", "--tokens", "32",
                 "--hidden", "8", "--val-every", "3", "--warmup", "1", "--no-compile"]) == 0
    assert (ckpt / "model.safetensors").is_file()


@pytest.mark.model
def test_mix_sample_ids_are_unique_across_lengths(smollm):
    prompts = list(trace_prompts(smollm, "mix", "train", 10, 256, indices=[0, 3]))  # ruler sample 0 at 1x and 0.5x
    assert prompts[0].id != prompts[1].id and prompts[0].id.startswith("mix/0/ruler/")
