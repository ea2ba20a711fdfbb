"""The REST service: app.py builds it (routers/: one per resource; deps.py: what routes take), batcher.py the
generic dynamic batcher, engine.py the batch function on the model, server.py uvicorn with client and shutdown
bounds, state.py loading and readiness, settings.py every knob, metrics.py and logs.py what operators see."""
