"""A Locust gRPC user that sends the same scenarios as `attribution loadtest`, for people who prefer Locust.

Locust is not a dependency of this project; install it next to it first::

    pip install locust

Then, against a running server (loopback only, like the built-in tool)::

    locust -f loadtests/locustfile.py --host 127.0.0.1:50051 \\
        --scenario loadtests/scenarios/gradcam_resnet18.yaml \\
        --headless --users 32 --spawn-rate 32 --run-time 60s --csv out/locust

What maps to what:
- The scenario's `mix`, `defaults`, `variants` and `seed` decide what is sent,
  exactly as in `attribution loadtest`: requests are encoded once at test start
  (requests.encode_requests, against the models the server lists) and every
  user picks the next one from the same weighted, shuffled schedule.
- The scenario's `load` section is ignored: Locust's own `--users`, `--spawn-rate`
  and `--run-time` set the load. Each user sends back to back (wait_time 0),
  which is the closed loop at concurrency = users. For a constant arrival
  rate, set `--wait-per-user S` (constant pacing) and users = rate * S; note
  that Locust's pacing is per user, so a slow server still slows the senders
  (coordinated omission), which `attribution loadtest --open` avoids.
- Each request is reported under its mix label (grad_cam, smoothgrad-32, ...),
  request type "grpc"; a failed call carries its gRPC status code name.

gRPC is made gevent-compatible (`grpc.experimental.gevent.init_gevent`) before
any channel exists, as gRPC requires under Locust's monkey-patched runtime.
This file is documentation-grade tooling: it is not run by the test suite.
"""
from __future__ import annotations

import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task

from loadtests.loadgen import CHANNEL_OPTIONS, EXPLAIN_PATH, check_loopback
from loadtests.requests import PreparedScenario, encode_requests
from loadtests.scenario import DEFAULT_SCENARIO, load_scenario
from service._proto import attribution_pb2 as pb
from service._proto import attribution_pb2_grpc as pb_grpc

# Locust has monkey-patched the standard library by now; gRPC must follow before any channel exists.
grpc_gevent.init_gevent()

_PREPARED: dict[str, PreparedScenario] = {}


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="attribution loadtest scenario YAML")
    parser.add_argument("--wait-per-user", type=float, default=0.0,
                        help="seconds between a user's request starts (constant pacing); 0 = back to back")


@events.test_start.add_listener
def _prepare(environment, **_kwargs) -> None:
    """Encodes the scenario's requests once, against the models the server lists."""
    target = check_loopback(environment.host or "")
    scenario = load_scenario(environment.parsed_options.scenario)
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        reply = pb_grpc.AttributionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=60,
                                                                   wait_for_ready=True)
    _PREPARED["scenario"] = encode_requests(scenario, {m.name: m for m in reply.models})


class AttributionUser(User):
    """One client: its own channel, the shared prepared requests, back-to-back Explain calls."""

    def wait_time(self) -> float:
        """0 (back to back), or what is left of `--wait-per-user` since this user's last request started."""
        pace = self.environment.parsed_options.wait_per_user
        return max(0.0, pace - (time.perf_counter() - self._last_start)) if pace > 0 else 0.0

    def on_start(self) -> None:
        self._last_start = time.perf_counter()
        self.channel = grpc.insecure_channel(check_loopback(self.environment.host or ""), options=CHANNEL_OPTIONS)
        self.explain = self.channel.unary_unary(EXPLAIN_PATH)  # raw bytes: requests are pre-encoded

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def explain_one(self) -> None:
        prepared = _PREPARED["scenario"]
        index, payload, timeout = prepared.next()
        started = self._last_start = time.perf_counter()
        response, error = b"", None
        try:
            response = self.explain(payload, timeout=timeout)
        except grpc.RpcError as exc:
            error = RuntimeError(exc.code().name)  # Locust groups failures by this message
        events.request.fire(request_type="grpc", name=prepared.entries[index].entry.label,
                            response_time=(time.perf_counter() - started) * 1e3,
                            response_length=len(response or b""), exception=error, context={})
