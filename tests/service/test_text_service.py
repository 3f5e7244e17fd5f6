"""Text models through the front door: gRPC (local backend) for token ids and raw text, refusals,
ModelInfo, a job with text, and `audit verify` of a text request."""
from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from service import codec
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc
from service.audit import LOG_NAME, AuditConfig, AuditLog
from service.audit.verify import verify
from service.backends.local import LocalBackend
from service.config import Limits
from service.jobs import JobsConfig
from service.validation import validate_explain
from tests.service.conftest import ServerHarness, test_config
from workers.config import ModelConfig, OfflineConfig
from workers.models import ModelRegistry, describe
from workers.offline import LocalOfflineWorker
from workers.text.demo import make_sentences

TEXT = "text-demo"


@pytest.fixture(scope="module")
def registry(service_cache_dir) -> ModelRegistry:
    return ModelRegistry([ModelConfig(name="demo", source="demo"),
                          ModelConfig(name=TEXT, source="demo", modality="text")], cache_dir=service_cache_dir)


@pytest.fixture(scope="module")
def harness(registry, tmp_path_factory):
    jobs = JobsConfig(offline=OfflineConfig(items_per_chunk=2, fold_max_rows=8), progress_persist_s=0.0, poll_s=0.2)
    server = ServerHarness(test_config(), LocalBackend(registry), offline=LocalOfflineWorker(registry, jobs.offline),
                           data_dir=tmp_path_factory.mktemp("text-jobs"), jobs=jobs)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(harness):
    with grpc.insecure_channel(harness.address) as channel:
        yield pb_grpc.AttributionServiceStub(channel)


def tokens(batch) -> pb.Inputs:
    """Each sentence's real ids (no padding): sequences of different lengths."""
    return pb.Inputs(tokens=pb.TokenBatch(sequences=[
        pb.TokenSequence(ids=ids[mask.bool()].tolist()) for ids, mask in zip(batch.ids, batch.mask)]))


def scores(attribution: pb.Attribution) -> torch.Tensor:
    return torch.frombuffer(bytearray(attribution.map.data), dtype=torch.float32)


def test_model_info_says_text(stub):
    info = stub.GetModel(pb.GetModelRequest(name=TEXT))
    assert info.modality == pb.TEXT and info.num_classes == 4
    assert not info.HasField("input_spec")  # no image spec: its inputs are described by text_spec
    assert info.text_spec.vocab_size == 54 and info.text_spec.max_length == 32 and info.text_spec.tokenizer
    assert list(info.online_methods) == [pb.VANILLA_GRADIENT, pb.SMOOTHGRAD, pb.INTEGRATED_GRADIENTS]
    assert stub.GetModel(pb.GetModelRequest(name="demo")).modality == pb.IMAGE


@pytest.mark.parametrize("method,params", [
    (pb.VANILLA_GRADIENT, {}),
    (pb.SMOOTHGRAD, {"noise": pb.NoiseParams(samples=8, noise_fraction=0.1)}),
    (pb.INTEGRATED_GRADIENTS, {"integrated_gradients": pb.IntegratedGradientsParams(
        steps=16, baseline=pb.Baseline(kind=pb.PAD_TOKEN))})])
def test_token_ids_get_per_token_scores(stub, method, params):
    batch = make_sentences(6, 911)
    response = stub.Explain(pb.ExplainRequest(model=TEXT, method=method, inputs=tokens(batch), seed=3, **params))
    for item, ids, mask, cue, label in zip(response.items, batch.ids, batch.mask, batch.cue_positions, batch.labels):
        real = ids[mask.bool()].tolist()
        assert list(item.token_ids) == real and len(item.tokens) == len(real)
        (attribution,) = item.attributions
        assert list(attribution.map.shape) == [len(real)]
        assert int(scores(attribution).argmax()) == int(cue)
        assert attribution.target == int(label) == item.predicted_classes[0]
        if method == pb.INTEGRATED_GRADIENTS:
            assert attribution.completeness_error_absolute < 1e-2
        assert item.input_sha256 == codec.input_sha256(torch.tensor(real))


def test_raw_text_is_tokenized(stub):
    response = stub.Explain(pb.ExplainRequest(model=TEXT, method=pb.VANILLA_GRADIENT, inputs=pb.Inputs(
        texts=pb.Texts(texts=["The morning walk was very good, and then RAIN!", "we saw a guitar"]))))
    first, second = response.items
    assert list(first.tokens) == ["the", "morning", "walk", "was", "very", "good", ",", "and", "[UNK]", "rain", "!"]
    assert first.tokens[int(scores(first.attributions[0]).argmax())] == "rain"
    assert first.predicted_classes[0] == 0 and second.predicted_classes[0] == 3
    assert second.tokens[int(scores(second.attributions[0]).argmax())] == "guitar"


