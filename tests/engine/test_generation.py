"""Generation: greedy and seeded sampling, stop conditions, chat turns, counters."""

import dataclasses

import pytest
import torch

from tests.engine.helpers import make_engine, random_tokens
from worker.engine import GenerationParams, Request
from worker.exceptions import ConfigError


def generate(engine, stream_id, event_id, params, **request):
    engine.submit(Request(stream_id, event_id, generate=params, **request))
    (result,) = [r for r in engine.run_until_idle() if r.event_id == event_id]
    return result


def test_generation_greedy_repeats(tiny_loaded):
    params = GenerationParams(max_new_tokens=12)
    first = generate(make_engine(tiny_loaded), "s", "e1", params, token_ids=random_tokens(9))
    second = generate(make_engine(tiny_loaded), "s", "e1", params, token_ids=random_tokens(9))
    assert first.token_ids == second.token_ids
    assert first.generated_tokens == 12


def test_generation_sampling_seeded_by_stream_and_event(tiny_loaded):
    params = GenerationParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    prompt = random_tokens(9, seed=1)
    replay = generate(make_engine(tiny_loaded), "s", "e1", params, token_ids=prompt)
    again = generate(make_engine(tiny_loaded), "s", "e1", params, token_ids=prompt)
    other_event = generate(make_engine(tiny_loaded), "s", "e2", params, token_ids=prompt)
    other_seed = generate(make_engine(tiny_loaded), "s", "e1", dataclasses.replace(params, seed=7),
                          token_ids=prompt)
    assert replay.token_ids == again.token_ids
    assert replay.token_ids != other_event.token_ids
    assert replay.token_ids != other_seed.token_ids


def test_generation_top_k_one_equals_greedy(tiny_loaded):
    prompt = random_tokens(9, seed=2)
    greedy = generate(make_engine(tiny_loaded), "s", "e", GenerationParams(max_new_tokens=10), token_ids=prompt)
    top1 = generate(make_engine(tiny_loaded), "s", "e",
                    GenerationParams(max_new_tokens=10, temperature=0.7, top_k=1), token_ids=prompt)
    assert top1.token_ids == greedy.token_ids


def test_generation_stop_string_truncates(tiny_loaded, tokenizer):
    prompt = random_tokens(9, seed=3)
    free = generate(make_engine(tiny_loaded), "s", "e", GenerationParams(max_new_tokens=20), token_ids=prompt)
    assert len(free.text) > 4
    stop = free.text[2:4]
    stopped = generate(make_engine(tiny_loaded), "s", "e", GenerationParams(max_new_tokens=20, stop=(stop,)),
                       token_ids=prompt)
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)


def test_generation_eos_stops(tiny_loaded):
    eos = tiny_loaded.spec.eos_token_ids[0]
    head = tiny_loaded.model.lm_head.weight
    original = head[eos].clone()
    with torch.no_grad():
        head[eos] = head.abs().max() * 50 * torch.sign(tiny_loaded.model.model.norm.weight)
    try:
        engine = make_engine(tiny_loaded)  # the engine copies the weights when it starts
        result = generate(engine, "s", "e", GenerationParams(max_new_tokens=20), token_ids=random_tokens(5))
    finally:
        with torch.no_grad():
            head[eos] = original
    assert result.finish_reason == "eos"
    assert result.text == ""


def test_generation_tokens_join_the_stream(tiny_loaded):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=28)
    prompt = random_tokens(6, seed=4)
    first = generate(engine, "s", "e1", GenerationParams(max_new_tokens=5), token_ids=prompt)
    # Prompt and all but the last generated token are cached; the last one is fed with the next event.
    assert engine.streams["s"].layout.tokens_cached_total == len(prompt) + first.generated_tokens - 1
    assert engine.streams["s"].pending == first.token_ids[-1:]
    second = generate(engine, "s", "e2", GenerationParams(max_new_tokens=5), token_ids=[])
    assert second.generated_tokens == 5
    assert engine.streams["s"].layout.tokens_cached_total == len(prompt) + 10 - 1


