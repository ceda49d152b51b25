# One image for every Parrot container: the API service, the Ray head and the
# GPU workers run the same Python, torch and Ray versions (Ray requires it).
#
#   docker build -t parrot .                      # torch from PyPI (CUDA build on x86-64 Linux)
#   docker build --build-arg TORCH_SPEC=torch==2.13.0 -t parrot .
#   docker run -p 8000:8000 -e PARROT_ADMIN_KEY=... parrot     # = parrot serve, embedded test model
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1 \
    PARROT_HOST=0.0.0.0 \
    PARROT_PORT=8000 \
    PARROT_CACHE_DIR=/cache

WORKDIR /app

# torch first, in its own layer: it is the large one and changes least.
ARG TORCH_SPEC="torch>=2.4"
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY parrot ./parrot
RUN pip install ".[server,client,ray]" && mkdir -p /cache /models

EXPOSE 8000
ENTRYPOINT ["parrot"]
CMD ["serve"]
