"""The zero-shot benchmarks follow the ecosystem's conventions: lm-eval-harness's prompts, acc and acc_norm, and
standard error of the mean; LongBench's metric names; results files that record several metrics of one answer, and
refuse zero-shot records scored the old way. Ends with the zero-shot sweep on the real model over the fixtures."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from kvpolicy.compression.prompts import split_prompt
from kvpolicy.models.handle import ModelHandle
from kvpolicy.errors import KVPError
from kvpolicy.evaluation.metrics import choice_metrics, mean_stderr, mean_stderr_reference
from kvpolicy.evaluation.qa import continuations
from kvpolicy.evaluation.result import FULL, Result
from kvpolicy.evaluation.store import read_results
from kvpolicy.evaluation.names import QUERY_AWARE
from kvpolicy.evaluation.qa import QATask
from kvpolicy.evaluation.tasks import resolve_tasks
from kvpolicy.report.aggregate import curve_groups
from kvpolicy.report.tables import group_table

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hub"
ZERO_SHOT = ("boolq", "arc_challenge", "gov_report", "passage_retrieval_en")
LOCAL = {name: str(FIXTURES / f"{name}.jsonl") for name in ZERO_SHOT}


def test_acc_norm_divides_by_the_choice_length_and_can_disagree_with_acc():
    # the long choice is less likely in total but more likely per character
    assert choice_metrics([-3.0, -4.0], ["ab", "abcdef"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert choice_metrics([-3.0, -4.0], ["ab", "abcdef"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
    # lm-eval's len(choice) counts characters ("é" is 1 character, 2 bytes): -1/1 < -1.5/2 picks "ab"
    assert choice_metrics([-1.0, -1.5], ["é", "ab"], gold=1)["acc_norm"] == 1.0
    assert choice_metrics([-2.0, -2.0], ["no", "no"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}  # ties: the first


def test_stderr_is_lm_evals_sample_std_over_sqrt_n():
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)  # std (ddof=1) 0.5, over sqrt(4)
    assert mean_stderr([1.0]) is None and mean_stderr([]) is None
    rng = random.Random(0)
    for _ in range(50):
        values = [rng.random() for _ in range(rng.randint(2, 40))]
        assert mean_stderr(values) == pytest.approx(mean_stderr_reference(values), rel=1e-12)


def _lm_eval_text(task: QATask, sample) -> str:
    """The text a model without a chat template reads: split_prompt's two parts, tokens left as text."""
    plain = ModelHandle(info=None, model=None, tokenizer=SimpleNamespace(chat_template=None, bos_token=""))
    plain.encode = lambda text: text
    prompt = task.prompt(sample)
    context, question = split_prompt(plain, prompt.context, prompt.question, prompt.answer_prefix)
    return context + question


def test_boolq_and_arc_prompts_are_lm_evals():
    tasks = {t.name: t for t in resolve_tasks(["boolq", "arc_challenge"], LOCAL)}
    boolq = tasks["boolq"].load(None, 1, None, 0)[0]
    assert _lm_eval_text(tasks["boolq"], boolq) == (
        "On a clear day the sky appears blue because of Rayleigh scattering.\n"
        "Question: is the sky blue on a clear day?\nAnswer:")
    assert continuations(boolq) == [" no", " yes"] and boolq.answers == ("yes",)
    (arc,) = tasks["arc_challenge"].load(None, 1, None, 0)
    assert _lm_eval_text(tasks["arc_challenge"], arc) == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:")
    assert continuations(arc) == [" Planetary density will decrease.", " Planetary years will become longer.",
                                  " Planetary days will become shorter.", " Planetary gravity will become stronger."]
    assert arc.answers == ("Planetary days will become shorter.",)


def test_multiple_choice_tasks_report_lm_evals_metrics_only():
    with pytest.raises(KVPError, match="reports acc, acc_norm, not accuracy"):
        QATask(name="mc", family="f", data="d", metric="accuracy", protocols=(QUERY_AWARE,), sized=False,
               choices=True)
    with pytest.raises(KVPError, match="only a multiple-choice task records extra metrics"):
        QATask(name="gen", family="f", data="d", metric="rouge_l", protocols=(QUERY_AWARE,), sized=False,
               extra_metrics=("acc_norm",))


def _record(sample: str, value: float, acc_norm: float, budget: str = "b64") -> Result:
    return Result(model_fingerprint="fp", scorer_id="s", budget=budget, task="arc_challenge", context_tokens=None,
                  protocol=QUERY_AWARE, seed=0, sample=sample, model="m", scorer="knorm", scorer_label="KNorm",
                  family="zero-shot (hub)", data="ARC-Challenge", metric="acc", kept=64, value=value, seconds=0.1,
                  extra_metrics={"acc_norm": acc_norm})


