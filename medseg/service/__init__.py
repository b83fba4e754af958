"""Inference service for GPU servers: a FastAPI app over ``medseg.inference.Predictor`` with a bounded job
queue worked by one thread, and ``RemotePredictor``, the HTTP client with the Predictor's interface.

Modules: ``settings`` (limits, from env), ``uploads`` (upload bytes -> Scan, safely), ``jobs`` (queue, worker,
TTL, time limit), ``shared_jobs`` (the same jobs in Redis for many API replicas and ``medseg worker`` processes), ``results``
(mask/uncertainty/report files of a finished job), ``limits`` (request body size
and time), ``budget`` (voxel cap, memory budget), ``guards`` (who may call),
``app`` (routes), ``server`` (uvicorn), ``client`` (RemotePredictor). Importing this package imports nothing
heavy: the web stack is only needed by the server, httpx only by the client.
"""
