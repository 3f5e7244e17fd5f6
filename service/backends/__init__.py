"""What the front door calls to explain, whatever runs the kernels.

protocol.py: `ExplainBackend`, the interface; serve.py: `ServeBackend` over Ray Serve
deployment handles (with coalesce.py); local.py: `LocalBackend`, the same pipeline in
this process; offline.py: the job runner's `OfflineBackend` and its Ray Serve twin.
"""
