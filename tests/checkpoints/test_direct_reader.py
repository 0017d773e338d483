"""DirectReader: DCP's reader that reads whole tensors straight into their targets, and hands every
other item (bytes, resharded slices, strided records, other dtypes) to DCP's own code."""

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from gonogo.checkpoints import dcp_filesystem
from gonogo.checkpoints.dcp_filesystem import DirectReader


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


@pytest.fixture
def in_place(monkeypatch):
    """The tensors read in place, by their byte counts."""
    reads: list[int] = []
    original = dcp_filesystem._read_exactly

    def counting(fd, target, position):
        reads.append(target.numel() * target.element_size())
        original(fd, target, position)

    monkeypatch.setattr(dcp_filesystem, "_read_exactly", counting)
    return reads


def saved(tmp_path):
    torch.manual_seed(0)
    state = {
        "weight": torch.randn(64, 32),
        "half": torch.randn(16, 8).to(torch.bfloat16),
        "step": torch.tensor(7.0),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(8, 16).t(),  # a full storage, strides swapped: saved as it is
        "ints": torch.arange(10, dtype=torch.int64),
        "lr": 0.25,
        "names": ["a", "b"],
    }
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    return state


def fresh(state):
    return {key: torch.full_like(value, -1) if isinstance(value, torch.Tensor) else None
            for key, value in state.items()}


def test_whole_tensors_are_read_in_place_and_everything_else_by_dcp(tmp_path, in_place):
    state = saved(tmp_path)
    assert not state["transposed"].is_contiguous()
    loaded = fresh(state)
    loaded["transposed"] = torch.full((8, 16), -1.0).t()  # a strided target: DCP's copy_ fills it
    dcp.load(loaded, storage_reader=DirectReader(tmp_path), no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key
    plain = ("weight", "half", "step", "ints")  # DCP reads nothing for an empty tensor
    assert sorted(in_place) == sorted(state[key].numel() * state[key].element_size() for key in plain)


def test_a_resharded_slice_or_another_dtype_is_left_to_dcp(tmp_path, in_place):
    state = saved(tmp_path)
    loaded = fresh(state)
    loaded["weight"] = torch.zeros(64, 32, dtype=torch.float64)  # DCP converts in its copy_
    loaded["transposed"] = torch.zeros(16, 8)  # a contiguous target of a strided record: not its bytes in order
    dcp.load(loaded, storage_reader=DirectReader(tmp_path), no_dist=True)
    assert torch.equal(loaded["weight"], state["weight"].double())
    assert torch.equal(loaded["transposed"], state["transposed"])
    assert 64 * 32 * 4 not in in_place and 64 * 32 * 8 not in in_place and 16 * 8 * 4 not in in_place
    assert 16 * 8 * 2 in in_place  # the others still are


def test_a_short_file_is_an_error_not_a_half_read_tensor(tmp_path):
    saved(tmp_path)
    shard = next(tmp_path.glob("*.distcp"))
    target = torch.zeros(4)
    with open(shard, "rb", buffering=0) as handle:
        with pytest.raises(OSError, match="bytes short"):
            dcp_filesystem._read_exactly(handle.fileno(), target, shard.stat().st_size - 8)


def test_a_checkpoint_loads_the_same_with_dcps_reader_and_ours(tmp_path):
    state = saved(tmp_path)
    ours, theirs = fresh(state), fresh(state)
    dcp.load(ours, storage_reader=DirectReader(tmp_path), no_dist=True)
    dcp.load(theirs, checkpoint_id=str(tmp_path), no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], theirs[key]), key


def test_the_forward_walk_finds_each_records_data_where_torch_load_says(tmp_path):
    state = saved(tmp_path)
    shard = next(tmp_path.glob("*.distcp"))
    reader = DirectReader(tmp_path)
    reader.read_metadata()
    reader.set_up_storage_reader(reader.read_metadata(), is_coordinator=True)
    walked = 0
    with open(shard, "rb") as handle:
        for stored in reader.storage_data.values():
            if stored.relative_path != shard.name:
                continue
            record = dcp_filesystem._walk_to_data(os.pread(handle.fileno(), 4096, stored.offset))
            layout = dcp_filesystem._record_layout(handle, stored.offset, stored.length)
            if layout is None:  # bytes, or a strided record
                continue
            assert record is not None and record[1] == b"little"
            assert record[2] == layout[2]  # no storage offset: the data entry's start is the data's
            walked += 1
    assert walked == sum(isinstance(v, torch.Tensor) and v.is_contiguous() for v in state.values())


def test_records_of_the_same_shape_and_dtype_are_read_with_one_torch_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(32, 16) for i in range(6)} | {"b": torch.randn(16)}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    parsed = []
    original = dcp_filesystem._record_layout

    def counting(handle, offset, length):
        parsed.append(offset)
        return original(handle, offset, length)

    monkeypatch.setattr(dcp_filesystem, "_record_layout", counting)
    loaded = {key: torch.zeros_like(value) for key, value in state.items()}
    dcp.load(loaded, storage_reader=DirectReader(tmp_path), no_dist=True)
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert len(parsed) == 2  # one 32 x 16 record and the 16: the other five from the first one's pickle
