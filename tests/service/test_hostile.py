"""The hostile-input corpus against a real server: every case refused cleanly, the server still serving.

The server is the shipped `create_server` with its default isolated decode
pool; calls go over real loopback gRPC. Raw payloads are sent with an
identity serializer, so garbage that is not a message reaches the server as is.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.config import DecodeConfig
from service.decoding.pool import DecodePool
from tests.hostile.corpus import SIZE, cases, encode, garbage_messages, photo, valid_png

EXPLAIN = "/attribution.v1.AttributionService/Explain"
STREAM = "/attribution.v1.AttributionService/ExplainStream"


def _raw_explain(channel: grpc.Channel):
    return channel.unary_unary(EXPLAIN, request_serializer=lambda b: b,
                               response_deserializer=pb.ExplainResponse.FromString)


def _assert_serves(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    request = pb.ExplainRequest(method=pb.GRAD_CAM, inputs=pb.Inputs(images=pb.EncodedImages(images=[valid_png()])))
    response = pb_grpc.AttributionServiceStub(channel).Explain(request, timeout=60)
    assert len(response.items) == 1 and response.items[0].attributions


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_each_hostile_case_is_refused_and_the_server_goes_on(case, channel, caplog):
    if case.code == "OK":  # malformed but decodable (see corpus.DECODABLE)
        assert _raw_explain(channel)(case.payload, timeout=60).items
        _assert_serves(channel)
        return
    with pytest.raises(grpc.RpcError) as info:
        _raw_explain(channel)(case.payload, timeout=60)
    error = info.value
    assert error.code().name == case.code, error.details()
    details = error.details() or ""
    assert case.words in details.lower(), details
    for leak in ("/__w/", ".cpp", "Traceback", "<class", "DecodeError"):
        assert leak not in details, details
    assert "Traceback" not in caplog.text
    _assert_serves(channel)


def test_image_violations_name_the_image_and_say_could_not_decode(channel):
    payload = [c for c in cases() if c.name == "image:bad_among_good"][0].payload
    with pytest.raises(grpc.RpcError) as info:
        _raw_explain(channel)(payload, timeout=60)
    status = rpc_status.from_call(info.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["inputs.images.images[1]"]
    assert "could not decode image 1" in bad.field_violations[0].description


def test_garbage_mid_stream_answers_in_stream_and_the_stream_goes_on(channel):
    good = pb.ExplainRequest(request_id="good", method=pb.GRAD_CAM,
                             inputs=pb.Inputs(images=pb.EncodedImages(images=[valid_png()])))
    messages = [good.SerializeToString(), garbage_messages()["invalid_utf8_request_id"], good.SerializeToString()]
    call = channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                         response_deserializer=pb.ExplainResponse.FromString)
    responses = list(call(iter(messages), timeout=60))
    assert len(responses) == 3
    errors = [r for r in responses if r.HasField("error")]
    assert len(errors) == 1 and errors[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid attribution.v1.ExplainRequest" in errors[0].error.message
    assert sum(1 for r in responses if r.request_id == "good" and r.items) == 2


def test_garbage_to_health_and_reflection_is_invalid_argument(channel):
    for method in ("/grpc.health.v1.Health/Check", "/attribution.v1.AttributionService/GetModel"):
        call = channel.unary_unary(method, request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff" * 32, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_health_service_says_what_exists(channel):
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in info.value.details() and "attribution.v1.AttributionService" in info.value.details()


def test_concurrent_flood_of_bad_calls(channel):
    corpus = cases()
    call = _raw_explain(channel)
    sent = [corpus[i % len(corpus)] for i in range(300)]
    futures = [call.future(case.payload, timeout=120) for case in sent]
    wrong = []
    for case, future in zip(sent, futures):
        try:
            future.result()
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        if code != case.code:
            wrong.append((case.name, code))
    assert not wrong, wrong
    _assert_serves(channel)


def test_noise_fraction_zero_is_honoured(channel):
    image = pb.Inputs(images=pb.EncodedImages(images=[valid_png()]))
    stub = pb_grpc.AttributionServiceStub(channel)
    plain = stub.Explain(pb.ExplainRequest(method=pb.VANILLA_GRADIENT, inputs=image), timeout=60)
    zero = stub.Explain(pb.ExplainRequest(method=pb.SMOOTHGRAD, inputs=image,
                                          noise=pb.NoiseParams(samples=4, noise_fraction=0.0)), timeout=60)
    default = stub.Explain(pb.ExplainRequest(method=pb.SMOOTHGRAD, inputs=image,
                                             noise=pb.NoiseParams(samples=4)), timeout=60)
    as_map = lambda r: np.frombuffer(r.items[0].attributions[0].map.data, np.float32)
    # No noise: every sample is the input, so the mean gradient is the plain gradient.
    np.testing.assert_allclose(as_map(zero), as_map(plain), rtol=1e-4, atol=1e-6)
    assert not np.allclose(as_map(default), as_map(plain), rtol=1e-3, atol=1e-6)


def test_model_info_advertises_the_job_limit(channel):
    info = pb_grpc.AttributionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    assert info.limits.max_items == 64
    assert info.limits.max_job_items == 0  # this server runs no offline queue


# ----------------------------------------------------------------- the pool --

def _slow_png() -> bytes:
    """A large, valid, incompressible PNG: slow enough to decode that a test can act meanwhile."""
    return encode(photo(3000, 3000, seed=9), "PNG", compress_level=1)


def test_a_decoder_that_dies_fails_only_its_request_and_is_replaced():
    events: list[str] = []
    pool = DecodePool(workers=1, on_event=events.append).start()
    try:
        before = pool.pids()
        assert len(before) == 1
        slow = _slow_png()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(out=pool.decode([slow], SIZE, SIZE, 3, 1 << 24)))
        worker.start()
        time.sleep(0.05)  # let the file reach the worker; the kill below lands mid-decode either way
        os.kill(before[0], signal.SIGKILL)
        worker.join(timeout=60)
        assert not worker.is_alive()
        (outcome,) = result["out"]
        assert "the decoder failed on this file" in str(outcome)
        assert "crashed" in events
        outcomes = pool.decode([valid_png()], SIZE, SIZE, 3, 1 << 24)  # a fresh worker answers
        assert outcomes[0].rows == SIZE and pool.pids() != before
    finally:
        pool.close()
    assert pool.pids() == []


def test_a_decode_past_its_timeout_is_killed():
    events: list[str] = []
    # 1 ms: not even the 27 MB file's trip through the pipe fits, on any machine.
    pool = DecodePool(workers=1, timeout_s=0.001, on_event=events.append).start()
    try:
        (outcome,) = pool.decode([_slow_png()], SIZE, SIZE, 3, 1 << 24)
        assert "longer than 0.001 s" in str(outcome) and "timeout" in events
        pool.timeout_s = 10.0
        assert pool.decode([valid_png()], SIZE, SIZE, 3, 1 << 24)[0].rows == SIZE
    finally:
        pool.close()


def test_inline_decoding_is_a_config_choice():
    assert DecodeConfig().isolation == "process"
    with pytest.raises(Exception, match="process or inline"):
        DecodeConfig(isolation="threads")


def _decode_workers() -> list[int]:
    """PIDs of this process's decode worker children."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and b"service.decoding.worker" in cmdline:
            pids.append(int(entry))
    return pids


