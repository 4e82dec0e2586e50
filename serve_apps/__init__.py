"""Ray Serve applications of livelens, one per file, each with ``build_app(args)``.

``gateway`` composes the others (moderation, ocr, quality, streams) into the HTTP API;
``python -m serve_apps`` (``make run``) serves that graph on a local cluster.
"""
