from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    UINT8: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    NCHW: _ClassVar[Layout]
    NHWC: _ClassVar[Layout]

class InputSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_SPACE_UNSPECIFIED: _ClassVar[InputSpace]
    PIXELS: _ClassVar[InputSpace]
    MODEL: _ClassVar[InputSpace]

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    VANILLA_GRADIENT: _ClassVar[Method]
    SMOOTHGRAD: _ClassVar[Method]
    SMOOTHGRAD_SQ: _ClassVar[Method]
    VARGRAD: _ClassVar[Method]
    INTEGRATED_GRADIENTS: _ClassVar[Method]
    GRAD_CAM: _ClassVar[Method]
    GRAD_CAM_PLUS_PLUS: _ClassVar[Method]
    LAYER_CAM: _ClassVar[Method]
    SCORE_CAM: _ClassVar[Method]
    OCCLUSION: _ClassVar[Method]
    EXPECTED_GRADIENTS: _ClassVar[Method]
    BLUR_IG: _ClassVar[Method]
    GUIDED_IG: _ClassVar[Method]
    HIRES_CAM: _ClassVar[Method]
    XGRAD_CAM: _ClassVar[Method]
    EIGEN_CAM: _ClassVar[Method]
    ABLATION_CAM: _ClassVar[Method]
    RISE: _ClassVar[Method]
    XRAI: _ClassVar[Method]

class IntegrationRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTEGRATION_RULE_UNSPECIFIED: _ClassVar[IntegrationRule]
    RIEMANN_LEFT: _ClassVar[IntegrationRule]
    RIEMANN_RIGHT: _ClassVar[IntegrationRule]
    RIEMANN_MIDDLE: _ClassVar[IntegrationRule]
    RIEMANN_TRAPEZOID: _ClassVar[IntegrationRule]
    GAUSS_LEGENDRE: _ClassVar[IntegrationRule]

class BaselineKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASELINE_KIND_UNSPECIFIED: _ClassVar[BaselineKind]
    ZERO: _ClassVar[BaselineKind]
    BLACK: _ClassVar[BaselineKind]
    BLURRED: _ClassVar[BaselineKind]
    UNIFORM_NOISE: _ClassVar[BaselineKind]
    DATASET_MEAN: _ClassVar[BaselineKind]
    CUSTOM: _ClassVar[BaselineKind]
    PAD_TOKEN: _ClassVar[BaselineKind]

class ChannelReduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANNEL_REDUCTION_UNSPECIFIED: _ClassVar[ChannelReduction]
    ABS_MAX: _ClassVar[ChannelReduction]
    SUM: _ClassVar[ChannelReduction]
    NONE: _ClassVar[ChannelReduction]

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NO_NORMALIZATION: _ClassVar[Normalization]
    MAX_ABS: _ClassVar[Normalization]
    MIN_MAX: _ClassVar[Normalization]

class AuditMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_MODE_UNSPECIFIED: _ClassVar[AuditMode]
    AUDIT_ON: _ClassVar[AuditMode]
    AUDIT_OFF: _ClassVar[AuditMode]

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    IMAGE: _ClassVar[Modality]
    TEXT: _ClassVar[Modality]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    DELETION: _ClassVar[Metric]
    INSERTION: _ClassVar[Metric]
    MODEL_RANDOMIZATION: _ClassVar[Metric]
    DATA_RANDOMIZATION: _ClassVar[Metric]
    POINTING_GAME: _ClassVar[Metric]
    IOU: _ClassVar[Metric]
    ENERGY_IN_BOX: _ClassVar[Metric]
    COMPLETENESS: _ClassVar[Metric]
    STABILITY: _ClassVar[Metric]
    CLASS_DISCRIMINATION: _ClassVar[Metric]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
