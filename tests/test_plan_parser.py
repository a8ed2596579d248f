"""The plan parser names what is wrong (issue 10, "no mismatch runs silently").

- Misspelt keys: an unknown key is named, with the known key it is close to (``did you mean``), also when
  the misspelling leaves a required key missing; a key that is no string is refused.
- Fuzz (hypothesis): random mutations of valid plans (and any text or number in place of one) either parse
  into a plan that spends what it says and round-trips through ``dump_plan`` (deterministic, byte-identical
  when written again) or raise a one-line :class:`PlanError` starting with a key path, never another
  exception.
- Regression tests for what the fuzz found: an alias cycle in ``budget.options`` (RecursionError), an int
  too large for a float (OverflowError), text with U+0085 written so that it reads back as a space.
"""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachec.runtime.plan import PlanError, dump_plan, parse_plan, realised_fraction

PLANS_DIR = Path(importlib.import_module("cachec.plans").__file__).parent
ROOT_KEYS = ("cachec_plan", "model", "sampler", "budget", "predicted_error", "history", "units", "sidecar",
             "provenance")


def _small() -> dict:
    """A small valid plan: 6 steps, 2 units, history ``used``, nested options, model source."""
    return {
        "cachec_plan": 1,
        "model": {"class": "DiTTransformer2DModel", "fingerprint": "sha256:" + "ab" * 32, "adapters": ["lora-a"],
                  "source": "digits-flow"},
        "sampler": {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "steps": 6,
            "timesteps": [1000.0, 800.0, 600.0, 400.0, 200.0, 100.0],
            "sigmas": [1.0, 0.8, 0.6, 0.4, 0.2, 0.1],
            "guidance": {"mode": "split", "scale": 4.5, "branches": 2},
            "resolution": [32, 48],
        },
        "budget": {
            "method": "manual",
            "target": 0.8,
            "realised": 0.8,
            "full_step_flops": 100.0,
            "fixed_step_flops": 20.0,
            "options": {"family": "group", "groups": [[0, 1], [2]], "ridge": 0.001, "flag": True, "none": None},
        },
        "predicted_error": 0.5,
        "history": "used",
        "units": [
            {"name": "a", "flops": 40.0, "actions": "CCCCCC", "compensation": {}},
            {"name": "b", "flops": 40.0, "actions": "CC.C..", "compensation": {
                2: {"coeffs": [1.5, -0.5]}, 4: {"coeffs": [1.0, 1.0, -1.0]}, 5: {"coeffs": [1.0]}}},
        ],
        "sidecar": None,
        "provenance": {"calibration_sha256": None, "conditions": 0, "samples": 0, "cachec_version": "0.1.0",
                       "created": None},
    }


def _shipped(name: str) -> dict:
    """A shipped plan cut to its first unit and its first unit with an ``eoc_alpha`` (if any), so that a
    round trip costs milliseconds; ``budget.realised`` is recomputed, so the cut plan stays valid."""
    d = yaml.safe_load((PLANS_DIR / name).read_text())
    eoc = [i for i, u in enumerate(d["units"]) if any("eoc_alpha" in c for c in u["compensation"].values())]
    d["units"] = [d["units"][i] for i in sorted({0, *eoc[:1]})]
    b = d["budget"]
    units = [SimpleNamespace(flops=u["flops"], actions=u["actions"]) for u in d["units"]]
    b["realised"] = realised_fraction(units, d["sampler"]["steps"], b["full_step_flops"], b["fixed_step_flops"])
    return d


BASES = {"small": _small(), "flow-40": _shipped("digits-flow-40.yaml"), "ddim-25": _shipped("digits-ddim-25.yaml")}


def _error(d: dict) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan(d)
    return str(info.value)


def _rename(mapping: dict, old, new) -> None:
    """Rename a key in place, keeping the key order."""
    items = [((new if k == old else k), v) for k, v in mapping.items()]
    mapping.clear()
    mapping.update(items)