def test_report_shows_every_metric_of_an_answer_with_its_standard_error():
    records = [_record(f"s{i}", value, norm) for i, (value, norm) in enumerate([(1, 0), (0, 0), (1, 1), (1, 0)])]
    groups = {g.metric: g for g in curve_groups(records)}
    assert set(groups) == {"acc", "acc_norm"} and groups["acc"].title().startswith("acc vs KV cache size")
    for metric, values in (("acc", [1, 0, 1, 1]), ("acc_norm", [0, 0, 1, 0])):
        (point,) = groups[metric].panels[0].lines[0].points
        assert point.y == pytest.approx(100 * sum(values) / 4) and point.n == 4
        assert point.stderr == pytest.approx(100 * mean_stderr_reference(values))
    table = group_table(groups["acc"])
    assert table.rows[0][2].startswith("75.0 ± 25.0 [") and "standard error of the mean" in table.title
    (single,) = curve_groups(records[:1])[0].panels[0].lines[0].points
    assert single.stderr is None and group_table(curve_groups(records[:1])[0]).rows[0][2] == "100.0"


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_schema_2_records_are_read_unless_their_task_was_rescored(tmp_path):
    ruler = {**_record("r", 1.0, 1.0).to_json(), "task": "ruler:vt", "metric": "accuracy", "schema": 2}
    del ruler["extra_metrics"]
    assert [r.task for r in read_results(_write(tmp_path / "ruler.jsonl", [ruler])).records] == ["ruler:vt"]
    old_arc = {**ruler, "task": "arc_challenge"}
    with pytest.raises(KVPError, match=r"arc.jsonl:1 holds a arc_challenge result of schema 2, scored before .* "
                                       "lm-eval-harness; re-run the sweep into a new results file"):
        read_results(_write(tmp_path / "arc.jsonl", [old_arc]))


@pytest.mark.parametrize("extra, problem", [
    ({"bleu": 1.0}, "field 'extra_metrics' names 'bleu', not one of accuracy, acc, acc_norm"),
    ({"acc_norm": "high"}, "field 'extra_metrics.acc_norm' must be a number"),
])
def test_extra_metrics_are_known_scores(tmp_path, extra, problem):
    record = _record("s", 1.0, 1.0).to_json() | {"extra_metrics": extra}
    with pytest.raises(KVPError, match=f"r.jsonl:1: {problem}"):
        read_results(_write(tmp_path / "r.jsonl", [record]))


def _log_likelihoods(handle, task: QATask, sample) -> list[float]:
    """Each choice's summed log-probability after the whole prompt, by one plain forward of the model."""
    prompt = task.prompt(sample)
    prefix = torch.cat(split_prompt(handle, prompt.context, prompt.question, prompt.answer_prefix), dim=1)
    lls = []
    for text in continuations(sample):
        ids = handle.encode(text)
        with torch.no_grad():
            logits = handle.model(torch.cat([prefix, ids], dim=1)).logits[0, prefix.shape[1] - 1:-1].float()
        lls.append(float(logits.log_softmax(-1).gather(1, ids[0, :, None]).sum()))
    return lls


@pytest.mark.model
def test_zero_shot_sweep_on_the_fixtures_follows_the_conventions(smollm, tmp_path):
    from kvpolicy.evaluation.sweep import SweepConfig, run_sweep
    from kvpolicy.report.summary import summary_text

    rows = [json.loads(line) for line in (FIXTURES / "gov_report.jsonl").read_text().splitlines()]
    parquet = tmp_path / "gov_report.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    out = tmp_path / "results.jsonl"
    run_sweep(SweepConfig(out=str(out), scorers=["knorm"], budgets=["24"], tasks=list(ZERO_SHOT), n_samples=2,
                          max_new_tokens=4, hub_local=LOCAL | {"gov_report": str(parquet)}))
    records = read_results(out).records
    metrics = {(r.task, r.metric, tuple(r.extra_metrics or ())) for r in records}
    assert metrics == {("boolq", "acc", ()), ("arc_challenge", "acc", ("acc_norm",)), ("gov_report", "rouge_l", ()),
                       ("passage_retrieval_en", "retrieval_score", ())}
    assert len([r for r in records if r.task == "boolq"]) == 4  # 2 samples × (full cache, knorm at 24)
    assert all(0.0 <= v <= 1.0 for r in records for v in [r.value, *(r.extra_metrics or {}).values()])
    tasks = {t.name: t for t in resolve_tasks(["arc_challenge", "boolq"], LOCAL)}
    full_cache = [r for r in records if r.scorer == FULL and r.task in tasks]
    assert len(full_cache) == 3  # two BoolQ questions, one ARC question
    for r in full_cache:
        task = tasks[r.task]
        sample = next(s for s in task.load(None, 2, None, 0) if s.id == r.sample)
        lls = _log_likelihoods(smollm, task, sample)
        expected = choice_metrics(lls, sample.choices, sample.choices.index(sample.answers[0]))
        assert r.prediction == sample.choices[max(range(len(lls)), key=lls.__getitem__)]
        assert r.value == expected["acc"] and (r.extra_metrics or {}) == {
            name: expected[name] for name in task.extra_metrics}
    text = summary_text(records)
    for title in ("acc vs KV cache size", "acc_norm vs KV cache size", "rouge_l vs KV cache size",
                  "retrieval_score vs KV cache size"):
        assert title in text
    assert " ± " in text  # BoolQ's two samples give a standard error
