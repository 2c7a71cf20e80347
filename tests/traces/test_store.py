"""Sharded trace store: round trip, locality of reads, corruption and truncation named, resume, refusals, full disk,
manifest and shard header schemas, shard names confined to the directory, shards flushed by count and age."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelIdentity, ModelInfo
from kvpolicy.traces import store
from kvpolicy.traces.store import MANIFEST, TraceReader, TraceWriter, shard_paths, write_manifest

L, H, D = 3, 2, 8
INFO = ModelInfo("tiny", "llama", L, H, 4, D, 512, "f00d")


def config(fingerprint="f00d", split="train"):
    model = INFO.to_dict() | {"fingerprint": fingerprint}
    return {"format": store.FORMAT, "model": model, "source": "ruler", "split": split, "context_tokens": 64,
            "future": {"mode": "greedy", "max_tokens": 4}, "seeds": {"ruler_seed": 0},
            "baselines": {"names": ["tova"]}, "code_version": "test"}


def sample_tensors(index: int, length: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(index)
    return {"keys": torch.randn(L, H, length, D, generator=gen).half(),
            "values": torch.randn(L, H, length, D, generator=gen).half(),
            "utility": torch.rand(L, H, length, generator=gen),
            "baseline.tova": torch.rand(L, H, length, generator=gen)}


def record(index: int, length: int) -> dict:
    return {"id": f"s{index}", "length": length, "future_length": 4, "seconds": 1.0, "model_seconds": 0.9,
            "code_version": "test", "warnings": []}


LENGTHS = [5, 9, 7, 12, 6]


def write_samples(directory: Path, indices, shard_bytes=1500, rank=0, cfg=None) -> TraceWriter:
    writer = TraceWriter(directory, cfg or config(), rank=rank, shard_bytes=shard_bytes)
    for i in indices:
        writer.add(i, record(i, LENGTHS[i]), sample_tensors(i, LENGTHS[i]))
    writer.close()
    return writer


@pytest.fixture
def traces(tmp_path) -> Path:
    write_samples(tmp_path, range(len(LENGTHS)))
    write_manifest(tmp_path, config(), len(LENGTHS))
    return tmp_path


def test_round_trip_over_several_shards(traces):
    assert len(shard_paths(traces)) >= 2
    reader = TraceReader(traces)
    assert len(reader) == 5 and reader.lengths == LENGTHS
    assert reader.model == ModelIdentity(name="tiny", fingerprint="f00d", n_layers=L, n_kv_heads=H, head_dim=D)
    assert reader.baselines == ["tova"] and len(reader.manifest_hash) == 64
    for i, length in enumerate(LENGTHS):
        expected = sample_tensors(i, length)
        one = reader.read(i, 1)
        assert one.keys.dtype == torch.float16 and one.utility.dtype == torch.float32
        assert torch.equal(one.keys, expected["keys"][1]) and torch.equal(one.values, expected["values"][1])
        assert torch.equal(one.utility, expected["utility"][1]) and torch.equal(one.positions, torch.arange(length))
        every = reader.read_layers(i)
        assert torch.equal(every.keys, expected["keys"]) and every.utility.shape == (L, H, length)
        some = reader.read_layers(i, [2, 0])
        assert torch.equal(some.values, expected["values"][[2, 0]])
        assert torch.equal(reader.read_baseline(i, 2, "tova"), expected["baseline.tova"][2])
    manifest = reader.manifest
    assert [s["id"] for s in manifest["samples"]] == [f"s{i}" for i in range(5)]
    assert manifest["generation_seconds"] == 5.0 and manifest["prompt_tokens"] == sum(LENGTHS)
    with pytest.raises(KVPError, match="no 'snapkv' baseline"):
        reader.read_baseline(0, 0, "snapkv")
    with pytest.raises(KVPError, match="out of range"):
        reader.read(5, 0)


def test_check_model_refuses_other_models(traces):
    reader = TraceReader(traces)
    reader.check_model(INFO)
    with pytest.raises(KVPError, match="recorded from tiny"):
        reader.check_model(ModelInfo("other", "llama", L, H, 4, D, 512, "beef"))


def _slice_offset(path: Path, name: str, layer: int) -> int:
    """Byte offset in the file of one layer's slice of tensor `name`."""
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    start, end = header[name]["data_offsets"]
    return 8 + header_len + start + layer * (end - start) // L


