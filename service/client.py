"""Python client for the attribution service: numpy (or torch) in, numpy out.

    with AttributionClient("localhost:50051") as client:
        result = client.explain(images, method="smoothgrad", samples=16, layout="NHWC")
        heatmaps = result.maps            # (N, maps per item, H, W) float32

`AttributionClient` is blocking, `AsyncAttributionClient` is its asyncio twin.
Calls retry on UNAVAILABLE and RESOURCE_EXHAUSTED with capped exponential
backoff and jitter, honouring the server's RetryInfo, within the call's timeout
(service/retry.py); failures raise `ServiceError`, a `grpc.RpcError` that also
carries the message and any field violations. Needs only numpy and grpc.
"""
from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence

import grpc

from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.balancing import resolve_target
from service.client_messages import (Attribution, Explanation, ItemResult, ServiceError, array_from_tensor,
                                     build_evaluation, build_request, enum_from_name, enum_names,
                                     tensor_from_array)
from service.retry import Attempts, RetryPolicy, retry_delay

__all__ = ["AsyncAttributionClient", "Attribution", "AttributionClient", "Explanation", "ItemResult", "RetryPolicy",
           "ServiceError", "array_from_tensor", "build_evaluation", "build_request", "enum_from_name", "enum_names",
           "retry_delay", "tensor_from_array"]

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def _pem(value: bytes | str | pathlib.Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return pathlib.Path(value).read_bytes()


def _channel_args(target: str | Sequence[str], root_certificates: bytes | str | pathlib.Path | None,
                  max_message_bytes: int, client_cert: bytes | str | pathlib.Path | None = None,
                  client_key: bytes | str | pathlib.Path | None = None):
    """(target, credentials, options); several addresses are balanced (service/balancing.py).

    TLS is on when root certificates or a client certificate are given; without root certificates
    the server's certificate is checked against the system's roots."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together: the certificate chain and its private key")
    target, balancing = resolve_target(target)
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes), *balancing]
    credentials = None
    if root_certificates is not None or client_cert is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates),
                                                   private_key=_pem(client_key),
                                                   certificate_chain=_pem(client_cert))
    return target, credentials, options


class _ClientBase:
    def __init__(self, token: str | None, timeout: float | None, retry: RetryPolicy):
        self.timeout, self.retry = timeout, retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _policy(self, retry: RetryPolicy | bool | None) -> RetryPolicy:
        """A call's retry policy: the client's (None, True), none (False), or the one given."""
        if retry is None or retry is True:
            return self.retry
        return RetryPolicy.off() if retry is False else retry


class AttributionClient(_ClientBase):
    """Blocking client. `root_certificates` (PEM bytes or path) turns TLS on; `client_cert` and
    `client_key` (PEM bytes or paths, together) are this client's certificate chain and key, for a
    server that asks for one (mutual TLS, `server.tls_client_ca`). `target` may name several
    front doors ("h1:50051,h2:50051", a list, or dns:///name:port): calls are then balanced over the
    healthy ones (service/balancing.py)."""

    def __init__(self, target: str | Sequence[str], *, token: str | None = None, root_certificates=None,
                 client_cert=None, client_key=None, timeout: float | None = 60.0,
                 retry: RetryPolicy = RetryPolicy(), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(token, timeout, retry)
        target, credentials, options = _channel_args(target, root_certificates, max_message_bytes,
                                                     client_cert, client_key)
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.AttributionServiceStub(self.channel)

    def _call(self, rpc, request, timeout: float | None, retry: RetryPolicy | bool | None = None):
        attempts = Attempts(self._policy(retry), self._timeout(timeout))
        while True:
            try:
                return rpc(request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                pause = attempts.next_pause(exc)
                if pause is None:
                    raise ServiceError.from_rpc_error(exc) from None
                time.sleep(pause)

    def models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def model(self, name: str = "", timeout: float | None = None) -> pb.ModelInfo:
        return self._call(self.stub.GetModel, pb.GetModelRequest(name=name), timeout)

    def submit_evaluation(self, inputs: Any = None, *, priority: int = 0, idempotency_key: str = "",
                          item_names: Sequence[str] = (), timeout: float | None = None, **kwargs: Any) -> pb.Job:
        """Queues an evaluation job (keywords as `build_evaluation`); watch it with `job` / WatchJob."""
        request = pb.SubmitJobRequest(evaluation=build_evaluation(inputs, **kwargs), priority=priority,
                                      idempotency_key=idempotency_key, item_names=list(item_names))
        return self._call(self.stub.SubmitJob, request, timeout)

    def job(self, job_id: str, include_result: bool = False, timeout: float | None = None) -> pb.Job:
        """GetJob; an evaluation's result is `Job.evaluation`, an explanation job's `Job.result`."""
        return self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id, include_result=include_result), timeout)

    def adopt_recommendation(self, model: str = "", job_id: str = "", timeout: float | None = None) -> pb.ModelInfo:
        """Makes the model's latest (or `job_id`'s) evaluation recommendation its defaults; the updated ModelInfo."""
        request = pb.AdoptRecommendationRequest(model=model, evaluation_job_id=job_id)
        return self._call(self.stub.AdoptRecommendation, request, timeout)

    def explain(self, inputs: Any = None, *, timeout: float | None = None, retry: RetryPolicy | bool | None = None,
                **kwargs: Any) -> Explanation:
        """Explains `inputs` (or `images=`); keywords as `build_request`; `retry` overrides the client's policy."""
        return self.explain_request(build_request(inputs, **kwargs), timeout, retry)

    def explain_request(self, request: pb.ExplainRequest, timeout: float | None = None,
                        retry: RetryPolicy | bool | None = None) -> Explanation:
        return Explanation.from_response(self._call(self.stub.Explain, request, timeout, retry))

    def explain_stream(self, requests: Iterable[pb.ExplainRequest],
                       timeout: float | None = None) -> Iterator[Explanation]:
        """Streams requests; answers come as they finish (match them by request_id). No retries."""
        try:
            for response in self.stub.ExplainStream(iter(requests), timeout=self._timeout(timeout),
                                                    metadata=self._metadata):
                yield Explanation.from_response(response)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AttributionClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncAttributionClient(_ClientBase):
    """asyncio client; the same calls and TLS options as `AttributionClient`, awaited."""

    def __init__(self, target: str | Sequence[str], *, token: str | None = None, root_certificates=None,
                 client_cert=None, client_key=None, timeout: float | None = 60.0,
                 retry: RetryPolicy = RetryPolicy(), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(token, timeout, retry)
        target, credentials, options = _channel_args(target, root_certificates, max_message_bytes,
                                                     client_cert, client_key)
        self.channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.AttributionServiceStub(self.channel)

    async def _call(self, rpc, request, timeout: float | None, retry: RetryPolicy | bool | None = None):
        attempts = Attempts(self._policy(retry), self._timeout(timeout))
        while True:
            try:
                return await rpc(request, timeout=attempts.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                pause = attempts.next_pause(exc)
                if pause is None:
                    raise ServiceError.from_rpc_error(exc) from None
                await asyncio.sleep(pause)

    async def models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def model(self, name: str = "", timeout: float | None = None) -> pb.ModelInfo:
        return await self._call(self.stub.GetModel, pb.GetModelRequest(name=name), timeout)

    async def submit_evaluation(self, inputs: Any = None, *, priority: int = 0, idempotency_key: str = "",
                                item_names: Sequence[str] = (), timeout: float | None = None, **kwargs: Any) -> pb.Job:
        request = pb.SubmitJobRequest(evaluation=build_evaluation(inputs, **kwargs), priority=priority,
                                      idempotency_key=idempotency_key, item_names=list(item_names))
        return await self._call(self.stub.SubmitJob, request, timeout)

    async def job(self, job_id: str, include_result: bool = False, timeout: float | None = None) -> pb.Job:
        return await self._call(self.stub.GetJob, pb.GetJobRequest(id=job_id, include_result=include_result), timeout)

    async def adopt_recommendation(self, model: str = "", job_id: str = "",
                                   timeout: float | None = None) -> pb.ModelInfo:
        request = pb.AdoptRecommendationRequest(model=model, evaluation_job_id=job_id)
        return await self._call(self.stub.AdoptRecommendation, request, timeout)

    async def explain(self, inputs: Any = None, *, timeout: float | None = None,
                      retry: RetryPolicy | bool | None = None, **kwargs: Any) -> Explanation:
        return await self.explain_request(build_request(inputs, **kwargs), timeout, retry)

    async def explain_request(self, request: pb.ExplainRequest, timeout: float | None = None,
                              retry: RetryPolicy | bool | None = None) -> Explanation:
        return Explanation.from_response(await self._call(self.stub.Explain, request, timeout, retry))

    async def explain_stream(self, requests: Iterable[pb.ExplainRequest],
                             timeout: float | None = None) -> AsyncIterator[Explanation]:
        try:
            call = self.stub.ExplainStream(iter(requests), timeout=self._timeout(timeout), metadata=self._metadata)
            async for response in call:
                yield Explanation.from_response(response)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncAttributionClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