@pytest.mark.parametrize("name", sorted(BASES))
def test_bases_are_valid(name):
    plan = parse_plan(copy.deepcopy(BASES[name]))
    assert parse_plan(yaml.safe_load(dump_plan(plan))) == plan


@pytest.mark.parametrize("name", ["digits-flow-40.yaml", "digits-ddim-25.yaml"])
def test_shipped_plans_parse_and_write_back_byte_identical(name):
    text = (PLANS_DIR / name).read_text()
    assert dump_plan(parse_plan(yaml.safe_load(text))) == text


# ------------------------------------------------------------------------------------------- misspelt keys


def test_misspelt_root_key_is_named_with_a_suggestion():
    d = _small()
    _rename(d, "model", "modle")
    assert _error(d) == "<root>: unknown key(s) modle (did you mean 'model'?)"


@pytest.mark.parametrize("where,old,new", [
    (("model",), "fingerprint", "fingerprnt"),
    (("model",), "source", "sourse"),  # an optional key
    (("sampler",), "timesteps", "timestep"),
    (("sampler", "guidance"), "branches", "branch"),
    (("budget",), "full_step_flops", "full_step_flop"),
    (("provenance",), "calibration_sha256", "calibration_sha"),
])
def test_misspelt_nested_key_is_named_with_a_suggestion(where, old, new):
    d = _small()
    node = d
    for k in where:
        node = node[k]
    _rename(node, old, new)
    assert _error(d) == f"{'.'.join(where)}: unknown key(s) {new} (did you mean {old!r}?)"


def test_misspelt_sidecar_key_is_named_with_a_suggestion():
    d = copy.deepcopy(BASES["flow-40"])
    _rename(d["sidecar"], "sha256", "sha265")
    assert _error(d) == "sidecar: unknown key(s) sha265 (did you mean 'sha256'?)"


def test_misspelt_unit_key_is_named_with_a_suggestion():
    d = _small()
    _rename(d["units"][1], "actions", "actons")
    assert _error(d) == "units[1]: unknown key(s) actons (did you mean 'actions'?)"


@pytest.mark.parametrize("old,new", [("coeffs", "coefs"), ("coeffs", "Coeffs")])
def test_misspelt_compensation_key_is_named_with_a_suggestion(old, new):
    d = _small()
    _rename(d["units"][1]["compensation"][2], old, new)
    assert _error(d) == f"units[1].compensation[2]: unknown key(s) {new} (did you mean {old!r}?)"


def test_misspelt_optional_compensation_key_is_not_dropped_silently():
    d = copy.deepcopy(BASES["flow-40"])
    unit = d["units"][1]
    step = next(s for s, c in unit["compensation"].items() if "eoc_alpha" in c)
    _rename(unit["compensation"][step], "eoc_alpha", "eoc_alfa")
    assert _error(d) == f"units[1].compensation[{step}]: unknown key(s) eoc_alfa (did you mean 'eoc_alpha'?)"


def test_unknown_key_without_close_match_is_named_without_a_suggestion():
    d = _small()
    d["units"][1]["compensation"][2]["gain"] = 1.0
    assert _error(d) == "units[1].compensation[2]: unknown key(s) gain"
    d = _small()
    d["model"]["weights"] = "x.safetensors"
    assert _error(d) == "model: unknown key(s) weights"


def test_unknown_key_and_an_unrelated_missing_key_are_reported_together():
    d = _small()
    del d["model"]["fingerprint"]
    d["model"]["weights"] = "x.safetensors"
    assert _error(d) == "model: unknown key(s) weights; missing required key(s) fingerprint"


def test_several_unknown_keys_are_each_named_with_their_own_suggestion():
    d = _small()
    _rename(d["budget"], "target", "targt")
    d["budget"]["speed"] = 2
    _rename(d["budget"], "realised", "realized")
    assert _error(d) == ("budget: unknown key(s) realized (did you mean 'realised'?), speed, "
                         "targt (did you mean 'target'?)")


def test_a_key_already_present_is_not_suggested():
    d = _small()
    d["sampler"]["step"] = 6  # 'steps' is there: 'step' is an extra key, not a misspelling of it
    assert _error(d) == "sampler: unknown key(s) step"


