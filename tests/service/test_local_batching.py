"""LocalBackend with `max_batch_cost`: calls that wait for the model merge into one batch, each answered as alone."""
from __future__ import annotations

import asyncio

import numpy as np

from service._proto import attribution_pb2 as pb
from service.backends.local import LocalBackend
from service.config import Limits
from service.validation import validate_explain
from tests.service.conftest import explain_request


def test_waiting_calls_share_a_batch_and_answer_as_if_alone(demo_registry, demo_batch):
    async def run():
        alone_backend = LocalBackend(demo_registry)
        batching = LocalBackend(demo_registry, max_batch_cost=64)
        try:
            (described,) = await alone_backend.models()
            specs = [validate_explain(explain_request(demo_batch.images[i:i + 1], pb.SMOOTHGRAD,
                                                      noise={"samples": 4}, seed=i), described, Limits())
                     for i in range(8)]
            alone = [await alone_backend.explain(s) for s in specs]
            together = await asyncio.gather(*(batching.explain(s) for s in specs))
            return alone, together
        finally:
            await alone_backend.close()
            await batching.close()

    alone, together = asyncio.run(run())
    assert all(r.batch_requests == 1 for r in alone)
    assert max(r.batch_requests for r in together) > 1          # the later calls waited and merged
    assert sum(1 / r.batch_requests for r in together) < 8      # fewer batches than calls
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.items[0].attributions[0].map.numpy(), a.items[0].attributions[0].map.numpy(),
                                   rtol=0, atol=1e-5)
