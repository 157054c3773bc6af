"""Web service: FastAPI app factory, routes, a request batcher and the upload page."""