def test_an_odd_unknown_key_is_quoted():
    d = _small()
    d["history "] = "used"
    assert _error(d) == "<root>: unknown key(s) 'history '"


def test_missing_key_without_an_unknown_key_is_reported_as_missing():
    d = _small()
    del d["budget"]["target"]
    assert _error(d) == "budget.target: missing required key"
    d = _small()
    del d["provenance"]
    assert _error(d) == "provenance: missing required key"


@pytest.mark.parametrize("key,shown", [(1, "int 1"), (None, "null"), (True, "bool True"), (2.5, "float 2.5")])
@pytest.mark.parametrize("where,path", [
    ((), "<root>"), (("model",), "model"), (("units", 0), "units[0]"),
    (("units", 1, "compensation", 2), "units[1].compensation[2]"),
])
def test_keys_that_are_not_strings_are_refused(where, path, key, shown):
    d = _small()
    node = d
    for k in where:
        node = node[k]
    node[key] = "x"
    message = _error(d)
    assert message.startswith(f"{path}: keys must be strings, got {shown} ")
    assert "quote" in message


def test_yaml_boolean_key_from_a_file_is_refused_with_a_hint():
    text = yaml.safe_dump(_small(), sort_keys=False) + "on: 1\n"  # YAML 1.1 reads the key `on` as true
    assert _error(yaml.safe_load(text)).startswith("<root>: keys must be strings, got bool True")


# ------------------------------------------------------------------------------------------------ fuzzing

# all of Unicode, and the characters that YAML writers and readers treat specially (U+0085 is a line break)
_SPECIAL = "aC. \x00\t\n\r\x85\u2028\u2029\ufeffé'\"#:-&*!|>%@`{}[],?0123456789"
_TEXT = st.one_of(st.text(max_size=6), st.text(_SPECIAL, max_size=6), st.sampled_from([
    "C", ".", "CC.", "1e6", "1.0e+6", "sha256:" + "0" * 64, "0" * 64, "computed", "used", "batched", "none",
    "manual", "yes", "null", "~", "<<", "=", "", "a\x85b", "\x85", "a\u2028b", " x", "x ", "- x", "a: b", "0x1f",
]))
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.integers(),
    st.sampled_from([-1, 0, 1, 2, 10**30, -(10**30), 10**400, -(10**400)]),
    st.floats(),  # nan, inf, subnormals, -0.0 included
    st.sampled_from([1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 0.5, 1.0]),
    _TEXT,
)
_NUMBERS = st.one_of(st.floats(-2.0, 2.0), st.integers(-2, 100), st.sampled_from([10**400, -(10**400), 1e308, 5e-324]))
_KEYS = st.one_of(_TEXT, st.integers(-1, 60), st.none(), st.booleans(), st.sampled_from(ROOT_KEYS + (
    "class", "fingerprint", "adapters", "source", "steps", "timesteps", "sigmas", "guidance", "coeffs",
    "eoc_alpha", "name", "flops", "actions", "compensation", "file", "sha256", "options", "realised")))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=6,
)


def _typo(data, key):
    """A near miss of ``key`` (a character dropped, doubled, swapped or changed, upper case) or another key."""
    if not isinstance(key, str) or not key:
        return data.draw(_KEYS)
    i = data.draw(st.integers(0, len(key) - 1))
    how = data.draw(st.sampled_from(["drop", "double", "swap", "change", "case", "other"]))
    if how == "drop":
        return key[:i] + key[i + 1:]
    if how == "double":
        return key[:i] + key[i] + key[i:]
    if how == "swap":
        return key[:i] + key[i + 1:i + 2] + key[i] + key[i + 2:]
    if how == "change":
        return key[:i] + data.draw(st.sampled_from("aez_1 ")) + key[i + 1:]
    if how == "case":
        return key.upper()
    return data.draw(_KEYS)


