"""Checks of a JobSpec against a concrete teacher, run before any work starts (CLI, API and worker).

Spec-only checks live in the pydantic models; these need the model itself (its stages, its layers).
"""

from __future__ import annotations

from torch import nn

from dfq.attention import spatial_stages
from dfq.models.checkpoint import require_batchnorm
from dfq.quant.adaround import MAX_CAPTURE_BYTES, capture_bytes
from dfq.spec import JobSpec


class SpecError(ValueError):
    """The spec cannot run on this teacher; ``field`` says which part of the spec is at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def validate_for_teacher(
    spec: JobSpec, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int
) -> None:
    require_batchnorm(model)
    if num_classes < 2:
        raise SpecError("teacher", "a classifier with at least 2 classes is needed")
    m = spec.method
    if m.acq:
        stages = spatial_stages(model, input_shape)
        if m.acq.stage is not None:
            names = [n for n, _ in spatial_stages(model, input_shape, min_size=2)]
            try:
                model.get_submodule(m.acq.stage)
            except AttributeError:
                raise SpecError(
                    "method.acq.stage",
                    f"the teacher has no module {m.acq.stage!r}; candidates: {', '.join(names) or 'none'}",
                ) from None
            if m.acq.stage not in names:
                raise SpecError(
                    "method.acq.stage",
                    f"{m.acq.stage!r} does not output a spatial feature map of at least 2x2",
                )
        elif not stages:
            raise SpecError(
                "method.acq",
                f"ACQ needs a teacher stage with a spatial feature map of at least 4x4; this model at input {input_shape} has none",
            )
    if m.lrq and m.lrq.ama and not any(isinstance(x, nn.Linear) for x in model.modules()):
        raise SpecError("method.lrq.ama", "the teacher has no final Linear layer to take class centers from")
    q = spec.quant
    if q.weight_round == "adaround":
        need, layer = capture_bytes(
            model, input_shape, q.round_images, float_inputs=q.round_drop > 0, by=q.round_unit
        )
        if need > MAX_CAPTURE_BYTES:
            raise SpecError(
                "quant.round_images",
                f"{q.round_images} images make {layer!r}'s captured inputs and outputs {need / 2**30:.1f} GiB, "
                f"over the {MAX_CAPTURE_BYTES / 2**30:.0f} GiB adaround holds; use at most "
                f"{q.round_images * MAX_CAPTURE_BYTES // need} images",
            )
