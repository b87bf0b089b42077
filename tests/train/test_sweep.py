"""Sweep expansion, checking, grouping and member ids, against hand-written expectations."""

import dataclasses
import re
import subprocess
import sys

import pytest

from saev_core import config
from saev_core.errors import UserError
from saev_core.train.sweep import (
    DATA_PASS_FIELDS,
    PER_MEMBER_FIELDS,
    expand,
    grid,
    load_sweep,
    member_id,
    split_cfgs,
)

BASE = config.TrainConfig(sae=config.SparseAutoencoderConfig(d_vit=64, seed=7))


def _write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# expand
# ---------------------------------------------------------------------------------------------------------------


def test_expand_varies_the_last_key_fastest_through_nested_tables():
    got = expand({"lr": [1, 2], "sae": {"k": [8, 16], "d_vit": 768}})
    assert got == [
        {"lr": 1, "sae": {"k": 8, "d_vit": 768}},
        {"lr": 1, "sae": {"k": 16, "d_vit": 768}},
        {"lr": 2, "sae": {"k": 8, "d_vit": 768}},
        {"lr": 2, "sae": {"k": 16, "d_vit": 768}},
    ]


def test_expand_three_keys_in_two_tables_in_file_order():
    got = expand({"sae": {"a": [1, 2]}, "data": {"b": ["x", "y"]}, "c": [True, False]})
    want = [
        (1, "x", True), (1, "x", False), (1, "y", True), (1, "y", False),
        (2, "x", True), (2, "x", False), (2, "y", True), (2, "y", False),
    ]  # fmt: skip
    assert [(g["sae"]["a"], g["data"]["b"], g["c"]) for g in got] == want


def test_expand_scalars_only_gives_one_dict_and_empty_gives_one_empty():
    assert expand({"lr": 0.1, "sae": {"k": 4}}) == [{"lr": 0.1, "sae": {"k": 4}}]
    assert expand({}) == [{}]


def test_expand_array_of_tables_expands_each_alternative_on_its_own():
    got = expand({"sae": [{"arch": "topk", "k": [16, 32]}, {"arch": "relu"}], "lr": [1, 2]})
    assert got == [
        {"sae": {"arch": "topk", "k": 16}, "lr": 1},
        {"sae": {"arch": "topk", "k": 16}, "lr": 2},
        {"sae": {"arch": "topk", "k": 32}, "lr": 1},
        {"sae": {"arch": "topk", "k": 32}, "lr": 2},
        {"sae": {"arch": "relu"}, "lr": 1},
        {"sae": {"arch": "relu"}, "lr": 2},
    ]


# ---------------------------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------------------------


def test_grid_from_the_guides_example_toml(tmp_path):
    path = _write(
        tmp_path,
        "[sae]\nsparsity_coeff = [1e-4, 2e-4, 3e-4]\nd_vit = 768\nexp_factor = [8, 16]\n[data]\nscale_mean = true\n",
    )
    cfgs = grid(BASE, load_sweep(path), source=str(path))
    assert [(c.sae.sparsity_coeff, c.sae.exp_factor) for c in cfgs] == [
        (1e-4, 8), (1e-4, 16), (2e-4, 8), (2e-4, 16), (3e-4, 8), (3e-4, 16),
    ]  # fmt: skip
    assert all(c.sae.d_vit == 768 and c.data.scale_mean for c in cfgs)
    # untouched fields keep the base's values
    assert all(c.lr == BASE.lr and c.data == BASE.data and c.sae.arch == BASE.sae.arch for c in cfgs)


def test_grid_with_only_an_sae_table(tmp_path):
    path = _write(tmp_path, '[sae]\narch = ["topk", "batchtopk"]\nk = [8, 16]\n')
    cfgs = grid(BASE, load_sweep(path))
    assert [(c.sae.arch, c.sae.k) for c in cfgs] == [("topk", 8), ("topk", 16), ("batchtopk", 8), ("batchtopk", 16)]
    assert all(dataclasses.replace(c, sae=BASE.sae) == BASE for c in cfgs)


def test_grid_with_only_a_data_table_and_top_level_keys():
    cfgs = grid(BASE, {"data": {"layer": [-2, -1]}})
    assert [c.data.layer for c in cfgs] == [-2, -1]
    cfgs = grid(BASE, {"lr": [1e-3, 3e-4], "n_patches": 1000})
    assert [(c.lr, c.n_patches) for c in cfgs] == [(1e-3, 1000), (3e-4, 1000)]


