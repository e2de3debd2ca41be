# One image for the API and the workers (docker-compose.yml picks the command).
# CPU and GPU alike: the torch wheel from PyPI carries CUDA; compose reserves an NVIDIA GPU for
# the worker where there is one, and jobs run on the CPU where there is none (device "auto").
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DFQ_DATA_DIR=/data
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/dfq
COPY pyproject.toml README.md alembic.ini ./
COPY dfq ./dfq
COPY worker ./worker
COPY app ./app
COPY migrations ./migrations
COPY teachers ./teachers
RUN pip install --no-cache-dir -e . && useradd --create-home --uid 1000 dfq && mkdir -p /data && chown dfq /data
USER dfq
EXPOSE 8000
CMD ["dfq", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
