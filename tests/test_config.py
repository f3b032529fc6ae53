"""ESPACEConfig validation: every bad input is a ConfigError naming the file and the field."""

import pytest

import megatron_espace as espace
from megatron_espace.config import METHODS

GOOD = {
    "calibration": {"methods": list(METHODS)},
    "layers": [
        {"match": "decoder.layers.*.mlp.linear_fc1", "rank": 16, "method": "go_mse"},
        {"match": "*.linear_fc2", "compression": 0.5, "method": "auto"},
    ],
}


def test_good_config_parses_and_first_match_wins(tmp_path):
    import yaml

    path = tmp_path / "espace.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    cfg = espace.ESPACEConfig.from_yaml(path)
    assert cfg.calibration.methods == METHODS
    rule = cfg.rule_for("decoder.layers.3.mlp.linear_fc1")
    assert (rule.rank, rule.method, rule.index) == (16, "go_mse", 0)
    rule = cfg.rule_for("decoder.layers.3.mlp.linear_fc2")
    assert (rule.compression, rule.method, rule.index) == (0.5, "auto", 1)
    assert cfg.rule_for("decoder.layers.3.self_attention.linear_qkv") is None
    assert cfg.rank_multiple == 64  # the default
    assert espace.ESPACEConfig.from_dict({**GOOD, "rank_multiple": "pow2"}).rank_multiple == "pow2"
    assert espace.ESPACEConfig.from_dict({**GOOD, "rank_multiple": 8}).rank_multiple == 8


def _with(**changes):
    import copy

    d = copy.deepcopy(GOOD)
    for path, value in changes.items():
        target = d
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        target[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return d


@pytest.mark.parametrize("data, field", [
    (_with(optimizer={"lr": 1}), r"optimizer: unknown key"),
    (_with(calibration__samples=4), r"calibration\.samples: unknown key"),
    (_with(layers__0__rnak=4), r"layers\[0\]\.rnak: unknown key"),
    (_with(calibration__methods=["mse", "pca"]), r"calibration\.methods\[1\]: unknown method 'pca'"),
    (_with(calibration__methods=[]), r"calibration\.methods: must be a non-empty list"),
    (_with(calibration__methods=["mse", "mse"]), r"calibration\.methods: lists a method twice"),
    (_with(calibration__max_device_gib=0), r"calibration\.max_device_gib: must be a positive"),
    (_with(calibration__max_device_gib="4G"), r"calibration\.max_device_gib: must be a positive"),
    (_with(layers__0__method="svd"), r"layers\[0\]\.method: unknown method 'svd'"),
    (_with(calibration__methods=["mse"]), r"layers\[0\]\.method: 'go_mse' is not in calibration"),
    (_with(layers__0__rank=-4), r"layers\[0\]\.rank: must be a positive integer, got -4"),
    (_with(layers__0__rank=2.5), r"layers\[0\]\.rank: must be a positive integer"),
    (_with(layers__1__compression=1.5), r"layers\[1\]\.compression: must be a number in \(0, 1\)"),
    (_with(layers__0__compression=0.5), r"layers\[0\]: give exactly one of 'rank' and"),
    (_with(layers__0__match=""), r"layers\[0\]\.match: must be a non-empty glob"),
    (_with(layers=[]), r"layers: must be a non-empty list"),
    (_with(layers=["x"]), r"layers\[0\]: must be a mapping"),
    ([1, 2], r"the config must be a mapping"),
    (_with(rank_multiple=0), r"rank_multiple: must be a positive integer or 'pow2', got 0"),
    (_with(rank_multiple="pow3"), r"rank_multiple: must be a positive integer or 'pow2'"),
    (_with(rank_multiple=True), r"rank_multiple: must be a positive integer or 'pow2'"),
    (_with(rank_multiple=16.0), r"rank_multiple: must be a positive integer or 'pow2'"),
])
def test_bad_fields_name_the_field(data, field):
    with pytest.raises(espace.ConfigError, match=r"^my\.yaml: " + field):
        espace.ESPACEConfig.from_dict(data, source="my.yaml")


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [\n")
    with pytest.raises(espace.ConfigError, match="bad.yaml: not valid YAML"):
        espace.ESPACEConfig.from_yaml(bad)
    with pytest.raises(espace.ConfigError, match="nope.yaml: cannot read"):
        espace.ESPACEConfig.from_yaml(tmp_path / "nope.yaml")
