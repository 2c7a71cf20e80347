"""Sharded trace store: round trip, locality of reads, corruption and truncation named, resume, refusals, full disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvpolicy.errors import KVPError
from kvpolicy.models.handle import ModelInfo
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
    assert len(reader) == 5 and reader.lengths == LENGTHS and reader.n_layers == L and reader.n_kv_heads == H
    assert reader.model_name == "tiny" and reader.fingerprint == "f00d" and reader.head_dim == D
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

    monkeypatch.setattr(store, "_write_bytes", write_to_full_disk)
    writer = TraceWriter(tmp_path, config(), shard_bytes=1)
    with pytest.raises(KVPError, match="disk full while writing shard-r000-00000.safetensors"):
        writer.add(0, record(0, 5), sample_tensors(0, 5))
    assert list(tmp_path.iterdir()) == []