def _refused(stub, request: pb.ExplainRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.details()


def test_bad_text_inputs_are_refused(stub):
    def req(inputs, method=pb.VANILLA_GRADIENT, model=TEXT, **kw):
        return pb.ExplainRequest(model=model, method=method, inputs=inputs, **kw)

    seq = pb.TokenSequence
    assert "[0, 54)" in _refused(stub, req(pb.Inputs(tokens=pb.TokenBatch(sequences=[seq(ids=[3, 54])]))))
    assert "1..32" in _refused(stub, req(pb.Inputs(tokens=pb.TokenBatch(sequences=[seq(ids=[3] * 33)]))))
    assert "one per id" in _refused(stub, req(pb.Inputs(tokens=pb.TokenBatch(
        sequences=[seq(ids=[3, 4], attention_mask=[1])]))))
    assert "at least one 1" in _refused(stub, req(pb.Inputs(tokens=pb.TokenBatch(
        sequences=[seq(ids=[3, 4], attention_mask=[0, 0])]))))
    assert "UTF-8 bytes" in _refused(stub, req(pb.Inputs(texts=pb.Texts(texts=["a" * 5000]))))
    assert "no tokens" in _refused(stub, req(pb.Inputs(texts=pb.Texts(texts=["   "]))))
    image = pb.Inputs(tensor=pb.Tensor(data=bytes(4 * 3 * 64 * 64), dtype=pb.FLOAT32, shape=[1, 3, 64, 64]))
    assert "is a text model" in _refused(stub, req(image))
    assert "takes images" in _refused(stub, req(pb.Inputs(texts=pb.Texts(texts=["rain"])), model="demo"))
    message = _refused(stub, req(pb.Inputs(texts=pb.Texts(texts=["rain"])), method=pb.GRAD_CAM))
    assert "does not support GRAD_CAM" in message and "INTEGRATED_GRADIENTS" in message
    black = pb.IntegratedGradientsParams(baseline=pb.Baseline(kind=pb.BLACK))
    assert "PAD_TOKEN" in _refused(stub, req(pb.Inputs(texts=pb.Texts(texts=["rain"])), pb.INTEGRATED_GRADIENTS,
                                             integrated_gradients=black))


def test_a_job_explains_text(stub):
    batch = make_sentences(5, 77)
    job = stub.SubmitJob(pb.SubmitJobRequest(request=pb.ExplainRequest(
        model=TEXT, method=pb.INTEGRATED_GRADIENTS, inputs=tokens(batch),
        integrated_gradients=pb.IntegratedGradientsParams(steps=8))))
    deadline = time.time() + 60
    while job.state not in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED) and time.time() < deadline:
        time.sleep(0.2)
        job = stub.GetJob(pb.GetJobRequest(id=job.id, include_result=True))
    assert job.state == pb.SUCCEEDED, job.error.message
    online = stub.Explain(pb.ExplainRequest(model=TEXT, method=pb.INTEGRATED_GRADIENTS, inputs=tokens(batch),
                                            integrated_gradients=pb.IntegratedGradientsParams(steps=8)))
    for offline_item, online_item in zip(job.result.items, online.items):
        assert list(offline_item.tokens) == list(online_item.tokens)
        torch.testing.assert_close(scores(offline_item.attributions[0]), scores(online_item.attributions[0]),
                                   atol=1e-5, rtol=1e-4)


def test_audit_verify_reproduces_a_text_request(registry, tmp_path):
    backend = LocalBackend(registry)
    model = describe(backend.context(TEXT).model)
    audit = AuditLog(AuditConfig(store_inputs=True), tmp_path)
    for request in [pb.ExplainRequest(request_id="sg", model=TEXT, method=pb.SMOOTHGRAD, seed=5,
                                      inputs=tokens(make_sentences(3, 5)), noise=pb.NoiseParams(samples=8)),
                    pb.ExplainRequest(request_id="text", model=TEXT, method=pb.INTEGRATED_GRADIENTS,
                                      inputs=pb.Inputs(texts=pb.Texts(texts=["good pizza", "a new piano ."])))]:
        spec = validate_explain(request, model, Limits())
        response = codec.encode_result(backend.explain_sync(spec), spec, model)
        assert audit.record(spec, response)
    assert audit.close()
    report = verify([tmp_path / LOG_NAME], backend)
    assert report.ok and report.counts() == {"ok": 5}, report.summary()
    records = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert records[3]["map_summary"]["grid"] == [1, 1, 2]  # "good pizza": one row of two tokens
    records[0]["map_sha256"] = "0" * 64  # a changed map is caught
    records[0]["map_summary"]["values"][0] += 0.05 * records[0]["map_summary"]["abs_max"]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert not verify([tmp_path / LOG_NAME], backend).ok


def test_python_client_takes_texts_and_token_ids(harness):
    from service.client import AttributionClient

    with AttributionClient(harness.address) as client:
        by_text = client.explain(texts=["we saw a guitar"], model=TEXT, method="integrated_gradients",
                                 baseline="pad_token", steps=16)
        by_ids = client.explain(token_ids=[by_text.items[0].token_ids], model=TEXT, method="integrated_gradients",
                                baseline="pad_token", steps=16)
    (item,) = by_text.items
    assert item.tokens == ["we", "saw", "a", "guitar"] and item.attributions[0].map.shape == (4,)
    assert int(item.attributions[0].map.argmax()) == 3 and item.attributions[0].completeness_error is not None
    assert by_ids.items[0].input_sha256 == item.input_sha256
    assert (by_ids.items[0].attributions[0].map == item.attributions[0].map).all()


def test_the_models_listing_shows_a_text_model_s_inputs(stub, capsys):
    from service.cli.models import _print

    _print(stub.GetModel(pb.GetModelRequest(name=TEXT)))
    first = capsys.readouterr().out.splitlines()[0]
    assert f"{TEXT}  text" in first and "up to 32 tokens (vocabulary 54" in first and "x" not in first.split("input")[1]


@pytest.mark.process
def test_the_cli_explains_a_text_in_process_and_prints_its_tokens(tmp_path):
    """`attribution explain --local --config ... --text`: the README's line, with the shipped config."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "service.cli", "explain", "--local", "--config",
                           str(root / "deploy" / "config.text-demo.yaml"), "--model", "text-demo",
                           "--method", "integrated_gradients", "--text", "we saw a guitar"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "predicted" in lines[0] and [ln.split()[0] for ln in lines[1:5]] == ["we", "saw", "a", "guitar"]
    assert lines[4].endswith("<- top")
