"""HTTP serving of exported artifacts: ``recbole-fmrl serve --artifact DIR`` (FastAPI on uvicorn, or Ray Serve)."""