UINT8: DType
LAYOUT_UNSPECIFIED: Layout
NCHW: Layout
NHWC: Layout
INPUT_SPACE_UNSPECIFIED: InputSpace
PIXELS: InputSpace
MODEL: InputSpace
METHOD_UNSPECIFIED: Method
VANILLA_GRADIENT: Method
SMOOTHGRAD: Method
SMOOTHGRAD_SQ: Method
VARGRAD: Method
INTEGRATED_GRADIENTS: Method
GRAD_CAM: Method
GRAD_CAM_PLUS_PLUS: Method
LAYER_CAM: Method
SCORE_CAM: Method
OCCLUSION: Method
EXPECTED_GRADIENTS: Method
BLUR_IG: Method
GUIDED_IG: Method
HIRES_CAM: Method
XGRAD_CAM: Method
EIGEN_CAM: Method
ABLATION_CAM: Method
RISE: Method
XRAI: Method
INTEGRATION_RULE_UNSPECIFIED: IntegrationRule
RIEMANN_LEFT: IntegrationRule
RIEMANN_RIGHT: IntegrationRule
RIEMANN_MIDDLE: IntegrationRule
RIEMANN_TRAPEZOID: IntegrationRule
GAUSS_LEGENDRE: IntegrationRule
BASELINE_KIND_UNSPECIFIED: BaselineKind
ZERO: BaselineKind
BLACK: BaselineKind
BLURRED: BaselineKind
UNIFORM_NOISE: BaselineKind
DATASET_MEAN: BaselineKind
CUSTOM: BaselineKind
PAD_TOKEN: BaselineKind
CHANNEL_REDUCTION_UNSPECIFIED: ChannelReduction
ABS_MAX: ChannelReduction
SUM: ChannelReduction
NONE: ChannelReduction
NORMALIZATION_UNSPECIFIED: Normalization
NO_NORMALIZATION: Normalization
MAX_ABS: Normalization
MIN_MAX: Normalization
AUDIT_MODE_UNSPECIFIED: AuditMode
AUDIT_ON: AuditMode
AUDIT_OFF: AuditMode
MODALITY_UNSPECIFIED: Modality
IMAGE: Modality
TEXT: Modality
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
METRIC_UNSPECIFIED: Metric
DELETION: Metric
INSERTION: Metric
MODEL_RANDOMIZATION: Metric
DATA_RANDOMIZATION: Metric
POINTING_GAME: Metric
IOU: Metric
ENERGY_IN_BOX: Metric
COMPLETENESS: Metric
STABILITY: Metric
CLASS_DISCRIMINATION: Metric

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape", "layout")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: Layout
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("ids", "attention_mask")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    attention_mask: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., attention_mask: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    def __init__(self, sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ...) -> None: ...

