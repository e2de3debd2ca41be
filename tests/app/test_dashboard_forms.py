"""The new-job form generated from JobSpec: form -> spec, errors -> fields, spec -> form (clone)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.web import specform
from dfq.spec import JobSpec


def _submit(values: dict[str, str], blocks: list[str]) -> JobSpec:
    return JobSpec.model_validate(specform.spec_data(values, blocks))


def test_every_method_block_and_budget_field_is_in_the_form():
    names = specform.all_fields()
    for block, (model, _) in specform.BLOCKS.items():
        assert {f"method.{block}.{n}" for n in model.model_fields} <= set(names)
    assert {"budget.epochs", "budget.lr_milestones", "quant.act_range", "method.kd_reduction"} <= set(names)
    assert "budget.g_betas" not in names and "quant.w_bits" not in names  # bits sets those
    assert "quant.preset" not in names and "quant.preset" in specform.TOP_LEVEL  # a select of its own


def test_the_quant_preset_select_sets_the_preset_and_its_placeholders_show_its_values():
    values, _ = specform.defaults()
    assert _submit(values, []).quant.preset is None  # "reference" is the default
    spec = _submit({**values, "quant.preset": "recon", "quant.round_act_lr": "0.001"}, [])
    assert spec.quant.preset == "recon" and spec.quant.round_unit == "block"
    assert spec.quant.round_act_lr == 0.001  # a filled field beats the preset
    shown = specform.quant_presets()
    assert shown[""]["weight_round"] == "nearest" and shown["recon"]["weight_round"] == "adaround"
    assert "w_bits" not in shown["recon"] and "preset" not in shown["recon"]


def test_the_recon_preset_with_nearest_rounding_picked_on_the_form_is_a_job_not_an_error():
    values, _ = specform.defaults()
    spec = _submit({**values, "quant.preset": "recon", "quant.weight_round": "nearest"}, [])
    assert (spec.quant.weight_round, spec.quant.round_unit, spec.quant.round_act) == (
        "nearest",
        "layer",
        "fixed",
    )
    assert spec.quant.round_drop == 0 and spec.quant.act_equalize == "depthwise"  # the ranges stay


@pytest.mark.parametrize("select", ["quant.preset", "budget.preset"])
def test_an_unknown_preset_name_is_reported_on_its_own_select(select: str):
    """Only a hand-made POST can send one; its error belongs on the select, not the section."""
    values, _ = specform.defaults()
    with pytest.raises(ValidationError) as exc:
        _submit({**values, select: "nope"}, [])
    errors = specform.validation_errors(exc.value)
    assert list(errors) == [select]
    assert errors[select][0].startswith(f"unknown {select.split('.')[0]} preset 'nope'; known: ")


def test_ticked_blocks_make_the_combined_preset_and_empty_fields_keep_preset_values():
    values, _ = specform.defaults()
    spec = _submit({**values, "budget.preset": "smoke", "budget.epochs": "3"}, ["lrq", "dsg"])
    assert spec.method.preset == "dsg+lrq" and spec.method.dsg and spec.method.lrq
    assert spec.budget.epochs == 3 and spec.budget.batch_size == 16  # the rest from the smoke preset
    fdda = _submit({**values, "method.fdda.centers": "few-shot"}, ["fdda"])
    assert fdda.method.preset == "fdda-fewshot" and fdda.method.fdda.calib_set == "fashion-mnist-train"
    assert fdda.method.g_ce_weight == 0.5  # the preset's method-level value, not the baseline's


def test_unticking_a_component_switch_sends_false():
    values, _ = specform.defaults()
    spec = _submit({**values, "method.dsg.sci": "false"}, ["dsg"])
    assert spec.method.dsg.sci is False and spec.method.dsg.lse is True
    assert "dsg.sci" not in spec.method.components


def test_errors_land_on_the_field_they_are_about():
    values, _ = specform.defaults()
    bad = {**values, "bits": "W1A1", "seed": "seven", "method.dsg.sda_percentile": "120"}
    with pytest.raises(ValidationError) as exc:
        _submit(bad, ["dsg"])
    errors = specform.validation_errors(exc.value)
    assert set(errors) == {"bits", "seed", "method.dsg.sda_percentile"}
    assert len(errors["bits"]) == 1  # w_bits and a_bits say the same thing once
    with pytest.raises(ValidationError) as exc:
        _submit({**values, "budget.epochs": "2", "budget.warmup_epochs": "4"}, [])
    assert list(specform.validation_errors(exc.value)) == ["budget"]  # the fieldset's error
    with pytest.raises(specform.FormErrors) as form_exc:
        specform.spec_data({**values, "bits": "8 bits", "budget.lr_milestones": "ten", "extra": "[1]"}, [])
    assert set(form_exc.value.errors) == {"bits", "budget.lr_milestones", "extra"}


@pytest.mark.parametrize(
    "shorthand",
    [
        {"method": "gdfq", "bits": "W4A4", "budget": "smoke", "seed": 3, "device": "cpu"},
        {
            "method": {"preset": "dsg+lrq", "lrq": {"dkd": False, "ama_margin": 0.2}},
            "bits": "W3A3-F8L8",
            "budget": {"preset": "cpu", "epochs": 30, "lr_milestones": [12, 24]},
            "quant": {"act_range": "plain", "per_channel": False},
            "eval": "fashion-mnist",
            "eval_limit": 500,
        },
        {"method": "fdda-fewshot", "budget": "paper"},
        {"bits": "W3A3", "quant": {"preset": "recon", "round_iters": 500}, "budget": "calibrate"},
        {"method": {"preset": "acq", "acq": {"stage": "layer2", "pair_weight": 0.0}}, "budget": "smoke"},
    ],
)
def test_the_clone_form_reproduces_the_spec_exactly(shorthand):
    spec = JobSpec.model_validate(shorthand)
    values, blocks = specform.form_values(spec.canonical())
    assert _submit(values, blocks).canonical() == spec.canonical()


def test_error_field_walks_up_to_the_nearest_known_name():
    names = specform.known_names()
    assert specform.error_field(("budget", "lr_milestones", 0), names) == "budget.lr_milestones"
    assert specform.error_field(("quant", "a_bits"), names) == "bits"
    assert specform.error_field(("method", "dsg"), names) == "method.dsg"
    assert specform.error_field(("nothing",), names) == ""


def test_bundled_teachers_offer_the_quick_one_first():
    from app.bundled import DEFAULT_TEACHER, manifest, names

    assert names()[0] == DEFAULT_TEACHER and sorted(names()) == sorted(manifest())