def test_corruption_is_detected_per_slice_and_names_the_shard(traces):
    shard = traces / TraceReader(traces).manifest["samples"][0]["shard"]
    offset = _slice_offset(shard, "0000000.keys", 1)
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = TraceReader(traces)
    assert reader.read(0, 0).keys.shape == (H, 5, D)  # other slices of the same sample stay readable
    with pytest.raises(KVPError, match=f"{shard.name} is corrupted .*keys of sample 0, layer 1"):
        reader.read(0, 1)
    assert TraceReader(traces, verify=False).read(0, 1).keys.shape == (H, 5, D)


def test_truncated_or_garbled_shard_is_named(traces):
    manifest = TraceReader(traces).manifest
    shard = traces / manifest["samples"][-1]["shard"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(KVPError, match=f"{shard.name} is truncated"):
        TraceReader(traces).read(len(LENGTHS) - 1, 0)
    first = traces / manifest["samples"][0]["shard"]
    size = first.stat().st_size
    first.write_bytes(b"\x00" * size)  # same size, header destroyed
    with pytest.raises(KVPError, match=f"{first.name} is truncated or corrupted"):
        TraceReader(traces).read(0, 0)


def test_resume_skips_finished_shards_and_drops_temporaries(tmp_path):
    writer = write_samples(tmp_path, [0, 1], shard_bytes=1)  # one shard per sample
    assert len(writer.written) == 2
    stale = tmp_path / ".shard-r000-00002.safetensors.abc.tmp"  # what a killed run leaves behind
    stale.mkdir()
    (stale / "shard-r000-00002.safetensors").write_bytes(b"partial")
    resumed = TraceWriter(tmp_path, config(), shard_bytes=1)
    assert resumed.done == {0, 1} and not stale.exists()
    for i in (2, 3, 4):
        resumed.add(i, record(i, LENGTHS[i]), sample_tensors(i, LENGTHS[i]))
    resumed.close()
    assert [p.name for p in resumed.written] == [f"shard-r000-0000{i}.safetensors" for i in (2, 3, 4)]
    manifest = write_manifest(tmp_path, config(), 5)
    assert [s["index"] for s in manifest["samples"]] == list(range(5))
    assert torch.equal(TraceReader(tmp_path).read(3, 2).utility, sample_tensors(3, 12)["utility"][2])


def test_ranks_write_their_own_shards_and_one_manifest_merges_them(tmp_path):
    write_samples(tmp_path, [0, 2, 4], rank=0)
    write_samples(tmp_path, [1, 3], rank=1)
    assert {p.name[:10] for p in shard_paths(tmp_path)} == {"shard-r000", "shard-r001"}
    assert not (tmp_path / MANIFEST).exists()
    write_manifest(tmp_path, config(), 5)
    reader = TraceReader(tmp_path)
    assert torch.equal(reader.read(3, 0).keys, sample_tensors(3, 12)["keys"][0])


def test_missing_samples_and_missing_manifest_are_clear_errors(tmp_path):
    with pytest.raises(KVPError, match="no manifest.json"):
        TraceReader(tmp_path)
    write_samples(tmp_path, [0, 2])
    with pytest.raises(KVPError, match="lacks 3 of 5 samples"):
        write_manifest(tmp_path, config(), 5)


def test_directory_of_another_model_or_run_is_refused(traces):
    with pytest.raises(KVPError, match="holds traces of model tiny .*choose another --out"):
        TraceWriter(traces, config(fingerprint="beef"))
    with pytest.raises(KVPError, match="another run .*split"):
        TraceWriter(traces, config(split="val"))


def test_full_disk_leaves_no_partial_shard(tmp_path, monkeypatch):
    def write_to_full_disk(path: Path, data: bytes) -> None:
        path.write_bytes(data[:100])  # a partial file under the temporary name, then the disk is full
        with open("/dev/full", "wb") as f:
            f.write(data)
            f.flush()

    monkeypatch.setattr(store, "write_durably", write_to_full_disk)
    writer = TraceWriter(tmp_path, config(), shard_bytes=1)
    with pytest.raises(KVPError, match="disk full while writing shard-r000-00000.safetensors"):
        writer.add(0, record(0, 5), sample_tensors(0, 5))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_shard_is_one_line_naming_it(tmp_path, monkeypatch):
    def write_to_read_only_mount(path: Path, data: bytes) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(store, "write_durably", write_to_read_only_mount)
    writer = TraceWriter(tmp_path, config(), shard_samples=1)
    with pytest.raises(KVPError, match="cannot write trace shard shard-r000-00000.safetensors: .*read-only file "
                       "system .*re-run the same command") as err:
        writer.add(0, record(0, 5), sample_tensors(0, 5))
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def edit_manifest(directory: Path, edit) -> None:
    """Apply `edit` (a function changing the manifest dict in place) to DIR/manifest.json."""
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("shards"), "field 'shards' is missing"),
    (lambda m: m["model"].update(n_layers="x"), "field 'model.n_layers' must be an integer, got 'x'"),
    (lambda m: m["model"].pop("fingerprint"), "field 'model.fingerprint' is missing"),
    (lambda m: m["samples"][2].update(length=7.5), "field 'samples[2].length' must be an integer, got 7.5"),
    (lambda m: m["shards"][1].pop("bytes"), "field 'shards[1].bytes' is missing"),
    (lambda m: m["baselines"].update(names="tova"), "field 'baselines.names' must be a list, got 'tova'"),
    (lambda m: m.update(n_samples=None), "field 'n_samples' must be an integer, got None"),
])
def test_manifest_missing_or_mistyped_field_is_named(traces, edit, problem):
    edit_manifest(traces, edit)
    with pytest.raises(KVPError, match=re.escape(f"{traces / MANIFEST}: {problem}; re-run the `kvp traces`")) as err:
        TraceReader(traces)
    assert "\n" not in str(err.value)


