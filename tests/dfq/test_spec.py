import contextlib
import json

import pytest
from pydantic import ValidationError

from dfq.job import load_completed
from dfq.spec import QUANT_PRESETS, JobSpec, QuantSpec, parse_bits, parse_spec, same_spec


def test_shorthand_from_the_issue():
    spec = JobSpec.model_validate(
        {"method": "gdfq", "bits": "W4A4", "budget": "cpu", "seed": 0, "eval": "fashion-mnist"}
    )
    assert (spec.quant.w_bits, spec.quant.a_bits) == (4, 4)
    assert spec.budget.preset == "cpu" and spec.budget.batch_size == 128
    assert spec.budget.total_iters == 400
    assert spec.method.kd_reduction == "mean" and spec.method.bns_weight == 0.1
    assert spec.quant.act_range == "debiased"  # the correct EMA is the default


def test_canonical_round_trip_is_exact():
    spec = JobSpec.model_validate(
        {"bits": "W3A3-F8L8", "budget": {"preset": "smoke", "epochs": 5}, "seed": 3}
    )
    again = JobSpec.model_validate(spec.canonical())
    assert again == spec
    assert spec.budget.epochs == 5 and spec.budget.batch_size == 16  # override on top of the preset
    assert spec.quant.layers_label == "F8L8" and spec.quant.label == "W3A3-F8L8"


def test_bits_shorthand_parse():
    assert parse_bits("w8a8") == {"w_bits": 8, "a_bits": 8}
    assert parse_bits("W4A4F8L8")["first_layer_bits"] == 8
    with pytest.raises(ValueError):
        parse_bits("4bit")


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"bits": "W0A4"}, "quant.w_bits"),
        ({"bits": "W33A4"}, "quant.w_bits"),
        ({"quant": {"a_bits": 1}}, "quant.a_bits"),
        ({"budget": {"epochs": -1}}, "budget.epochs"),
        ({"budget": {"batch_size": 10**6}}, "budget.batch_size"),
        ({"budget": "weekend"}, "budget"),
        ({"method": {"kd_reduction": "sum"}}, "method.kd_reduction"),
        ({"method": {"frobnicate": 1}}, "method.frobnicate"),
        ({"device": "tpu"}, "device"),
        ({"budget": {"epochs": 4, "warmup_epochs": 5}}, "budget"),
    ],
)
def test_impossible_values_fail_with_the_field_named(bad, field):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(bad)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(loc.startswith(field) for loc in locs), locs


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValidationError, match="unknown method preset 'dgs'"):
        JobSpec.model_validate({"method": "dsg+dgs"})


@pytest.mark.parametrize("key", ["method", "bits", "budget", "seed", "eval", "quant", "speed", "export"])
@pytest.mark.parametrize(
    "value", [[1], ["cpu"], {"a": 1}, 3.5, None, "", {"preset": ["cpu"]}, {"preset": {"a": 1}}, {"preset": 3}]
)
def test_values_of_the_wrong_type_are_validation_errors_not_crashes(key, value):
    """The API turns ValidationError into a 422; anything else would be a 500 (found by the fuzzer)."""
    with contextlib.suppress(ValidationError):
        JobSpec.model_validate({key: value})


def test_a_quant_preset_fills_what_is_not_given_and_survives_the_round_trip():
    spec = JobSpec.model_validate({"bits": "W3A3", "quant": "recon", "budget": "calibrate"})
    for field, value in QUANT_PRESETS["recon"].items():
        assert getattr(spec.quant, field) == value, field
    assert (spec.quant.w_bits, spec.quant.a_bits) == (3, 3)  # bits still come from "bits"
    assert "quant=recon" in spec.summary()
    assert JobSpec.model_validate(spec.canonical()) == spec
    mine = JobSpec.model_validate({"bits": "W4A4", "quant": {"preset": "recon", "act_mse_weight": "uniform"}})
    assert mine.quant.act_mse_weight == "uniform" and mine.quant.round_act == "lsq"  # given beats the preset
    # the canonical form holds every field, so a field edited there beats the preset on re-validation
    edited = {**spec.canonical(), "quant": {**spec.canonical()["quant"], "round_act": "fixed"}}
    assert JobSpec.model_validate(edited).quant.round_act == "fixed"
    assert QuantSpec().preset is None and QuantSpec().weight_round == "nearest"  # the reference by default
    with pytest.raises(ValidationError, match="unknown quant preset 'brecq'; known: recon"):
        JobSpec.model_validate({"quant": "brecq"})
    with pytest.raises(ValidationError, match=r"round_act 'lsq' needs quant\.round_unit 'block'"):
        JobSpec.model_validate({"quant": {"preset": "recon", "round_unit": "layer", "round_act": "lsq"}})


