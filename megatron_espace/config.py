"""``ESPACEConfig``: which layers to project, at what rank, with which statistic.

YAML or dict (DESIGN section 5)::

    calibration:
      methods: [mse, nmse, go_mse, go_mse_l2, nl_mse, nl_mse_l2]
      dtype: auto                   # per-batch products: float32 (float64 for float64 models)
      max_skipped_fraction: 0.05    # batches with NaN/Inf a layer may skip before failing
      max_device_gib: 16            # per-GPU statistics budget; more passes when exceeded
    layers:                         # first match wins; glob over module names
      - match: "decoder.layers.*.mlp.linear_fc1"
        rank: 256                   # or  compression: 0.5
        method: go_mse              # or  auto
    rank_multiple: 64               # compression: X -> the largest multiple of 64 reaching X
                                    # (or  pow2: the largest power of two reaching X)

Every error is an :class:`ConfigError` naming the file (when there is one) and the
field, e.g. ``espace.yaml: layers[1].rank: must be a positive integer, got -4``.
"""

import dataclasses
import fnmatch
from pathlib import Path
from typing import List, Optional

import yaml

#: the six statistics of the paper (Section 3), in its order
METHODS = ("mse", "nmse", "go_mse", "go_mse_l2", "nl_mse", "nl_mse_l2")
#: weight-side baselines, usable wherever a method is: ``weight_svd`` projects onto W's top
#: right singular vectors, i.e. the truncated SVD of W at the same parameter count
BASELINES = ("weight_svd",)
KNOWN_METHODS = METHODS + BASELINES
AUTO = "auto"
#: ``rank_multiple``: a ``compression:`` rule's rank is a multiple of this (64 fills the 64-wide
#: reduction and output tiles of bf16 tensor-core GEMMs, so no tile runs part-empty), or
#: with ``pow2`` a power of two
RANK_MULTIPLE = 64
POW2 = "pow2"


class ConfigError(ValueError):
    """Bad ESPACE configuration; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """One ``layers:`` entry. Exactly one of ``rank`` and ``compression`` is set."""

    match: str
    rank: Optional[int] = None
    compression: Optional[float] = None
    method: str = AUTO
    index: int = 0  # position in ``layers:``, for error messages

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    methods: tuple = METHODS
    dtype: str = "auto"  # per-batch product dtype: auto (float32; float64 models: float64)
    max_skipped_fraction: float = 0.05  # batches with non-finite values a layer may skip
    max_device_gib: Optional[float] = None  # statistics budget per GPU (None: one pass)


@dataclasses.dataclass(frozen=True)
class ESPACEConfig:
    layers: List[LayerRule]
    calibration: CalibrationConfig = CalibrationConfig()
    source: str = "<dict>"  # the file it came from, for error messages
    rank_multiple: object = RANK_MULTIPLE  # int >= 1, or POW2

    @classmethod
    def from_yaml(cls, path) -> "ESPACEConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ESPACE config: {e.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, source: str = "<dict>") -> "ESPACEConfig":
        def fail(field, msg):
            raise ConfigError(f"{source}: {field}: {msg}")

        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the config must be a mapping with a 'layers' list")
        _no_unknown(data, {"calibration", "layers", "rank_multiple"}, "", fail)
        multiple = data.get("rank_multiple", RANK_MULTIPLE)
        if multiple != POW2 and (isinstance(multiple, bool) or not isinstance(multiple, int)
                                 or multiple < 1):
            fail("rank_multiple", f"must be a positive integer or {POW2!r}, got {multiple!r}")

        calib = data.get("calibration") or {}
        if not isinstance(calib, dict):
            fail("calibration", "must be a mapping")
        _no_unknown(calib, {"methods", "dtype", "max_skipped_fraction", "max_device_gib"},
                    "calibration.", fail)
        methods = calib.get("methods", list(METHODS))
        if not isinstance(methods, list) or not methods:
            fail("calibration.methods",
                 f"must be a non-empty list drawn from {list(KNOWN_METHODS)}")
        for i, m in enumerate(methods):
            if m not in KNOWN_METHODS:
                fail(f"calibration.methods[{i}]",
                     f"unknown method {m!r}; choose from {list(KNOWN_METHODS)}")
        if len(set(methods)) != len(methods):
            fail("calibration.methods", "lists a method twice")
        dtype = calib.get("dtype", "auto")
        if dtype not in ("auto", "float64", "float32"):
            fail("calibration.dtype", f"must be auto, float64 or float32, got {dtype!r}")
        skip = calib.get("max_skipped_fraction", 0.05)
        if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 <= skip <= 1:
            fail("calibration.max_skipped_fraction", f"must be a number in [0, 1], got {skip!r}")
        gib = calib.get("max_device_gib")
        if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float))
                                or not gib > 0):
            fail("calibration.max_device_gib", f"must be a positive number of GiB, got {gib!r}")

        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            fail("layers", "must be a non-empty list of {match, rank | compression, method}")
        rules = []
        for i, entry in enumerate(layers):
            field = f"layers[{i}]"
            if not isinstance(entry, dict):
                fail(field, "must be a mapping with 'match' and 'rank' or 'compression'")
            _no_unknown(entry, {"match", "rank", "compression", "method"}, f"{field}.", fail)
            match = entry.get("match")
            if not isinstance(match, str) or not match:
                fail(f"{field}.match", "must be a non-empty glob over module names")
            rank, comp = entry.get("rank"), entry.get("compression")
            if (rank is None) == (comp is None):
                fail(field, "give exactly one of 'rank' and 'compression'")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                     or rank <= 0):
                fail(f"{field}.rank", f"must be a positive integer, got {rank!r}")
            if comp is not None and (isinstance(comp, bool) or not isinstance(comp, (int, float))
                                     or not 0 < comp < 1):
                fail(f"{field}.compression", f"must be a number in (0, 1), got {comp!r}")
            method = entry.get("method", AUTO)
            if method != AUTO and method not in KNOWN_METHODS:
                fail(f"{field}.method",
                     f"unknown method {method!r}; choose from {list(KNOWN_METHODS) + [AUTO]}")
            if method != AUTO and method not in methods:
                fail(f"{field}.method", f"{method!r} is not in calibration.methods {methods}")
            rules.append(LayerRule(match, rank, None if comp is None else float(comp), method, i))
        return cls(rules, CalibrationConfig(tuple(methods), dtype, float(skip),
                                            None if gib is None else float(gib)),
                   source, multiple)

    def rule_for(self, name: str) -> Optional[LayerRule]:
        """The first rule whose glob matches ``name``, or None."""
        return next((r for r in self.layers if r.matches(name)), None)

    def error(self, rule: LayerRule, field: str, msg: str) -> ConfigError:
        """A :class:`ConfigError` for ``layers[i].<field>`` of this config."""
        return ConfigError(f"{self.source}: layers[{rule.index}].{field}: {msg}")


def _no_unknown(mapping, allowed, prefix, fail):
    for key in mapping:
        if key not in allowed:
            fail(f"{prefix}{key}", f"unknown key; allowed keys are {sorted(allowed)}")