class Texts(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class Inputs(_message.Message):
    __slots__ = ("tensor", "images", "tokens", "texts", "space")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    images: EncodedImages
    tokens: TokenBatch
    texts: Texts
    space: InputSpace
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., images: _Optional[_Union[EncodedImages, _Mapping]] = ..., tokens: _Optional[_Union[TokenBatch, _Mapping]] = ..., texts: _Optional[_Union[Texts, _Mapping]] = ..., space: _Optional[_Union[InputSpace, str]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("class_indices", "predicted", "top_k")
    CLASS_INDICES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    class_indices: ClassIndices
    predicted: bool
    top_k: int
    def __init__(self, class_indices: _Optional[_Union[ClassIndices, _Mapping]] = ..., predicted: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassIndices(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...

class GradientParams(_message.Message):
    __slots__ = ("absolute",)
    ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    absolute: bool
    def __init__(self, absolute: _Optional[bool] = ...) -> None: ...

class NoiseParams(_message.Message):
    __slots__ = ("samples", "noise_fraction")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise_fraction: float
    def __init__(self, samples: _Optional[int] = ..., noise_fraction: _Optional[float] = ...) -> None: ...

class Baseline(_message.Message):
    __slots__ = ("kind", "blur_sigma", "tensor")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLUR_SIGMA_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    kind: BaselineKind
    blur_sigma: float
    tensor: Tensor
    def __init__(self, kind: _Optional[_Union[BaselineKind, str]] = ..., blur_sigma: _Optional[float] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class IntegratedGradientsParams(_message.Message):
    __slots__ = ("steps", "rule", "baseline")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    rule: IntegrationRule
    baseline: Baseline
    def __init__(self, steps: _Optional[int] = ..., rule: _Optional[_Union[IntegrationRule, str]] = ..., baseline: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class ExpectedGradientsParams(_message.Message):
    __slots__ = ("samples", "noise_stdev", "reference")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_STDEV_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise_stdev: float
    reference: Baseline
    def __init__(self, samples: _Optional[int] = ..., noise_stdev: _Optional[float] = ..., reference: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class BlurIgParams(_message.Message):
    __slots__ = ("steps", "max_sigma")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIGMA_FIELD_NUMBER: _ClassVar[int]
    steps: int
    max_sigma: float
    def __init__(self, steps: _Optional[int] = ..., max_sigma: _Optional[float] = ...) -> None: ...

class GuidedIgParams(_message.Message):
    __slots__ = ("steps", "fraction", "baseline")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    fraction: float
    baseline: Baseline
    def __init__(self, steps: _Optional[int] = ..., fraction: _Optional[float] = ..., baseline: _Optional[_Union[Baseline, _Mapping]] = ...) -> None: ...

class CamParams(_message.Message):
    __slots__ = ("layer", "also")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ALSO_FIELD_NUMBER: _ClassVar[int]
    layer: str
    also: _containers.RepeatedScalarFieldContainer[Method]
    def __init__(self, layer: _Optional[str] = ..., also: _Optional[_Iterable[_Union[Method, str]]] = ...) -> None: ...

class ScoreCamParams(_message.Message):
    __slots__ = ("layer", "top_k_channels")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    top_k_channels: int
    def __init__(self, layer: _Optional[str] = ..., top_k_channels: _Optional[int] = ...) -> None: ...

class RiseParams(_message.Message):
    __slots__ = ("masks", "grid", "keep_probability")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    KEEP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    masks: int
    grid: int
    keep_probability: float
    def __init__(self, masks: _Optional[int] = ..., grid: _Optional[int] = ..., keep_probability: _Optional[float] = ...) -> None: ...

class XraiParams(_message.Message):
    __slots__ = ("steps", "segmentation_scales")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_SCALES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    segmentation_scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, steps: _Optional[int] = ..., segmentation_scales: _Optional[_Iterable[float]] = ...) -> None: ...

class OcclusionParams(_message.Message):
    __slots__ = ("patch_size", "stride", "baseline_value")
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_VALUE_FIELD_NUMBER: _ClassVar[int]
    patch_size: int
    stride: int
    baseline_value: float
    def __init__(self, patch_size: _Optional[int] = ..., stride: _Optional[int] = ..., baseline_value: _Optional[float] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("reduction", "normalization", "dtype", "png_overlay", "native_resolution")
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PNG_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    NATIVE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    reduction: ChannelReduction
    normalization: Normalization
    dtype: DType
    png_overlay: bool
    native_resolution: bool
    def __init__(self, reduction: _Optional[_Union[ChannelReduction, str]] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., png_overlay: _Optional[bool] = ..., native_resolution: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("request_id", "model", "inputs", "target", "method", "gradient", "noise", "integrated_gradients", "cam", "score_cam", "occlusion", "expected_gradients", "blur_ig", "guided_ig", "rise", "xrai", "output", "seed", "audit")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    CAM_FIELD_NUMBER: _ClassVar[int]
    SCORE_CAM_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    BLUR_IG_FIELD_NUMBER: _ClassVar[int]
    GUIDED_IG_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    XRAI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    inputs: Inputs
    target: Target
    method: Method
    gradient: GradientParams
    noise: NoiseParams
    integrated_gradients: IntegratedGradientsParams
    cam: CamParams
    score_cam: ScoreCamParams
    occlusion: OcclusionParams
    expected_gradients: ExpectedGradientsParams
    blur_ig: BlurIgParams
    guided_ig: GuidedIgParams
    rise: RiseParams
    xrai: XraiParams
    output: OutputOptions
    seed: int
    audit: AuditMode
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., method: _Optional[_Union[Method, str]] = ..., gradient: _Optional[_Union[GradientParams, _Mapping]] = ..., noise: _Optional[_Union[NoiseParams, _Mapping]] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsParams, _Mapping]] = ..., cam: _Optional[_Union[CamParams, _Mapping]] = ..., score_cam: _Optional[_Union[ScoreCamParams, _Mapping]] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., expected_gradients: _Optional[_Union[ExpectedGradientsParams, _Mapping]] = ..., blur_ig: _Optional[_Union[BlurIgParams, _Mapping]] = ..., guided_ig: _Optional[_Union[GuidedIgParams, _Mapping]] = ..., rise: _Optional[_Union[RiseParams, _Mapping]] = ..., xrai: _Optional[_Union[XraiParams, _Mapping]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., seed: _Optional[int] = ..., audit: _Optional[_Union[AuditMode, str]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms", "batch_samples", "batch_requests")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_samples: int
    batch_requests: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_samples: _Optional[int] = ..., batch_requests: _Optional[int] = ...) -> None: ...

class Attribution(_message.Message):
    __slots__ = ("method", "target", "target_score", "map", "native_map", "png_overlay", "completeness_error", "map_sha256", "completeness_error_absolute")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    NATIVE_MAP_FIELD_NUMBER: _ClassVar[int]
    PNG_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAP_SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_ERROR_ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    method: Method
    target: int
    target_score: float
    map: Tensor
    native_map: Tensor
    png_overlay: bytes
    completeness_error: float
    map_sha256: str
    completeness_error_absolute: float
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., target: _Optional[int] = ..., target_score: _Optional[float] = ..., map: _Optional[_Union[Tensor, _Mapping]] = ..., native_map: _Optional[_Union[Tensor, _Mapping]] = ..., png_overlay: _Optional[bytes] = ..., completeness_error: _Optional[float] = ..., map_sha256: _Optional[str] = ..., completeness_error_absolute: _Optional[float] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("predicted_classes", "predicted_scores", "attributions", "input_sha256", "geometry", "tokens", "token_ids")
    PREDICTED_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SCORES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    predicted_classes: _containers.RepeatedScalarFieldContainer[int]
    predicted_scores: _containers.RepeatedScalarFieldContainer[float]
    attributions: _containers.RepeatedCompositeFieldContainer[Attribution]
    input_sha256: str
    geometry: SourceGeometry
    tokens: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, predicted_classes: _Optional[_Iterable[int]] = ..., predicted_scores: _Optional[_Iterable[float]] = ..., attributions: _Optional[_Iterable[_Union[Attribution, _Mapping]]] = ..., input_sha256: _Optional[str] = ..., geometry: _Optional[_Union[SourceGeometry, _Mapping]] = ..., tokens: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SourceGeometry(_message.Message):
    __slots__ = ("width", "height", "resize", "x0", "y0", "x1", "y1")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    resize: str
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., resize: _Optional[str] = ..., x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class ExplainError(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "model_version", "method", "items", "timings", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    model_version: str
    method: Method
    items: _containers.RepeatedCompositeFieldContainer[ItemResult]
    timings: Timings
    error: ExplainError
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., items: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[ExplainError, _Mapping]] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("channels", "height", "width", "mean", "std", "resize", "crop_fraction")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    width: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize: str
    crop_fraction: float
    def __init__(self, channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize: _Optional[str] = ..., crop_fraction: _Optional[float] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_items", "max_samples", "max_steps", "max_top_k", "max_image_pixels", "max_job_items")
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_ITEMS_FIELD_NUMBER: _ClassVar[int]
    max_items: int
    max_samples: int
    max_steps: int
    max_top_k: int
    max_image_pixels: int
    max_job_items: int
    def __init__(self, max_items: _Optional[int] = ..., max_samples: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_job_items: _Optional[int] = ...) -> None: ...

class CamLayer(_message.Message):
    __slots__ = ("name", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    layout: str
    def __init__(self, name: _Optional[str] = ..., layout: _Optional[str] = ...) -> None: ...

class TextSpec(_message.Message):
    __slots__ = ("vocab_size", "max_length", "pad_id", "tokenizer", "max_text_bytes")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    max_length: int
    pad_id: int
    tokenizer: str
    max_text_bytes: int
    def __init__(self, vocab_size: _Optional[int] = ..., max_length: _Optional[int] = ..., pad_id: _Optional[int] = ..., tokenizer: _Optional[str] = ..., max_text_bytes: _Optional[int] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("method", "cam_layer", "evaluation_job_id", "metrics", "evaluated_unix_s", "adopted")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYER_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    method: Method
    cam_layer: str
    evaluation_job_id: str
    metrics: _containers.RepeatedScalarFieldContainer[Metric]
    evaluated_unix_s: float
    adopted: bool
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., cam_layer: _Optional[str] = ..., evaluation_job_id: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[Metric, str]]] = ..., evaluated_unix_s: _Optional[float] = ..., adopted: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "input_spec", "num_classes", "class_labels", "cam_layers", "default_cam_layer", "online_methods", "offline_methods", "limits", "is_default", "modality", "cam_layer_layouts", "text_spec", "recommendation", "default_method", "has_reference_set")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CAM_LAYER_FIELD_NUMBER: _ClassVar[int]
    ONLINE_METHODS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_METHODS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYER_LAYOUTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_SPEC_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHOD_FIELD_NUMBER: _ClassVar[int]
    HAS_REFERENCE_SET_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_spec: InputSpec
    num_classes: int
    class_labels: _containers.RepeatedScalarFieldContainer[str]
    cam_layers: _containers.RepeatedScalarFieldContainer[str]
    default_cam_layer: str
    online_methods: _containers.RepeatedScalarFieldContainer[Method]
    offline_methods: _containers.RepeatedScalarFieldContainer[Method]
    limits: ServerLimits
    is_default: bool
    modality: Modality
    cam_layer_layouts: _containers.RepeatedCompositeFieldContainer[CamLayer]
    text_spec: TextSpec
    recommendation: Recommendation
    default_method: Method
    has_reference_set: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_spec: _Optional[_Union[InputSpec, _Mapping]] = ..., num_classes: _Optional[int] = ..., class_labels: _Optional[_Iterable[str]] = ..., cam_layers: _Optional[_Iterable[str]] = ..., default_cam_layer: _Optional[str] = ..., online_methods: _Optional[_Iterable[_Union[Method, str]]] = ..., offline_methods: _Optional[_Iterable[_Union[Method, str]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., is_default: _Optional[bool] = ..., modality: _Optional[_Union[Modality, str]] = ..., cam_layer_layouts: _Optional[_Iterable[_Union[CamLayer, _Mapping]]] = ..., text_spec: _Optional[_Union[TextSpec, _Mapping]] = ..., recommendation: _Optional[_Union[Recommendation, _Mapping]] = ..., default_method: _Optional[_Union[Method, str]] = ..., has_reference_set: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AdoptRecommendationRequest(_message.Message):
    __slots__ = ("model", "evaluation_job_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    evaluation_job_id: str
    def __init__(self, model: _Optional[str] = ..., evaluation_job_id: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("request", "priority", "idempotency_key", "item_names", "evaluation")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEM_NAMES_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    request: ExplainRequest
    priority: int
    idempotency_key: str
    item_names: _containers.RepeatedScalarFieldContainer[str]
    evaluation: EvaluationRequest
    def __init__(self, request: _Optional[_Union[ExplainRequest, _Mapping]] = ..., priority: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., item_names: _Optional[_Iterable[str]] = ..., evaluation: _Optional[_Union[EvaluationRequest, _Mapping]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("box", "mask")
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    box: Box
    mask: Tensor
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("top", "left", "bottom", "right")
    TOP_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    top: int
    left: int
    bottom: int
    right: int
    def __init__(self, top: _Optional[int] = ..., left: _Optional[int] = ..., bottom: _Optional[int] = ..., right: _Optional[int] = ...) -> None: ...

class EvaluationOptions(_message.Message):
    __slots__ = ("curve_steps", "patch_size", "baselines", "randomization_modes", "randomization_threshold", "augmentations", "top_k", "bootstrap_samples", "confidence", "seed")
    CURVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_MODES_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    curve_steps: int
    patch_size: int
    baselines: _containers.RepeatedScalarFieldContainer[str]
    randomization_modes: _containers.RepeatedScalarFieldContainer[str]
    randomization_threshold: float
    augmentations: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    bootstrap_samples: int
    confidence: float
    seed: int
    def __init__(self, curve_steps: _Optional[int] = ..., patch_size: _Optional[int] = ..., baselines: _Optional[_Iterable[str]] = ..., randomization_modes: _Optional[_Iterable[str]] = ..., randomization_threshold: _Optional[float] = ..., augmentations: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., bootstrap_samples: _Optional[int] = ..., confidence: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class EvaluationRequest(_message.Message):
    __slots__ = ("model", "inputs", "dataset", "target", "methods", "metrics", "regions", "shuffled_labels_model", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    SHUFFLED_LABELS_MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: Inputs
    dataset: str
    target: Target
    methods: _containers.RepeatedCompositeFieldContainer[ExplainRequest]
    metrics: _containers.RepeatedScalarFieldContainer[Metric]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    shuffled_labels_model: str
    options: EvaluationOptions
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Union[Inputs, _Mapping]] = ..., dataset: _Optional[str] = ..., target: _Optional[_Union[Target, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[ExplainRequest, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[Metric, str]]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., shuffled_labels_model: _Optional[str] = ..., options: _Optional[_Union[EvaluationOptions, _Mapping]] = ...) -> None: ...

class MetricValue(_message.Message):
    __slots__ = ("metric", "variant", "statistic", "per_item", "mean", "ci_low", "ci_high", "missing", "reference", "passed")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    metric: Metric
    variant: str
    statistic: str
    per_item: _containers.RepeatedScalarFieldContainer[float]
    mean: float
    ci_low: float
    ci_high: float
    missing: int
    reference: float
    passed: bool
    def __init__(self, metric: _Optional[_Union[Metric, str]] = ..., variant: _Optional[str] = ..., statistic: _Optional[str] = ..., per_item: _Optional[_Iterable[float]] = ..., mean: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ..., missing: _Optional[int] = ..., reference: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class Curve(_message.Message):
    __slots__ = ("metric", "baseline", "fractions", "scores", "random_scores")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SCORES_FIELD_NUMBER: _ClassVar[int]
    metric: Metric
    baseline: str
    fractions: _containers.RepeatedScalarFieldContainer[float]
    scores: _containers.RepeatedScalarFieldContainer[float]
    random_scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, metric: _Optional[_Union[Metric, str]] = ..., baseline: _Optional[str] = ..., fractions: _Optional[_Iterable[float]] = ..., scores: _Optional[_Iterable[float]] = ..., random_scores: _Optional[_Iterable[float]] = ...) -> None: ...

class RandomizationMaps(_message.Message):
    __slots__ = ("mode", "steps", "maps", "spearman")
    MODE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    mode: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    maps: Tensor
    spearman: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mode: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ..., maps: _Optional[_Union[Tensor, _Mapping]] = ..., spearman: _Optional[_Iterable[float]] = ...) -> None: ...

class MethodEvaluation(_message.Message):
    __slots__ = ("label", "method", "metrics", "curves", "randomization", "example_maps", "seconds")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CURVES_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_MAPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    label: str
    method: ExplainRequest
    metrics: _containers.RepeatedCompositeFieldContainer[MetricValue]
    curves: _containers.RepeatedCompositeFieldContainer[Curve]
    randomization: _containers.RepeatedCompositeFieldContainer[RandomizationMaps]
    example_maps: Tensor
    seconds: float
    def __init__(self, label: _Optional[str] = ..., method: _Optional[_Union[ExplainRequest, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[MetricValue, _Mapping]]] = ..., curves: _Optional[_Iterable[_Union[Curve, _Mapping]]] = ..., randomization: _Optional[_Iterable[_Union[RandomizationMaps, _Mapping]]] = ..., example_maps: _Optional[_Union[Tensor, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("model", "model_version", "num_items", "methods", "ranking", "recommendation", "forward_rows", "backward_rows", "seconds", "floor_seconds", "example_inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ROWS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FLOOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    num_items: int
    methods: _containers.RepeatedCompositeFieldContainer[MethodEvaluation]
    ranking: _containers.RepeatedScalarFieldContainer[str]
    recommendation: Recommendation
    forward_rows: int
    backward_rows: int
    seconds: float
    floor_seconds: float
    example_inputs: Tensor
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., num_items: _Optional[int] = ..., methods: _Optional[_Iterable[_Union[MethodEvaluation, _Mapping]]] = ..., ranking: _Optional[_Iterable[str]] = ..., recommendation: _Optional[_Union[Recommendation, _Mapping]] = ..., forward_rows: _Optional[int] = ..., backward_rows: _Optional[int] = ..., seconds: _Optional[float] = ..., floor_seconds: _Optional[float] = ..., example_inputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "progress", "priority", "idempotency_key", "model", "method", "num_items", "created_unix_s", "started_unix_s", "finished_unix_s", "error", "result", "item_names", "evaluation", "is_evaluation")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ITEM_NAMES_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    IS_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    progress: float
    priority: int
    idempotency_key: str
    model: str
    method: Method
    num_items: int
    created_unix_s: float
    started_unix_s: float
    finished_unix_s: float
    error: ExplainError
    result: ExplainResponse
    item_names: _containers.RepeatedScalarFieldContainer[str]
    evaluation: EvaluationResult
    is_evaluation: bool
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., priority: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., num_items: _Optional[int] = ..., created_unix_s: _Optional[float] = ..., started_unix_s: _Optional[float] = ..., finished_unix_s: _Optional[float] = ..., error: _Optional[_Union[ExplainError, _Mapping]] = ..., result: _Optional[_Union[ExplainResponse, _Mapping]] = ..., item_names: _Optional[_Iterable[str]] = ..., evaluation: _Optional[_Union[EvaluationResult, _Mapping]] = ..., is_evaluation: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id", "include_result")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULT_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_result: bool
    def __init__(self, id: _Optional[str] = ..., include_result: _Optional[bool] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "include_result")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULT_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_result: bool
    def __init__(self, id: _Optional[str] = ..., include_result: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