def _nodes(d: dict) -> dict[int, list[tuple]]:
    """``{depth: [(container, key), ...]}`` for every value of the tree below the root (cycles cut)."""
    out: dict[int, list[tuple]] = {}
    seen = {id(d)}
    todo = [(d, 1)]
    while todo:
        node, depth = todo.pop()
        for k in list(node) if isinstance(node, dict) else range(len(node)):
            out.setdefault(depth, []).append((node, k))
            child = node[k]
            if isinstance(child, (dict, list)) and id(child) not in seen:
                seen.add(id(child))
                todo.append((child, depth + 1))
    return out


def _mutate(data, d: dict) -> None:
    """One random mutation of ``d`` in place: a depth, then a value at that depth, then an operation that
    fits the value (every depth is as likely, so deep values such as coefficients are reached as often as
    root keys)."""
    nodes = _nodes(d)
    depth = data.draw(st.sampled_from([0, *sorted(nodes)]), label="depth")
    if depth == 0:
        if data.draw(st.booleans()):
            d["cachec_plan"] = data.draw(st.sampled_from([0, 2, -1, True, 1.0, "1", None, 10**400]))
        else:
            d[data.draw(_KEYS)] = data.draw(_VALUES)
        return
    parent, key = data.draw(st.sampled_from(nodes[depth]), label="node")
    value = parent[key]
    ops = ["replace", "alias"] + (["delete", "rename"] if isinstance(parent, dict) else ["delete"])
    if isinstance(value, dict):
        ops += ["add"]
    if isinstance(value, list):
        ops += ["cut", "extend", "duplicate"]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        ops += ["same_type"] * 3  # a str for a str, a number for a number: often valid, so round trips are run
    if isinstance(value, str):
        ops += ["edit", "cut", "extend"]
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "replace":
        parent[key] = data.draw(_VALUES)
    elif op == "alias":  # a YAML alias cycle (`&a {x: *a}`)
        parent[key] = parent
    elif op == "delete":
        del parent[key]
    elif op == "rename":
        _rename(parent, key, _typo(data, key))
    elif op == "add":
        value[data.draw(_KEYS)] = data.draw(_VALUES)
    elif op == "duplicate" and value:
        i = data.draw(st.integers(0, len(value) - 1))
        value.insert(i, copy.deepcopy(value[i]))  # e.g. a unit listed twice
    elif op == "same_type":
        parent[key] = data.draw(_TEXT if isinstance(value, str) else _NUMBERS)
    elif op == "cut":
        parent[key] = value[:data.draw(st.integers(0, len(value)))]
    elif op == "extend":
        extra = data.draw(st.text(alphabet="C.", min_size=1, max_size=3)) if isinstance(value, str) else [
            data.draw(st.sampled_from(value) if value else _VALUES)]
        parent[key] = value + extra
    elif op == "edit" and value:
        i = data.draw(st.integers(0, len(value) - 1))
        parent[key] = value[:i] + data.draw(st.sampled_from("C.c-x \n")) + value[i + 1:]


_PATH = re.compile(r"<root>:|(" + "|".join(ROOT_KEYS) + r")\b")


def _parses_and_round_trips_or_raises_plan_error(d: dict) -> None:
    try:
        plan = parse_plan(d)
    except PlanError as exc:
        message = str(exc)
        assert _PATH.match(message), message  # starts with the key path
        assert "\n" not in message, message
        return
    b = plan.budget  # an accepted plan spends what it says
    assert abs(realised_fraction(plan.units, plan.steps, b.full_step_flops, b.fixed_step_flops) - b.realised) <= (
        1e-6 * b.realised)
    text = dump_plan(plan)
    assert dump_plan(plan) == text  # deterministic
    again = parse_plan(yaml.safe_load(text))
    assert again == plan
    assert dump_plan(again) == text


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_plans_parse_and_round_trip_or_raise_plan_error(data):
    d = copy.deepcopy(BASES[data.draw(st.sampled_from(sorted(BASES)), label="base")])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        _mutate(data, d)
    _parses_and_round_trips_or_raises_plan_error(d)


