"""CPU pinning: validation, and a real process whose threads (and children) end up on the cores."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from workers.affinity import check_cores, pin_process
from workers.serve.app import AppConfig
from workers.config import model_config_from_dict
from workers.errors import InvalidArgument

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU pinning is Linux-only")


@pytest.mark.parametrize("cores, message", [([-1], ">= 0"), ([0, 0], "once"), ([True], ">= 0"), (["0"], ">= 0")])
def test_bad_core_lists_are_refused(cores, message):
    with pytest.raises(ValueError, match=message):
        check_cores(cores, "x.cpu_affinity")
    with pytest.raises(InvalidArgument) as err:
        model_config_from_dict({"name": "m", "source": "demo", "cpu_affinity": cores})
    assert err.value.violations[0].field == "models[m].cpu_affinity"
    from service.config import ServerConfig

    with pytest.raises(InvalidArgument) as err:
        ServerConfig.from_dict({"cpu_affinity": cores})
    assert err.value.violations[0].field == "server.cpu_affinity"


def test_config_round_trip():
    app = AppConfig.from_dict({"models": [{"name": "m", "source": "demo", "cpu_affinity": [1, 0]}]})
    assert app.models[0].cpu_affinity == (1, 0)
    assert pin_process([]) == ()  # nothing to do, nothing changed


def test_a_core_this_process_may_not_use_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"server.cpu_affinity: cores \[4095\] do not exist; this machine"):
        pin_process([4095], "server.cpu_affinity")


def test_a_child_may_move_off_its_pinned_parents_cores():
    # The replica's case: Ray spawns it from daemons pinned to the front door's cores.
    cores = sorted(os.sched_getaffinity(0))
    script = (f"import os; from workers.affinity import pin_process; pin_process([{cores[-1]}]); "
              "print(sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
    assert out.stdout.strip() == f"[{cores[-1]}]"


def test_every_thread_and_later_children_are_pinned():
    core = min(os.sched_getaffinity(0))
    script = textwrap.dedent(f"""
        import os, subprocess, sys, threading, time
        from workers.affinity import pin_process
        stop = threading.Event()
        early = threading.Thread(target=stop.wait)
        early.start()  # exists before pinning: must be pinned too
        pin_process([{core}])
        late = []
        t = threading.Thread(target=lambda: late.append(os.sched_getaffinity(0)))
        t.start(); t.join()
        tasks = {{int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir("/proc/self/task")}}
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True).stdout.strip()
        stop.set(); early.join()
        print(len(tasks) >= 2 and all(v == {{{core}}} for v in tasks.values()), late == [{{{core}}}], child)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.split() == ["True", "True", f"[{core}]"]