def test_generation_chat_turns_rendered_once(tiny_loaded, tokenizer):
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=300, chunk=64, batch_tokens=128)
    generate(engine, "c", "t1", GenerationParams(max_new_tokens=3), text="Hi there", role="user")
    first_seen = engine.streams["c"].tokens_seen
    generate(engine, "c", "t2", GenerationParams(max_new_tokens=3), text="And again", role="user")
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "And again"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "You are a helpful AI assistant" in turn  # the template's default system prompt
    second_turn_tokens = engine.streams["c"].tokens_seen - first_seen
    assert second_turn_tokens < len(tokenizer.encode(turn, add_special_tokens=False))


def test_generation_large_counters_same_logits(tiny_loaded):
    """A stream past 2**31 tokens behaves exactly like one with the same cache content."""
    engine = make_engine(tiny_loaded, sink_tokens=4, window_tokens=12, chunk=8)
    engine.submit(Request("small", "fill", token_ids=random_tokens(60, seed=5)))
    engine.run_until_idle()
    snapshot = engine.export_stream("small")
    assert snapshot.layout["tokens_evicted_total"] > 0
    huge = dataclasses.replace(snapshot, stream_id="huge", tokens_seen=2**31 + 59,
                               layout={**snapshot.layout, "tokens_cached_total": 2**31 + 59,
                                       "tokens_evicted_total": 2**31 + 43})
    engine.import_stream(huge)
    params = GenerationParams(max_new_tokens=20)
    small = generate(engine, "small", "g", params, token_ids=[7, 8, 9])
    large = generate(engine, "huge", "g", params, token_ids=[7, 8, 9])
    assert small.token_ids == large.token_ids
    assert engine.streams["huge"].layout.tokens_cached_total > 2**31


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -3}, "top_k=-3"),
        ({"stop": ("",)}, "stop="),
    ],
)
def test_generation_invalid_params_rejected(settings, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GenerationParams(**settings)


def test_generation_request_after_end_starts_fresh_stream(tiny_loaded):
    engine = make_engine(tiny_loaded)
    engine.submit(Request("s", "a1", token_ids=random_tokens(9, seed=6)))
    engine.submit(Request("s", "end", action="end"))
    engine.submit(Request("s", "g1", token_ids=random_tokens(5, seed=7), generate=GenerationParams(max_new_tokens=3)))
    engine.submit(Request("s", "g2", generate=GenerationParams(max_new_tokens=3)))
    results = {r.event_id: r for r in engine.run_until_idle()}
    assert sorted(results) == ["a1", "end", "g1", "g2"]
    assert results["g1"].generated_tokens == 3
    assert results["g2"].generated_tokens == 3
    # g1 ran on an empty cache: its prompt and reply are all the stream holds.
    assert engine.streams["s"].tokens_seen == 5 + 3 + 3 - 1


def test_generation_drop_during_generation_reports_error(tiny_loaded):
    engine = make_engine(tiny_loaded)
    engine.submit(Request("s", "g", token_ids=random_tokens(5), generate=GenerationParams(max_new_tokens=10)))
    engine.submit(Request("s", "queued", token_ids=random_tokens(3)))
    engine.step()
    engine.drop_stream("s")
    assert engine.has_work()
    results = {r.event_id: r for r in engine.run_until_idle()}
    assert sorted(results) == ["g", "queued"]
    assert "dropped" in results["g"].error
    assert "dropped" in results["queued"].error


def test_generation_reset_during_generation_rejected(tiny_loaded):
    from worker.engine import StreamBusyError

    engine = make_engine(tiny_loaded)
    engine.submit(Request("s", "g", token_ids=random_tokens(5), generate=GenerationParams(max_new_tokens=10)))
    engine.step()
    with pytest.raises(StreamBusyError, match="submit a reset action instead"):
        engine.reset_stream("s")
    (result,) = engine.run_until_idle()
    assert result.generated_tokens == 10