def test_job_limit_is_in_the_contract_and_a_failed_bind_leaves_nothing(demo_registry, tmp_path):
    import socket

    from service.server import create_server
    from tests.service.conftest import test_config
    from tests.support import LoopThread
    from service.backends.local import LocalBackend
    from workers.offline import LocalOfflineWorker

    loop = LoopThread()
    try:
        before = set(_decode_workers())
        running = loop.call(create_server(test_config(), LocalBackend(demo_registry),
                                          offline=LocalOfflineWorker(demo_registry), data_dir=tmp_path / "a"))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                info = pb_grpc.AttributionServiceStub(channel).GetModel(pb.GetModelRequest(), timeout=10)
            assert info.limits.max_items == 64 and info.limits.max_job_items == 1024
            assert len(set(_decode_workers()) - before) == 2
        finally:
            loop.call(running.stop(0))
        assert set(_decode_workers()) <= before
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError, match="cannot listen"):
                loop.call(create_server(test_config(port=port), LocalBackend(demo_registry),
                                        offline=LocalOfflineWorker(demo_registry), data_dir=tmp_path / "b"))
        assert set(_decode_workers()) <= before  # the pool, the audit log and the store were all closed
        # The audit lock was released: a second server can take the same data directory.
        again = loop.call(create_server(test_config(), LocalBackend(demo_registry),
                                        offline=LocalOfflineWorker(demo_registry), data_dir=tmp_path / "b"))
        loop.call(again.stop(0))
    finally:
        loop.close()