def test_grid_of_scalars_gives_one_config_with_the_base_seed():
    (cfg,) = grid(BASE, {"lr": 0.01, "sae": {"k": 4}})
    assert cfg == dataclasses.replace(BASE, lr=0.01, sae=dataclasses.replace(BASE.sae, k=4))


def test_grid_accepts_an_int_for_a_float_field_and_stores_a_float():
    (cfg,) = grid(BASE, {"lr": 1, "max_grad_norm": [2]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.max_grad_norm, float)


def test_grid_gives_member_i_the_base_sae_seed_plus_i():
    cfgs = grid(BASE, {"lr": [1e-3, 2e-3, 3e-3]})
    assert [c.sae.seed for c in cfgs] == [7, 8, 9]


def test_grid_keeps_seeds_the_sweep_sets_explicitly():
    cfgs = grid(BASE, {"lr": [1e-3, 2e-3], "sae": {"seed": [3, 4]}})
    assert [(c.lr, c.sae.seed) for c in cfgs] == [(1e-3, 3), (1e-3, 4), (2e-3, 3), (2e-3, 4)]
    cfgs = grid(BASE, {"lr": [1e-3, 2e-3], "sae": {"seed": 5}})
    assert [c.sae.seed for c in cfgs] == [5, 5]


def test_grid_unknown_key_names_the_key_the_file_and_the_close_match():
    with pytest.raises(UserError) as err:
        grid(BASE, {"sae": {"exp_factr": [8]}}, source="my_sweep.toml")
    msg = str(err.value)
    assert "sae.exp_factr" in msg and "my_sweep.toml" in msg and "sae.exp_factor" in msg

    with pytest.raises(UserError) as err:
        grid(BASE, {"learning_rate": 1}, source="s.toml")
    assert "learning_rate" in str(err.value) and "s.toml" in str(err.value)

    with pytest.raises(UserError, match="data.layr.*x.toml.*data.layer"):
        grid(BASE, {"data": {"layr": [1, 2]}}, source="x.toml")


@pytest.mark.parametrize(
    "sweep, key, value, expected",
    [
        ({"lr": "fast"}, "lr", "'fast'", "float"),
        ({"sae": {"k": 1.5}}, "sae.k", "1.5", "int"),
        ({"sae": {"k": [8, 1.5]}}, "sae.k", "1.5", "int"),
        ({"sae": {"arch": "foo"}}, "sae.arch", "'foo'", "'topk'"),
        ({"data": {"scale_mean": 1}}, "data.scale_mean", "1", "bool"),
        ({"n_patches": True}, "n_patches", "True", "int"),
        ({"data": {"patches": "patch"}}, "data.patches", "'patch'", "'patches'"),
        ({"sae": 3}, "sae", "3", "table"),
        ({"lr": {"a": 1}}, "lr", "table", "float"),
    ],
)
def test_grid_wrong_type_names_key_value_expected_type_and_file(sweep, key, value, expected):
    with pytest.raises(UserError) as err:
        grid(BASE, sweep, source="bad.toml")
    msg = str(err.value)
    for part in (key, value, expected, "bad.toml"):
        assert part in msg, (part, msg)


def test_grid_rejects_an_empty_list():
    with pytest.raises(UserError, match=r"sae.k = \[\]"):
        grid(BASE, {"sae": {"k": []}})


def test_grid_accepts_optional_fields_and_strings():
    (cfg,) = grid(BASE, {"sweep": "a.toml", "ckpt_path": "/tmp/x", "device": "cpu"})
    assert (cfg.sweep, cfg.ckpt_path, cfg.device) == ("a.toml", "/tmp/x", "cpu")


def test_load_sweep_reports_a_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="nope.toml"):
        load_sweep(tmp_path / "nope.toml")
    bad = _write(tmp_path, "[sae\nk = 1\n", name="bad.toml")
    with pytest.raises(UserError, match="bad.toml.*not valid TOML"):
        load_sweep(bad)


# ---------------------------------------------------------------------------------------------------------------
# split_cfgs
# ---------------------------------------------------------------------------------------------------------------


