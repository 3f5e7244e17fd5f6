"""ModelInfo: what ListModels / GetModel say of a model, from its `ModelDescription` and the server's limits.

Every capability a client reads before sending (methods per model, modality and text spec, CAM layers with
their layouts, the adopted default method, whether Expected Gradients has a reference set) is filled here, in
one place, from what the workers described.
"""
from __future__ import annotations

from service._proto import attribution_pb2 as pb
from service.codec import METHOD_ENUMS
from service.text_inputs import modality_fields
from workers.spec import ModelDescription


def model_info(model: ModelDescription, limits, max_job_items: int = 0) -> pb.ModelInfo:
    """A model's description and the server's limits as ModelInfo (`limits`: service.config.Limits).

    max_job_items: items per SubmitJob request; 0 when the server runs no offline jobs.
    """
    image = None if model.modality == "text" else pb.InputSpec(  # a text model's input is its text_spec
        channels=model.channels, height=model.height, width=model.width, mean=list(model.mean), std=list(model.std),
        resize=model.resize, crop_fraction=model.crop_fraction)
    return pb.ModelInfo(
        name=model.name, version=model.version, input_spec=image,
        num_classes=model.num_classes, class_labels=list(model.labels), cam_layers=list(model.cam_layers),
        default_cam_layer=model.default_cam_layer,
        online_methods=[METHOD_ENUMS[m] for m in model.online_methods if m in METHOD_ENUMS],
        offline_methods=[METHOD_ENUMS[m] for m in model.offline_methods if m in METHOD_ENUMS],
        limits=pb.ServerLimits(max_items=limits.max_items, max_samples=limits.max_samples,
                               max_steps=limits.max_steps, max_top_k=min(limits.max_top_k, model.num_classes),
                               max_image_pixels=limits.max_image_pixels, max_job_items=max_job_items),
        is_default=model.is_default, default_method=METHOD_ENUMS.get(model.default_method, pb.METHOD_UNSPECIFIED),
        has_reference_set=model.has_reference_set, **modality_fields(model),
        cam_layer_layouts=[pb.CamLayer(name=name, layout=layout) for name, layout in model.layer_layouts])