def test_shard_header_missing_field_is_named(tmp_path):
    writer = TraceWriter(tmp_path, config())
    writer.add(0, {k: v for k, v in record(0, 5).items() if k != "length"}, sample_tensors(0, 5))
    writer.close()
    shard = shard_paths(tmp_path)[0]
    with pytest.raises(KVPError, match=re.escape(f"trace shard {shard}: field 'kvpolicy.samples[0].length' is "
                                                 "missing; delete it")):
        TraceWriter(tmp_path, config())


@pytest.mark.parametrize("outside", ["relative", "absolute", "link"])
def test_manifest_cannot_name_a_file_outside_its_directory(tmp_path, monkeypatch, outside):
    directory = tmp_path / "traces"
    write_samples(directory, range(len(LENGTHS)))
    write_manifest(directory, config(), len(LENGTHS))
    shard = TraceReader(directory).manifest["samples"][0]["shard"]
    evil = tmp_path / "evil.safetensors"
    shutil.copy(directory / shard, evil)  # a valid shard: unconfined, the reader would serve it
    name = {"relative": "../evil.safetensors", "absolute": str(evil), "link": shard}[outside]
    if outside == "link":
        (directory / shard).unlink()
        (directory / shard).symlink_to(evil)

    def rename(manifest: dict) -> None:
        for entry in manifest["shards"]:
            entry["file"] = name if entry["file"] == shard else entry["file"]
        for sample in manifest["samples"]:
            sample["shard"] = name if sample["shard"] == shard else sample["shard"]

    edit_manifest(directory, rename)
    opened = []
    safe_open = store.safe_open
    monkeypatch.setattr(store, "safe_open", lambda path, **kw: opened.append(path) or safe_open(path, **kw))
    with pytest.raises(KVPError) as err:
        TraceReader(directory).read(0, 0)
    message = str(err.value)
    if outside == "link":  # a link inside a managed directory: refused as such (kvpolicy.io's rule on links)
        assert message.startswith(f"trace shard {directory / shard} is a symbolic link (to {evil})")
    else:
        assert message.startswith(f"{directory / MANIFEST}: field 'shards[0].file' names {name!r}, not a shard file")
    assert "\n" not in message and opened == []


