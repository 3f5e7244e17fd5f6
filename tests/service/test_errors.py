"""errors.py: one status per error type; server faults stay in the log, over a real server too."""
from __future__ import annotations

import logging

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service import errors
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from tests.service.conftest import explain_request
from workers import errors as werr
from service.backends.local import LocalBackend

CASES = [
    (werr.InvalidArgument.field("noise.samples", "must be 1..256"), grpc.StatusCode.INVALID_ARGUMENT),
    (werr.ModelNotFound("x", ["demo"]), grpc.StatusCode.NOT_FOUND),
    (werr.LayerNotFound("demo", "fc", ["block4"]), grpc.StatusCode.NOT_FOUND),
    (werr.JobNotFound("j1"), grpc.StatusCode.NOT_FOUND),
    (werr.FailedPrecondition("job already finished"), grpc.StatusCode.FAILED_PRECONDITION),
    (werr.Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (werr.DeadlineExceeded("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (werr.Cancelled("cancelled"), grpc.StatusCode.CANCELLED),
    (werr.Unavailable("worker down"), grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.Unimplemented("later"), grpc.StatusCode.UNIMPLEMENTED),
]


@pytest.mark.parametrize("exc,code", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_each_error_type_has_its_status(exc, code):
    status = errors.classify(exc)
    assert status.code == code and status.message == exc.message
    assert errors.status_of(exc) == (code, exc.message)
    assert status.code_number == code.value[0] and errors.code_from_number(status.code_number) == code


@pytest.mark.parametrize("exc", [RuntimeError("/secret/path.py line 3"), werr.InternalError("tensor on cuda:3"),
                                 werr.ModelLoadError("/models/r18.pt: bad zip"), KeyError("k")])
def test_server_faults_are_internal_with_an_error_id_and_a_logged_traceback(exc, caplog):
    try:
        raise exc
    except Exception as raised:
        with caplog.at_level(logging.ERROR, logger="service.errors"):
            status = errors.classify(raised)
    assert status.code == grpc.StatusCode.INTERNAL
    assert str(exc) not in status.message and "error id" in status.message
    error_id = status.message.split("error id ")[1].split(")")[0]
    record = next(r for r in caplog.records if error_id in r.getMessage())
    assert record.exc_info is not None and record.exc_info[1] is exc


def test_rich_status_lists_violations_and_stays_bounded():
    violations = [werr.FieldViolation(f"f{i}", "x" * 1000) for i in range(100)]
    status = errors.classify(werr.InvalidArgument("many", violations))
    rich = status.to_rpc_status()
    bad = error_details_pb2.BadRequest()
    assert rich.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and rich.details[0].Unpack(bad)
    assert len(bad.field_violations) == errors.MAX_VIOLATIONS
    assert all(len(v.description) <= errors.MAX_DESCRIPTION_CHARS for v in bad.field_violations)
    assert len(rich.SerializeToString()) < 8192  # fits the default trailer budget
    assert not errors.classify(werr.NotFound("nope")).to_rpc_status().details


class FaultyBackend(LocalBackend):
    """The real LocalBackend with one injected fault: a bug that leaks a path in its message."""

    async def explain(self, spec):
        if spec.request_id == "explode":
            raise RuntimeError("secret detail: /srv/weights/model.pt at 0xdeadbeef")
        return await super().explain(spec)


@pytest.fixture(scope="module")
def faulty(start_server, demo_registry):
    harness = start_server(FaultyBackend(demo_registry))
    yield harness
    harness.stop()


def test_an_unexpected_failure_reaches_the_client_as_internal_without_details(faulty):
    x = torch.rand(1, 3, 64, 64)
    with grpc.insecure_channel(faulty.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(explain_request(x, request_id="explode"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in info.value.details() and "error id" in info.value.details()
        assert rpc_status.from_call(info.value).message == info.value.details()
        # The same fault inside a stream answers that request only.
        requests = [explain_request(x, request_id="explode"), explain_request(x, request_id="fine")]
        answers = {r.request_id: r for r in stub.ExplainStream(iter(requests), timeout=60)}
        assert answers["explode"].error.code == grpc.StatusCode.INTERNAL.value[0]
        assert "secret" not in answers["explode"].error.message
        assert not answers["fine"].HasField("error") and len(answers["fine"].items) == 1


def test_unknown_model_and_jobs_over_the_wire(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "known models: demo" in info.value.details()
    for call, request in ((stub.SubmitJob, pb.SubmitJobRequest()), (stub.GetJob, pb.GetJobRequest(id="j")),
                          (stub.CancelJob, pb.CancelJobRequest(id="j")), (stub.ListJobs, pb.ListJobsRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "offline jobs" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.WatchJob(pb.WatchJobRequest(id="j"), timeout=10)))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