def _cfg(**kw):
    sae = kw.pop("sae", {})
    data = kw.pop("data", {})
    return dataclasses.replace(
        BASE, sae=dataclasses.replace(BASE.sae, **sae), data=dataclasses.replace(BASE.data, **data), **kw
    )


def test_split_cfgs_keeps_sae_and_optimiser_differences_in_one_group():
    cfgs = [
        _cfg(lr=1e-3),
        _cfg(lr=2e-3, sae={"arch": "topk", "k": 8}),
        _cfg(sae={"exp_factor": 4, "d_vit": 32}),
        _cfg(n_lr_warmup=10, n_sparsity_warmup=5, max_grad_norm=0.5, log_every=1, ckpt_every=3, sweep="s.toml"),
    ]
    assert split_cfgs(cfgs) == [cfgs]


def test_split_cfgs_splits_on_data_fields_and_keeps_order():
    a1 = _cfg(lr=1e-3)
    b1 = _cfg(data={"layer": -1})
    a2 = _cfg(lr=2e-3, sae={"arch": "jumprelu"})
    c1 = _cfg(sae_batch_size=8)
    b2 = _cfg(data={"layer": -1}, sae={"exp_factor": 2})
    d1 = _cfg(data={"scale_norm": False})
    e1 = _cfg(seed=1)
    f1 = _cfg(n_patches=5)
    g1 = _cfg(device="cpu")
    h1 = _cfg(ckpt_path="elsewhere")
    i1 = _cfg(n_threads=1)  # torch's thread count is one per process
    a3 = _cfg(sae={"seed": 99})
    got = split_cfgs([a1, b1, a2, c1, b2, d1, e1, f1, g1, h1, i1, a3])
    assert got == [[a1, a2, a3], [b1, b2], [c1], [d1], [e1], [f1], [g1], [h1], [i1]]


def test_split_cfgs_of_nothing_is_nothing():
    assert split_cfgs([]) == []


def test_every_train_field_is_classified_as_data_pass_or_per_member():
    names = {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert set(DATA_PASS_FIELDS).isdisjoint(PER_MEMBER_FIELDS)
    assert set(DATA_PASS_FIELDS) | set(PER_MEMBER_FIELDS) == names


# ---------------------------------------------------------------------------------------------------------------
# member_id
# ---------------------------------------------------------------------------------------------------------------


def test_member_id_is_equal_for_equal_configs_and_short_hex():
    a, b = _cfg(lr=1e-3, sae={"k": 8}), _cfg(lr=1e-3, sae={"k": 8})
    assert a is not b and member_id(a) == member_id(b)
    assert re.fullmatch(r"[0-9a-f]{12}", member_id(a)), member_id(a)


def test_member_id_is_stable_across_processes():
    code = (
        "from saev_core import config; from saev_core.train.sweep import member_id; "
        "print(member_id(config.TrainConfig(lr=1e-3)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == member_id(config.TrainConfig(lr=1e-3))


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 2e-3},
        {"seed": 1},
        {"n_patches": 10},
        {"sae_batch_size": 10},
        {"n_lr_warmup": 1},
        {"sae": {"k": 9}},
        {"sae": {"dead_after_n_patches": 1000}},
        {"sae": {"seed": 1}},
        {"sae": {"arch": "topk"}},
        {"sae": {"exp_factor": 2}},
        {"data": {"layer": 3}},
        {"data": {"shard_root": "other"}},
        {"data": {"scale_mean": False}},
    ],
)
def test_member_id_changes_with_any_result_changing_field(change):
    assert member_id(_cfg(**change)) != member_id(_cfg())


@pytest.mark.parametrize(
    "change",
    [
        {"ckpt_path": "/elsewhere"},
        {"log_every": 1},
        {"ckpt_every": 7},
        {"sweep": "s.toml"},
        {"device": "cpu"},
        {"n_threads": 1},
    ],
)
def test_member_id_ignores_fields_that_do_not_change_the_result(change):
    assert member_id(_cfg(**change)) == member_id(_cfg())


def test_member_id_treats_an_int_learning_rate_like_the_float():
    assert member_id(_cfg(lr=1)) == member_id(_cfg(lr=1.0))


def test_sweep_module_imports_without_torch_or_config_first():
    code = "import sys, saev_core.train.sweep; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"