@pytest.mark.parametrize(
    ("given", "off"),
    [
        ({"weight_round": "nearest"}, {"round_drop", "round_unit", "round_act", "round_act_lr"}),
        ({"round_unit": "layer"}, {"round_act", "round_act_lr"}),
        ({"round_act": "fixed"}, {"round_act_lr"}),
        ({"act_clip": "minmax"}, {"act_equalize", "act_mse_weight"}),
        ({"per_channel": "false"}, {"act_equalize"}),  # as a form sends it
    ],
)
def test_overriding_a_preset_field_switches_off_the_preset_fields_that_serve_it(given, off):
    """``{"preset": "recon", "weight_round": "nearest"}`` is the recipe without its rounding, not a 422."""
    quant = JobSpec.model_validate({"bits": "W3A3", "quant": {"preset": "recon", **given}}).quant
    default = QuantSpec()
    for field, value in QUANT_PRESETS["recon"].items():
        if field in given:
            continue
        expected = getattr(default, field) if field in off else value
        assert getattr(quant, field) == expected, field
    assert quant.preset == "recon"


def test_the_recon_preset_without_rounding_is_the_spec_the_benchmarks_spelt_out():
    short = {"preset": "recon", "weight_round": "nearest"}
    long = {**short, "round_drop": 0, "round_unit": "layer", "round_act": "fixed"}
    assert JobSpec.model_validate({"quant": short}) == JobSpec.model_validate({"quant": long})
    with pytest.raises(ValidationError, match=r"round_unit needs quant\.weight_round 'adaround'"):
        JobSpec.model_validate({"quant": {**short, "round_unit": "block"}})  # given in conflict: an error


def test_same_spec_accepts_a_spec_written_before_a_field_existed():
    spec = parse_spec({"method": "acq", "bits": "W3A3", "budget": "cpu", "seed": 2})
    stored = spec.canonical()
    del stored["speed"]["fused_upsample"]  # as an older dfq wrote it
    del stored["budget"]["clip_grad_s"]
    del stored["quant"]["preset"]
    assert same_spec(stored, spec)
    assert not same_spec({**spec.canonical(), "seed": 3}, spec)
    assert not same_spec({**spec.canonical(), "seed": -1}, spec)  # invalid now: never the same
    assert not same_spec(None, spec)  # a report without a spec


def test_a_finished_report_from_an_older_dfq_is_reused(tmp_path):
    spec = parse_spec({"method": "gdfq", "bits": "W4A4", "budget": "smoke"})
    stored = spec.canonical()
    del stored["method"]["lr_s_scale"]
    (tmp_path / "report.json").write_text(json.dumps({"spec": stored, "q_top1": 50.0}))
    assert load_completed(tmp_path, spec)["q_top1"] == 50.0
    other = parse_spec({"method": "gdfq", "bits": "W4A4", "budget": "smoke", "seed": 1})
    assert load_completed(tmp_path, other) is None


@pytest.mark.parametrize(
    "bits,lr",
    [
        ("W8A8", 1e-4),
        ("W8A8-F8L8", 1e-4),
        ("W16A8", 1e-4),
        ("W4A4", 1e-3),
        ("W8A4", 1e-3),
        ("W4A4-F8L8", 1e-3),
    ],
)
def test_cpu_budget_keeps_the_papers_student_lr_only_when_no_layer_is_below_8_bits(bits, lr):
    spec = parse_spec({"bits": bits, "budget": "cpu"})
    assert spec.budget.student_lr(spec.quant) == lr


def test_an_explicit_lr_s_applies_at_every_bit_width():
    """A user who sets lr_s means it: the preset's 8-bit lr must not silently replace it at W8A8."""
    spec = parse_spec({"bits": "W8A8", "budget": {"preset": "cpu", "lr_s": 5e-4}})
    assert spec.budget.lr_s_8bit is None and spec.budget.student_lr(spec.quant) == 5e-4
    both = parse_spec({"bits": "W8A8", "budget": {"preset": "cpu", "lr_s": 5e-4, "lr_s_8bit": 2e-5}})
    assert both.budget.student_lr(both.quant) == 2e-5
    assert JobSpec.model_validate(spec.canonical()) == spec  # the cleared value survives a round trip
    # a cpu spec stored before the field existed ran at lr_s at every bit-width: never the 8-bit lr
    stored = parse_spec({"bits": "W8A8", "budget": "cpu"}).canonical()
    del stored["budget"]["lr_s_8bit"]
    assert JobSpec.model_validate(stored).budget.student_lr(spec.quant) == 1e-3


def test_warmup_to_the_end_is_calibration_only():
    b = JobSpec.model_validate({"budget": "calibrate"}).budget
    assert b.warmup_epochs == b.epochs and b.student_steps == 0 and b.total_iters == 80
    assert JobSpec.model_validate({"budget": "cpu"}).budget.student_steps == 320


@pytest.mark.parametrize(
    "method,named",
    [
        ("dsg", "dsg.sda"),
        ("fdda", "zero-shot fdda"),
        ("lrq", "lrq.dkd"),
        ({"preset": "lrq", "lrq": {"dkd": False}}, None),
        ({"preset": "acq", "acq": {"acm_weight": 0, "pair_weight": 0, "consistency_weight": 0}}, None),
        ("gdfq", None),
    ],
)
def test_a_calibration_only_budget_refuses_components_it_would_never_reach(method, named):
    spec = {"method": method, "budget": "calibrate"}
    if named is None:
        assert JobSpec.model_validate(spec).budget.student_steps == 0
        return
    with pytest.raises(ValidationError, match=f"calibration-only budget .*{named}"):
        JobSpec.model_validate(spec)
    JobSpec.model_validate({**spec, "budget": "cpu"})  # the same method is fine with student epochs
