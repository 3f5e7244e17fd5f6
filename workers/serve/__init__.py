"""The Ray Serve side: application builders (app.py) and the deployments they bind,
online (online.py, one per model) and offline (offline.py, every model, for jobs)."""
