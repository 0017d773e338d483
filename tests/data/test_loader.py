import hashlib
import itertools

import pytest
import torch

from gonogo.data.loader import IGNORE_INDEX, PackedLoader, ValidationBatches
from gonogo.data.sources import ListSource
from gonogo.data.synthetic import SyntheticSource
from gonogo.data.tokenizer import ByteTokenizer
from gonogo.errors import UserError

EOS = ByteTokenizer().eos_id


def small_source(count=23):
    # documents of varied length, some longer than a row, so rows cut through documents; hex
    # digests make every stretch of text unique, so equal rows mean the same stream position
    def body(index):
        return hashlib.sha256(str(index).encode()).hexdigest()[: index * 7 % 50]
    return ListSource([f"doc{index:03d}:{body(index)}" for index in range(count)], name="small")


def rows_of(loader, batches):
    """The rows (inputs + last target) a loader yields over ``batches`` batches."""
    rows = []
    for _ in range(batches):
        inputs, targets = next(loader)
        rows.extend(torch.cat([inputs, targets[:, -1:]], dim=1))
    return [row.tolist() for row in rows]


def test_shapes_and_targets_are_shifted_inputs():
    loader = PackedLoader(SyntheticSource(), seq_len=64, batch_size=4, rank=0, world_size=1, seed=0)
    for inputs, targets in itertools.islice(loader, 5):
        assert inputs.shape == targets.shape == (4, 64)
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert (targets != IGNORE_INDEX).all()


def test_stream_is_every_document_once_per_epoch_with_eos_between_and_seeded_order():
    source = small_source()
    loader = PackedLoader(source, seq_len=31, batch_size=2, seed=5)
    tokens = [token for row in rows_of(loader, 60) for token in row]
    text = ByteTokenizer().decode(tokens, skip_special_tokens=False)
    documents = text.split("<|eos|>")
    per_epoch = len(source)
    epochs = [documents[start:start + per_epoch] for start in (0, per_epoch)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(source.documents)
    assert epochs[0] != epochs[1], "each epoch is shuffled anew"
    assert epochs[0] != source.documents
    other_seed = PackedLoader(source, seq_len=31, batch_size=2, seed=6)
    assert rows_of(other_seed, 3) != rows_of(PackedLoader(source, seq_len=31, batch_size=2, seed=5), 3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_interleave_the_global_stream(world_size):
    source = small_source()
    single = rows_of(PackedLoader(source, seq_len=16, batch_size=3 * world_size, seed=1), 4)
    shards = [rows_of(PackedLoader(source, seq_len=16, batch_size=3, rank=rank, world_size=world_size, seed=1), 4)
              for rank in range(world_size)]
    for rank, shard in enumerate(shards):
        assert shard == single[rank::world_size]  # rank r takes rows r, r + W, ...
    # disjoint: no global row position is served twice (the rows are unique here)
    flat = [tuple(row) for shard in shards for row in shard]
    assert len(set(flat)) == len(flat) == len(single)


@pytest.mark.parametrize("stop", [0, 1, 3, 7, 12])
def test_resume_yields_exactly_the_uninterrupted_batches_also_across_epochs(stop):
    # 23 short documents are ~900 tokens, so 12 batches of 2 x 33 tokens cross epoch boundaries
    source = small_source()
    uninterrupted = PackedLoader(source, seq_len=32, batch_size=2, rank=1, world_size=2, seed=3)
    expected = [next(uninterrupted) for _ in range(stop + 8)]
    first = PackedLoader(source, seq_len=32, batch_size=2, rank=1, world_size=2, seed=3)
    for _ in range(stop):
        next(first)
    state = first.state_dict()
    resumed = PackedLoader(small_source(), seq_len=32, batch_size=2, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    for want in expected[stop:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if stop == 12:
        assert state["epoch"] >= 1


def test_state_is_the_same_on_every_rank():
    states = []
    for rank in range(2):
        loader = PackedLoader(small_source(), seq_len=20, batch_size=3, rank=rank, world_size=2, seed=0)
        for _ in range(4):
            next(loader)
        states.append(loader.state_dict())
    assert states[0] == states[1]
    assert states[0]["rows"] == 4 * 3 * 2


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (2, 3)])
def test_resume_at_another_world_size_continues_the_global_stream(old_world, new_world):
    source = small_source()
    global_rows = rows_of(PackedLoader(source, seq_len=24, batch_size=12, seed=9), 6)
    old = PackedLoader(source, seq_len=24, batch_size=6 // old_world, rank=0, world_size=old_world, seed=9)
    for _ in range(5):
        next(old)
    done = old.state_dict()["rows"]
    assert done == 30
    resumed_rows = []
    for rank in range(new_world):
        loader = PackedLoader(source, seq_len=24, batch_size=2, rank=rank, world_size=new_world, seed=9)
        loader.load_state_dict(old.state_dict())
        resumed_rows.append(rows_of(loader, 2))
    for rank in range(new_world):
        assert resumed_rows[rank] == [global_rows[done + rank + new_world * k] for k in range(4)]


def test_resume_refuses_another_seed_or_source():
    loader = PackedLoader(small_source(), seq_len=8, batch_size=1, seed=0)
    next(loader)
    with pytest.raises(UserError, match="same data source and seed"):
        PackedLoader(small_source(), seq_len=8, batch_size=1, seed=1).load_state_dict(loader.state_dict())
    with pytest.raises(UserError, match="same data source and seed"):
        PackedLoader(small_source(30), seq_len=8, batch_size=1, seed=0).load_state_dict(loader.state_dict())


def test_loss_mask_becomes_ignore_index_in_targets():
    tokenizer = ByteTokenizer()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": f"q{index}"},
                                            {"role": "assistant", "content": f"answer {index}"}])
             for index in range(5)]
    loader = PackedLoader(ListSource(chats, name="chats"), seq_len=40, batch_size=2, seed=0)
    inputs, targets = next(loader)
    assert torch.equal(inputs[:, 1:], torch.where(targets[:, :-1] == IGNORE_INDEX, inputs[:, 1:], targets[:, :-1]))
    kept = targets[targets != IGNORE_INDEX].tolist()
    text = tokenizer.decode(kept, skip_special_tokens=False)
    assert "answer" in text and "q" not in text.replace("answer", "") and "<|user|>" not in text
    assert (targets == IGNORE_INDEX).any()


def test_validation_batches_are_the_same_every_call():
    validation = ValidationBatches(SyntheticSource("val"), seq_len=32, batch_size=2, num_batches=3)
    first = list(validation)
    second = list(validation)
    assert len(first) == len(validation) == 3
    for (a_in, a_out), (b_in, b_out) in zip(first, second):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    again = ValidationBatches(SyntheticSource("val"), seq_len=32, batch_size=2, num_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
