"""The service layer: FastAPI REST API, browser pages, auth and storage (imports worker/ and dfq/)."""
