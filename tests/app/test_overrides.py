from app.overrides import merge_overrides
from dfq.spec import JobSpec


def canonical(data):
    return JobSpec.model_validate(data).canonical()


def test_plain_fields_and_nested_fields_merge():
    base = canonical({"bits": "W4A4", "budget": "smoke", "seed": 1})
    out = JobSpec.model_validate(merge_overrides(base, {"seed": 2, "budget": {"lr_s": 0.5}}))
    assert (
        out.seed == 2 and out.budget.lr_s == 0.5 and out.budget.preset == "smoke" and out.budget.epochs == 2
    )


def test_bits_reset_first_and_last_layer_bits():
    base = canonical({"bits": "W4A4-F8L8"})
    out = JobSpec.model_validate(merge_overrides(base, {"bits": "W3A3"}))
    assert out.quant.label == "W3A3"
    out = JobSpec.model_validate(
        merge_overrides(base, {"bits": "W2A4-F8L8", "quant": {"per_channel": False}})
    )
    assert out.quant.label == "W2A4-F8L8" and out.quant.per_channel is False


def test_a_new_preset_replaces_the_old_presets_values():
    base = canonical({"budget": "smoke"})
    for override in ("cpu", {"preset": "cpu"}):
        out = JobSpec.model_validate(merge_overrides(base, {"budget": override}))
        assert out.budget.preset == "cpu" and out.budget.epochs == 20 and out.budget.batch_size == 128
    out = JobSpec.model_validate(merge_overrides(base, {"budget": {"preset": "cpu", "epochs": 6}}))
    assert out.budget.epochs == 6 and out.budget.batch_size == 128


def test_the_stored_spec_is_not_mutated():
    base = canonical({"budget": "smoke"})
    copy = {**base}
    merge_overrides(base, {"seed": 9, "budget": {"epochs": 5}})
    assert base == copy and base["budget"]["epochs"] == 2
