"""A multi-node Ray cluster on this machine, for tests and benchmarks: a head and worker nodes, each a
real raylet with its own resources, all on loopback, that can lose a node on command.

Ray's own `ray.cluster_utils.Cluster` starts the nodes; it lives in a process of its own (this module run
as a program), so the caller never becomes a Ray driver and can start front doors against the cluster
as a deployment would (`attribution serve --address GCS`, `--attach`). The program speaks lines:

    python -m loadtests.raycluster --node b='{"model_slot": 1}' --node c='{"model_slot": 1}'
    -> READY <gcs address>
    <- where <actor class name part>      -> NODE <name> ... (the nodes that run such actors; NONE if none)
    <- kill <name>                        -> KILLED <name> (its raylet and workers, without grace)
    <- quit (or end of input)             -> the cluster is shut down

`FrontDoorProcess` starts `attribution serve --address GCS ...` against such a cluster and reads its port.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

HEAD = "head"
START_TIMEOUT_S = 120.0
FRONT_DOOR_TIMEOUT_S = 300.0  # a deploying front door waits for its replicas (and a first demo training)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray rewrites a loopback cluster address into the machine's outward address when a node or a driver
# joins (services.resolve_ip_for_localhost) unless its multi-node-cluster switch is off: then every
# address it derives stays on 127.0.0.1, where the nodes of this cluster listen.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _serve(nodes: dict[str, dict], head_cpus: float, node_cpus: float) -> int:
    os.environ.update(LOOPBACK_ENV)  # before Ray is imported: it reads the switch once
    import ray
    from ray.cluster_utils import Cluster

    base = {"node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args=dict(base, num_cpus=head_cpus))
    members = {HEAD: cluster.head_node}
    for name, resources in nodes.items():
        members[name] = cluster.add_node(**base, num_cpus=node_cpus, resources=dict(resources))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    by_id = {node.node_id: name for name, node in members.items()}
    print(f"READY {cluster.address}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "where" and len(words) == 2:
                print(f"NODE {' '.join(_actor_nodes(words[1], by_id)) or 'NONE'}", flush=True)
            elif words[0] == "kill" and len(words) == 2 and words[1] in members and words[1] != HEAD:
                cluster.remove_node(members.pop(words[1]), allow_graceful=False)
                print(f"KILLED {words[1]}", flush=True)
            else:
                print(f"ERROR unknown command {line.strip()!r}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


def _actor_nodes(part: str, by_id: dict[str, str]) -> list[str]:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return sorted({by_id.get(a.node_id, "?") for a in alive if part in (a.class_name or "")})


class RayCluster:
    """The program above as a child process: `address`, `where(actor)`, `kill(node)`, `stop()`."""

    def __init__(self, nodes: dict[str, dict], head_cpus: float = 1, node_cpus: float = 2):
        command = [sys.executable, "-m", "loadtests.raycluster", "--head-cpus", str(head_cpus),
                   "--node-cpus", str(node_cpus)]
        for name, resources in nodes.items():
            command += ["--node", f"{name}={json.dumps(resources)}"]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **LOOPBACK_ENV))
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        line = self._read(START_TIMEOUT_S)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"the Ray cluster did not start (said {line!r})")
        self.address = line.split()[1]

    def _drain(self) -> None:
        for line in self.proc.stdout:
            if line.split(" ", 1)[0] in ("READY", "NODE", "KILLED", "ERROR"):  # other output is not ours
                self._lines.put(line.strip())
        self._lines.put("")

    def _read(self, timeout_s: float) -> str:
        """The next line of the protocol; "" at the timeout or the end."""
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return ""

    def _ask(self, command: str, timeout_s: float = 60.0) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def where(self, actor_class_part: str, count: int = 1, timeout_s: float = 60.0) -> list[str]:
        """The nodes that run alive actors whose class name contains `actor_class_part`, once there are
        at least `count` such nodes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            answer = self._ask(f"where {actor_class_part}")
            nodes = answer.split()[1:] if answer.startswith("NODE ") and answer != "NODE NONE" else []
            if len(nodes) >= count:
                return nodes
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {count} nodes run an actor like {actor_class_part!r} after {timeout_s} s")

    def kill(self, node: str) -> None:
        answer = self._ask(f"kill {node}", timeout_s=120.0)
        if answer != f"KILLED {node}":
            raise RuntimeError(f"node {node} was not killed (said {answer!r})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=30)


class FrontDoorProcess:
    """`python -m service.cli serve --address GCS --config CONFIG ...` in its own process, on loopback with
    any free port; `port` once it listens. Its stderr goes to `<data_dir>.log`."""

    def __init__(self, name: str, address: str, config, data_dir, *extra: str):
        import pathlib

        data_dir = pathlib.Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "service.cli", "serve", "--address", address, "--config", str(config),
                   "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--data-dir", str(data_dir),
                   *extra]
        self.name = name
        self.log_path = data_dir.parent / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=dict(os.environ, **LOOPBACK_ENV))
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = self._wait_listening()
        self.address = f"127.0.0.1:{self.port}"

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # the end of its output

    def _wait_listening(self) -> int:
        deadline = time.monotonic() + FRONT_DOOR_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not line:
                break
            if "gRPC listening on" in line:
                return int(line.split("gRPC listening on", 1)[1].split()[0].rsplit(":", 1)[1])
        self.stop()
        raise RuntimeError(f"front door {self.name} did not start; its log: {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.raycluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", action="append", default=[], metavar="NAME=JSON",
                        help="a worker node and its custom resources, e.g. b='{\"model_slot\": 1}' (repeatable)")
    parser.add_argument("--head-cpus", type=float, default=1)
    parser.add_argument("--node-cpus", type=float, default=2, help="logical CPUs of each worker node")
    args = parser.parse_args(argv)
    nodes = {}
    for text in args.node:
        name, sep, resources = text.partition("=")
        if not sep or not name.isidentifier() or name == HEAD or name in nodes:
            parser.error(f"--node {text!r}: expected a new NAME=JSON")
        nodes[name] = json.loads(resources)
    return _serve(nodes, args.head_cpus, args.node_cpus)


if __name__ == "__main__":
    sys.exit(main())