def test_every_sample_shard_must_be_listed(traces):
    edit_manifest(traces, lambda m: m["samples"][1].update(shard="shard-r000-00042.safetensors"))
    with pytest.raises(KVPError, match=re.escape("field 'samples[1].shard' names 'shard-r000-00042.safetensors', "
                                                 "which 'shards' does not list")):
        TraceReader(traces)
    edit_manifest(traces, lambda m: m["samples"][1].update(shard="../shard-r000-00042.safetensors"))
    with pytest.raises(KVPError, match=re.escape("field 'samples[1].shard' names '../shard-r000-00042.safetensors', "
                                                 "not a shard file")):
        TraceReader(traces)


def test_a_shard_is_written_every_shard_samples_so_a_killed_run_keeps_them(tmp_path):
    writer = TraceWriter(tmp_path, config(), shard_samples=2)  # by bytes alone (128 MiB) nothing would be written
    for i in range(3):
        writer.add(i, record(i, LENGTHS[i]), sample_tensors(i, LENGTHS[i]))
    # killed here (SIGKILL: no close); the rerun finds the first two samples done
    assert TraceWriter(tmp_path, config()).done == {0, 1}


def test_a_shard_is_written_shard_seconds_after_its_first_sample(tmp_path):
    now = [0.0]
    writer = TraceWriter(tmp_path, config(), shard_seconds=10.0, clock=lambda: now[0])
    for i, at in enumerate([0.0, 9.0, 10.0, 15.0, 24.0]):  # the second shard's clock starts at 15 s
        now[0] = at
        writer.add(i, record(i, LENGTHS[i]), sample_tensors(i, LENGTHS[i]))
    assert len(writer.written) == 1
    writer.close()
    held = [[r["index"] for r in store._shard_metadata(path)[1]] for path in writer.written]
    assert held == [[0, 1, 2], [3, 4]]


def test_many_small_shards_of_several_ranks_merge_and_read(tmp_path):
    n, length = 40, 4
    for rank in (0, 1):
        writer = TraceWriter(tmp_path, config(), rank=rank, shard_samples=1)
        for i in range(rank, n, 2):
            writer.add(i, record(i, length), sample_tensors(i, length))
        writer.close()
    assert len(write_manifest(tmp_path, config(), n)["shards"]) == len(shard_paths(tmp_path)) == n
    reader = TraceReader(tmp_path)
    for i in range(n):
        assert torch.equal(reader.read(i, 2).keys, sample_tensors(i, length)["keys"][2])


def test_a_rerun_rewrites_a_broken_manifest_as_its_error_advises(traces):
    (traces / MANIFEST).write_text('{"format": "kvpolicy-traces/1", "samp')
    with pytest.raises(KVPError, match="is not valid JSON .*re-run the `kvp traces` command"):
        TraceReader(traces)
    assert TraceWriter(traces, config()).done == set(range(len(LENGTHS)))
    write_manifest(traces, config(), len(LENGTHS))
    assert TraceReader(traces).lengths == LENGTHS


def test_manifest_hash_ignores_the_last_runs_log_but_not_the_samples(traces):
    before = TraceReader(traces).manifest_hash
    edit_manifest(traces, lambda m: m.update(last_run={"world_size": 1, "wall_seconds": 2.5, "recorded": 0,
                                                       "skipped": 5}))
    assert TraceReader(traces).manifest_hash == before  # a re-run that recorded nothing: training still resumes
    edit_manifest(traces, lambda m: m["samples"][0].update(length=6))
    assert TraceReader(traces).manifest_hash != before