_ANY_NUMBER = st.floats(allow_nan=False, allow_infinity=False) | st.integers()


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_any_text_or_number_in_place_of_one_parses_and_round_trips_or_raises_plan_error(data):
    """Mostly valid plans, so that the writer is tried on any text (all of Unicode) and any number."""
    d = copy.deepcopy(BASES[data.draw(st.sampled_from(sorted(BASES)), label="base")])
    for _ in range(data.draw(st.integers(1, 2), label="changes")):
        leaves = [(c, k) for nodes in _nodes(d).values() for c, k in nodes]
        texts = [(c, k) for c, k in leaves if isinstance(c[k], str)]
        numbers = [(c, k) for c, k in leaves if isinstance(c[k], (int, float)) and not isinstance(c[k], bool)]
        if data.draw(st.booleans(), label="text"):
            parent, key = data.draw(st.sampled_from(texts))
            parent[key] = data.draw(_TEXT)
        else:
            parent, key = data.draw(st.sampled_from(numbers))
            parent[key] = data.draw(_ANY_NUMBER)
    _parses_and_round_trips_or_raises_plan_error(d)


# ------------------------------------------------------------------------ regressions (found by the fuzz)


def test_alias_cycle_in_options_is_a_plan_error():
    text = yaml.safe_dump(_small(), sort_keys=False).replace("options:\n", "options: &opts\n    self: *opts\n", 1)
    d = yaml.safe_load(text)  # was: RecursionError
    assert d["budget"]["options"]["self"] is d["budget"]["options"]
    assert _error(d) == "budget.options.self: the value contains itself (a YAML alias cycle)"
    d = _small()
    d["budget"]["options"]["groups"].append(d["budget"]["options"]["groups"])
    assert _error(d) == "budget.options.groups[2]: the value contains itself (a YAML alias cycle)"


def test_shared_alias_in_options_is_accepted():
    d = _small()
    shared = [1, 2]
    d["budget"]["options"]["a"] = d["budget"]["options"]["b"] = shared  # `a: &x [1, 2]`, `b: *x`
    plan = parse_plan(d)
    assert parse_plan(yaml.safe_load(dump_plan(plan))) == plan


@pytest.mark.parametrize("where,path", [
    (("sampler", "timesteps", 3), "sampler.timesteps[3]"),
    (("units", 0, "flops"), "units[0].flops"),
    (("units", 1, "compensation", 2, "coeffs", 0), "units[1].compensation[2].coeffs[0]"),
    (("budget", "full_step_flops"), "budget.full_step_flops"),
])
def test_int_too_large_for_a_float_is_a_plan_error(where, path):
    d = _small()
    node = d
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = 10**400  # YAML reads `1000...0` (401 digits) as an int; float() raised OverflowError
    assert _error(d) == f"{path}: must be finite, got an int too large for a float"


def test_flops_overflowing_a_float_do_not_pass_the_realised_check():
    d = _small()  # Σ flops·count and steps·full_step_flops both overflow: inf/inf = nan passed the check silently
    d["budget"]["full_step_flops"] = 1e308
    d["units"][0]["flops"] = 5e307
    d["budget"]["fixed_step_flops"] = 0.0
    assert _error(d).startswith("budget.full_step_flops: 1e+308 × 6 steps overflows a float")


def test_option_key_with_a_newline_keeps_the_message_on_one_line():
    d = _small()
    d["budget"]["options"]["a\nb"] = float("nan")
    assert _error(d) == "budget.options.'a\\nb': must be finite, got nan"


@pytest.mark.parametrize("text", ["\x85", "a\x85b", "digits\x85"])
def test_text_with_a_yaml_line_break_character_round_trips(text):
    d = _small()  # PyYAML wrote U+0085 raw in single quotes, which reads back as a space: 'a b' came back
    d["model"]["class"] = d["units"][0]["name"] = d["provenance"]["cachec_version"] = text
    d["budget"]["options"][text] = [text]
    plan = parse_plan(d)
    written = dump_plan(plan)
    assert parse_plan(yaml.safe_load(written)) == plan
    assert plan.model.cls == plan.units[0].name == text and plan.budget.options[text] == [text]
