"""Sampling filters and the stop-string aware text tracker."""

import torch

from gonogo.infer.sampling import SamplingParams, TextTracker, make_generator, sample_next


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_next(logits, SamplingParams(temperature=0.0), make_generator(0)) == 1
    for seed in range(20):
        assert sample_next(logits, SamplingParams(temperature=1.5, top_k=1), make_generator(seed)) == 1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    seen = {sample_next(logits, SamplingParams(top_p=0.8), make_generator(seed)) for seed in range(200)}
    assert seen == {0, 1}


def test_same_seed_same_samples():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)
    first = [sample_next(logits, params, generator) for generator in [make_generator(3)] for _ in range(10)]
    generator = make_generator(3)
    assert [sample_next(logits, params, generator) for _ in range(10)] == first


def test_tiny_temperature_and_tiny_top_p_sample_the_top_token_without_nan():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1)) * 30
    top = int(logits.argmax())
    for params in (SamplingParams(temperature=1e-40), SamplingParams(temperature=5e-324),
                   SamplingParams(top_p=1e-300), SamplingParams(top_p=1e-300, top_k=3, temperature=2.0)):
        assert {sample_next(logits, params, make_generator(seed)) for seed in range(20)} == {top}


def test_non_finite_logits_raise_instead_of_sampling_garbage():
    import pytest

    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(10)
        logits[3] = bad
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7)):
            with pytest.raises(FloatingPointError, match="non-finite logits"):
                sample_next(logits, params, make_generator(0))


def test_seeds_must_fit_the_generator_for_every_choice():
    assert SamplingParams(seed=(1 << 64) - 1).problem() is None
    assert SamplingParams(seed=-(1 << 63), n=8).problem() is None
    for params in (SamplingParams(seed=1 << 64), SamplingParams(seed=-(1 << 63) - 1),
                   SamplingParams(seed=(1 << 64) - 1, n=2)):
        assert params.problem().startswith("seed=")


def _feed(text, stop):
    tracker = TextTracker(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stop)
    pieces = []
    for byte in text.encode("utf-8"):
        pieces.append(tracker.add(byte))
        if tracker.stopped:
            break
    pieces.append(tracker.flush())
    return pieces, tracker


def test_stop_string_is_cut_and_never_streamed_in_part():
    pieces, tracker = _feed("hello world. And more", ["d. A"])
    assert tracker.stopped and "".join(pieces) == "hello worl"
    assert all("d" not in piece for piece in pieces)


def test_multibyte_characters_are_streamed_whole():
    pieces, tracker = _feed("naïve → ok", [])
    assert "".join(pieces) == "naïve → ok" and not tracker.stopped
    assert all("\ufffd" not in piece for piece in pieces)
