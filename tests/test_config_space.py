from __future__ import annotations

import pytest

from subnets.config import LayerChoice, SubnetConfig
from subnets.cost import cost, count_params
from subnets.errors import ConfigError
from subnets.extract import extract
from subnets.space import BaseDims, SearchSpace

DIMS = BaseDims("llama", 30, 576, 9, 3, 64, 1536, 49152, True)
SPACE = SearchSpace("base@x", DIMS, neuron_step=64)


def test_canonical_json_and_hash_are_stable() -> None:
    a = SubnetConfig.uniform("base@x", [0, 2, 5], 2, 3, 512)
    b = SubnetConfig.from_json(a.to_json())
    assert a == b and a.config_hash() == b.config_hash()
    assert a.to_json() == '{"base_id":"base@x","layers":[{"heads_per_group":3,"kv_groups":2,"layer":0,"neurons":512},' \
        '{"heads_per_group":3,"kv_groups":2,"layer":2,"neurons":512},{"heads_per_group":3,"kv_groups":2,"layer":5,"neurons":512}],"schema":1}'
    c = SubnetConfig.uniform("base@x", [0, 2, 5], 2, 3, 576)
    assert c.config_hash() != a.config_hash()


@pytest.mark.parametrize(
    ("layers", "needle"),
    [
        ([LayerChoice(30, 3, 3, 64)], "out of range 0..29"),
        ([LayerChoice(0, 3, 3, 2048)], "above the base size 1536"),
        ([LayerChoice(0, 3, 3, 100)], "off the step"),
        ([LayerChoice(0, 4, 3, 64)], "kv_groups=4 breaks GQA"),
        ([LayerChoice(0, 3, 4, 64)], "heads_per_group=4 breaks GQA"),
        ([LayerChoice(0, 0, 3, 64)], "kv_groups=0 breaks GQA"),
        ([], "empty layer list"),
        ([LayerChoice(3, 3, 3, 64), LayerChoice(1, 3, 3, 64)], "increasing order"),
        ([LayerChoice(3, 3, 3, 64), LayerChoice(3, 3, 3, 64)], "listed twice"),
    ],
)
def test_invalid_configs_say_what_is_wrong(layers: list[LayerChoice], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        SPACE.validate(SubnetConfig("base@x", tuple(layers)))
    assert needle in str(e.value)
    assert e.value.fix


def test_config_for_another_base_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="is for base model 'other@y'"):
        SPACE.validate(SubnetConfig.uniform("other@y", [0], 1, 1, 64))


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ([], "must be a JSON object"),
        ({"layers": []}, "no string field 'base_id'"),
        ({"base_id": "b", "layers": [{"layer": "0", "kv_groups": 1, "heads_per_group": 1, "neurons": 64}]}, "layers[0].layer"),
        ({"base_id": "b", "layers": [{"layer": 0, "kv_groups": 1, "heads_per_group": 1, "neurons": 64, "x": 1}]}, "unknown fields"),
        ({"schema": 9, "base_id": "b", "layers": []}, "schema 9"),
    ],
)
def test_malformed_config_documents(doc: object, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        SubnetConfig.from_dict(doc)
    assert needle in str(e.value)


def test_sampling_is_seeded_valid_and_distinct() -> None:
    a = SPACE.sample(20, seed=3)
    b = SPACE.sample(20, seed=3)
    assert [c.to_json() for c in a] == [c.to_json() for c in b]
    assert len({c.config_hash() for c in a}) == 20
    for c in a:
        SPACE.validate(c)
    assert [c.to_json() for c in SPACE.sample(20, seed=4)] != [c.to_json() for c in a]


def test_uniform_granularity_and_layer_ranking() -> None:
    ranking = list(range(29, -1, -1))
    for c in SPACE.sample(10, seed=1, granularity="uniform", layer_ranking=ranking):
        assert c.is_uniform
        k = len(c.layers)
        assert list(c.layer_indices) == sorted(ranking[:k])


def test_stratified_sampling_covers_parameter_bins_evenly() -> None:
    uni = [count_params(c, DIMS) for c in SPACE.sample(60, seed=0, strategy="uniform")]
    strat = [count_params(c, DIMS) for c in SPACE.sample(60, seed=0, strategy="stratified", bins=6)]
    lo, hi = min(strat), max(strat)
    edges = [lo + (hi - lo) * i / 6 for i in range(7)]
    counts = [sum(edges[i] <= p <= edges[i + 1] for p in strat) for i in range(6)]
    assert min(counts) >= 5  # every bin represented
    # stratified reaches further into the tails than uniform draws
    assert (max(strat) - min(strat)) >= (max(uni) - min(uni)) * 0.9


def test_cost_grows_with_shape_and_size() -> None:
    small = SubnetConfig.uniform("base@x", range(10), 1, 1, 256)
    full = SPACE.full()
    assert cost(small, DIMS, "prefill", 128).flops < cost(full, DIMS, "prefill", 128).flops
    assert cost(full, DIMS, "prefill", 64).flops < cost(full, DIMS, "prefill", 128).flops
    d1, d2 = cost(full, DIMS, "decode", past_len=64), cost(full, DIMS, "decode", past_len=512)
    assert d1.attention_macs < d2.attention_macs and d1.kv_cache_bytes < d2.kv_cache_bytes
    assert d1.linear_macs == d2.linear_macs
    # SmolLM2-135M: the published parameter count
    assert count_params(full, DIMS) == 134_515_008


def test_param_count_matches_the_extracted_model(tiny_base, tiny_importance) -> None:
    space = tiny_base.space(neuron_step=16)
    for c in [space.full(), *space.sample(5, seed=2)]:
        model = extract(tiny_base, tiny_importance, c)
        n = sum(p.numel() for p in model.parameters())  # tied embedding counted once
        assert n == count_params(c, tiny_base.dims), c.summary()
