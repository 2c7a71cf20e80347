"""Hub loaders offline: LongBench through its parquet export's code path on parquet files written in the export's
schema, and every way loading can fail (no network, not found, a script-based dataset, the hub refusing, a bad
local file) as one KVPError line that says what to do."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import datasets
import httpx
import pytest
from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import parse_hf_uri

from kvpolicy.data.hub import HUB_SOURCES, load_hub
from kvpolicy.errors import KVPError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hub"
LONGBENCH = ("gov_report", "passage_retrieval_en")
# the features of THUDM/LongBench's loading script, which its parquet export keeps
LONGBENCH_FEATURES = datasets.Features({
    "input": datasets.Value("string"), "context": datasets.Value("string"),
    "answers": datasets.Sequence(datasets.Value("string")), "length": datasets.Value("int32"),
    "dataset": datasets.Value("string"), "language": datasets.Value("string"),
    "all_classes": datasets.Sequence(datasets.Value("string")), "_id": datasets.Value("string"),
})


@pytest.fixture
def parquet_export(tmp_path: Path) -> Path:
    """A local copy of the export's layout, {config}/test/0000.parquet, from the JSONL schema fixtures."""
    for config in LONGBENCH:
        rows = [json.loads(line) for line in (FIXTURES / f"{config}.jsonl").read_text().splitlines()]
        path = tmp_path / config / "test" / "0000.parquet"
        path.parent.mkdir(parents=True)
        datasets.Dataset.from_list(rows, features=LONGBENCH_FEATURES).to_parquet(str(path))
    return tmp_path


def test_longbench_reads_the_hubs_parquet_export():
    for config in LONGBENCH:
        source = HUB_SOURCES[config]
        uri = parse_hf_uri(source.files)
        assert (uri.type, uri.id, uri.revision) == ("dataset", "THUDM/LongBench", "refs/convert/parquet")
        assert uri.path_in_repo == f"{config}/test/*.parquet" and source.split == "test"


@pytest.mark.parametrize("config", LONGBENCH)
def test_longbench_export_code_path_on_local_parquet(parquet_export, monkeypatch, config):
    pattern = str(parquet_export / config / "test" / "*.parquet")  # the export's glob, on this machine
    monkeypatch.setitem(HUB_SOURCES, config, replace(HUB_SOURCES[config], files=pattern))
    (sample,) = load_hub(config)
    (expected,) = load_hub(config, local=FIXTURES / f"{config}.jsonl")
    assert sample == expected and sample.context and sample.answers
    (from_file,) = load_hub(config, local=parquet_export / config / "test" / "0000.parquet")
    assert from_file == expected


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_offline_hub_is_one_line_saying_what_to_do(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name in ("gov_report", "boolq"):  # a parquet export, a hub dataset's own loader
        with pytest.raises(KVPError) as err:
            load_hub(name)
        message = _one_line(err)
        assert message.startswith(f"cannot load '{name}' from the Hugging Face hub (")
        assert "connect to the internet" in message and f"--hub-local {name}=FILE" in message


def test_script_based_dataset_is_one_line_pointing_to_the_parquet_export(tmp_path, monkeypatch):
    script = tmp_path / "LongBench" / "LongBench.py"
    script.parent.mkdir()
    script.write_text("raise SystemExit('a dataset script must never run')\n")
    monkeypatch.setitem(HUB_SOURCES, "gov_report",
                        replace(HUB_SOURCES["gov_report"], hub_id=str(script.parent), files=None))
    with pytest.raises(KVPError) as err:
        load_hub("gov_report")
    message = _one_line(err)
    assert "RuntimeError: Dataset scripts are no longer supported, but found LongBench.py" in message
    assert "refs/convert/parquet" in message and "--hub-local gov_report=" in message


def _http_error(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/datasets/x"))


@pytest.mark.parametrize("failure, advice", [
    (RuntimeError("Dataset scripts are no longer supported, but found LongBench.py"), "parquet export"),
    (ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (ConnectError)"), "connect to the internet"),
    (OfflineModeIsEnabled("offline mode is enabled"), "connect to the internet"),
    (httpx.ConnectError("[Errno -2] Name or service not known"), "connect to the internet"),
    (httpx.ReadTimeout("timed out"), "connect to the internet"),
    (DatasetNotFoundError("Dataset 'THUDM/LongBench' doesn't exist on the Hub\nor cannot be accessed."),
     "still exists"),
    (DataFilesNotFoundError("No (supported) data files found in THUDM/LongBench"), "still exists"),
    (FileNotFoundError("Unable to find 'hf://datasets/THUDM/LongBench@refs/convert/parquet/x'"), "still exists"),
    (EntryNotFoundError("404 Client Error. Entry Not Found"), "still exists"),
    (GatedRepoError("401 Client Error. Cannot access gated repo", response=_http_error(401)), "hf auth login"),
    (HfHubHTTPError("500 Server Error: Internal Server Error", response=_http_error(500)), "hf auth login"),
])
def test_every_hub_failure_is_one_line_saying_what_to_do(monkeypatch, failure, advice):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(datasets, "load_dataset", fail)
    for name in ("gov_report", "arc_challenge"):
        with pytest.raises(KVPError) as err:
            load_hub(name)
        message = _one_line(err)
        assert message.startswith(f"cannot load '{name}' from the Hugging Face hub ({HUB_SOURCES[name].location}): "
                                  f"{type(failure).__name__}: ")
        assert advice in message and f"--hub-local {name}=FILE" in message


def test_bad_local_files_are_one_line(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")
    with pytest.raises(KVPError) as err:
        load_hub("gov_report", local=broken)
    assert _one_line(err).startswith(f"cannot read local file {broken} for 'gov_report': ")
    assert "in the schema of THUDM/LongBench" in str(err.value)
    with pytest.raises(KVPError) as err:  # BoolQ rows are not ARC rows
        load_hub("arc_challenge", local=FIXTURES / "boolq.jsonl")
    assert "lack the field 'choices' of the schema of allenai/ai2_arc" in _one_line(err)
    with pytest.raises(KVPError, match="is not a .json/.jsonl/.parquet file; give an existing"):
        load_hub("boolq", local=tmp_path / "boolq.csv")
