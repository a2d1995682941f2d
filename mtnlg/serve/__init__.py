"""The HTTP server: the FastAPI app and its error shape (``app``), the request bodies (``protocol``),
the endpoints' work (``handlers``; the token inspector's in ``inspect``), continuous batching over
the engine (``batcher``), Prometheus metrics and access logs (``metrics``) and the playground page
(``static/``).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``, ``mtnlg.data``, ``mtnlg.generate``.
"""
